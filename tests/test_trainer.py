import functools
import math

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from apollo_train.shared.schema import Example
from apollo_train.tiny_models import build_tiny_model
from worker import trainer as trainer_module
from worker.chat_tokens import Encoded, encode_example
from worker.param_groups import make_optimizer
from worker.trainer import IGNORE, StepHooks, Trainer, batches, chunked_cross_entropy, collate

MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-qwen3", "qwen3")


@pytest.fixture(scope="module")
def example(model_dir):
    return encode_example(AutoTokenizer.from_pretrained(model_dir), Example(messages=MESSAGES))


@pytest.fixture
def model(model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical (compares bytes, so NaN equals NaN)."""
    return a.keys() == b.keys() and all(torch.equal(_bytes(a[n]), _bytes(b[n])) for n in a)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def enc(n: int, target_start: int = 1) -> Encoded:
    return Encoded(input_ids=list(range(n)), target_start=target_start, key=str(n))


class Recorder(StepHooks):
    def __init__(self, optimizer=None, fail=False):
        self.calls, self.lrs, self.optimizer, self.fail = [], [], optimizer, fail

    def before_step(self):
        self.calls.append("before")
        if self.optimizer is not None:
            self.lrs.append([g["lr"] for g in self.optimizer.param_groups])
        if self.fail:
            raise RuntimeError("vLLM went away")

    def after_step(self):
        self.calls.append("after")


def test_batches_pack_in_order_within_the_budget():
    es = [enc(3), enc(4), enc(2), enc(10), enc(1), enc(1)]
    plan = batches(es, max_tokens_per_step=8)
    assert [[len(e.input_ids) for e in b] for b in plan] == [[3, 4], [2], [10], [1, 1]]
    assert [e for b in plan for e in b] == es
    for b in plan:
        assert len(b) == 1 or len(b) * max(len(e.input_ids) for e in b) <= 8
    assert batches([], 8) == []
    assert [len(b) for b in batches([enc(2)] * 5, 100)] == [5]


def test_collate_masks_everything_but_the_answers():
    input_ids, mask, labels = collate([enc(5, target_start=3), enc(2, target_start=1)])
    assert input_ids.shape == mask.shape == labels.shape == (2, 5)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert labels.tolist() == [[IGNORE] * 3 + [3, 4], [IGNORE, 1, IGNORE, IGNORE, IGNORE]]


def test_loss_is_the_mean_over_answer_tokens(model, example):
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_tokens_per_step=4096)
    ids, mask, labels = collate([example])
    with torch.no_grad():
        ours = trainer.loss(ids, mask, labels)
        # For one sequence this is what the model's own shifted, averaged loss gives.
        theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        # Padding a second, shorter example next to it changes nothing for the first one's tokens.
        short = Encoded(example.input_ids[:5], 2, "x")
        ids2, mask2, labels2 = collate([example, short])
        logits = model(input_ids=ids2, attention_mask=mask2).logits.float()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)
    n1, n2 = example.num_target_tokens, short.num_target_tokens
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids2[:, 1:, None].clamp(min=0))[..., 0]
    keep = labels2[:, 1:] != IGNORE
    manual = -(lp[keep]).sum() / (n1 + n2)
    torch.testing.assert_close(trainer.loss(ids2, mask2, labels2).detach(), manual, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["apollo", "adamw"])
def test_a_few_steps_lower_the_loss(model, example, name):
    opt = make_optimizer(model, name, lr=1e-3)
    hooks = Recorder()
    seen = []
    result = Trainer(model, opt, max_tokens_per_step=4096, hooks=hooks).train(
        [example], epochs=5, on_step=lambda i, loss, tokens: seen.append((i, loss))
    )
    assert result.steps == 5 and result.skipped_steps == 0
    assert result.tokens == 5 * example.num_target_tokens
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4] and [loss for _, loss in seen] == result.losses
    assert result.losses[-1] < result.losses[0] - 0.5
    assert hooks.calls == ["before", "after"] * 5
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_loss_skips_the_step(model, example):
    opt = make_optimizer(model, "adamw", lr=1e-3)
    before = weights(model)
    hooks = Recorder()
    handle = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: out * float("inf"))
    try:
        result = Trainer(model, opt, max_tokens_per_step=4096, hooks=hooks).train([example], epochs=2)
    finally:
        handle.remove()
    assert result.steps == 2 and result.skipped_steps == 2 and result.tokens == 0
    assert all(math.isnan(x) for x in result.losses)
    assert hooks.calls == []  # vLLM is not paused for a step that does not happen
    assert same(weights(model), before)
    assert all(p.grad is None for p in model.parameters())


class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("step_in_backward", [False, True], ids=["whole-model", "in-backward"])
def test_step_the_optimizer_skips_is_counted(model, example, step_in_backward):
    opt = make_optimizer(model, "apollo", lr=1e-3)
    before = weights(model)
    handle = model.model.norm.register_forward_hook(lambda mod, args, out: NanGrad.apply(out))
    try:
        result = Trainer(model, opt, max_tokens_per_step=4096, step_in_backward=step_in_backward).train([example])
    finally:
        handle.remove()
    assert math.isfinite(result.losses[0])  # the loss was fine, the gradients were not
    after = weights(model)
    trainable = len(before)
    if not step_in_backward:  # one non-finite gradient skips the whole step
        assert opt.last_step_skipped
        assert result.skipped_steps == 1 and result.tokens == 0 and result.skipped_params == trainable
        assert same(after, before)
    else:  # every parameter below the norm is skipped; lm_head's gradient is finite, so it is stepped
        assert result.skipped_steps == 0 and result.skipped_params == trainable - 1
        assert [n for n in before if not torch.equal(after[n], before[n])] == ["lm_head.weight"]


def test_lr_override_is_restored(model, example):
    opt = make_optimizer(model, "apollo", lr=1e-4)
    hooks = Recorder(opt)
    trainer = Trainer(model, opt, max_tokens_per_step=4096, hooks=hooks)
    trainer.train([example], lr=3e-3)
    assert hooks.lrs and all(lr == 3e-3 for lrs in hooks.lrs for lr in lrs)
    assert all(g["lr"] == 1e-4 for g in opt.param_groups)
    # Also when the step fails.
    hooks.fail = True
    before = weights(model)
    with pytest.raises(RuntimeError, match="vLLM went away"):
        trainer.train([example], lr=5e-3)
    assert hooks.calls == ["before", "after", "before"]
    assert same(weights(model), before)  # the failed step changed no weights
    assert all(g["lr"] == 1e-4 for g in opt.param_groups)
    assert all(p.grad is None for p in model.parameters())


def test_target_at_the_start_has_nothing_to_predict_its_first_token(model):
    opt = make_optimizer(model, "adamw", lr=1e-3)
    e = Encoded(input_ids=[5, 6, 7, 8], target_start=0, key="k")
    assert e.num_target_tokens == 3
    result = Trainer(model, opt, max_tokens_per_step=4096).train([e, e], epochs=1)
    assert result.steps == 1 and result.tokens == 6


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen3_5"])
def test_chunked_loss_and_gradients_match_the_models_own_logits(tiny_model, family):
    """The loss from the base model's hidden states and the output layer, in chunks, is the model's own."""
    from apollo_train.tiny_models import family_available
    from worker.trainer import body_and_head, chunked_cross_entropy

    if not family_available(family):
        pytest.skip(f"transformers lacks {family}")
    directory = tiny_model(family)
    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(0)
    model = getattr(transformers, config.architectures[0]).from_pretrained(directory, dtype=torch.float32)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_tokens_per_step=4096)
    assert trainer._split is not None
    ids, mask, labels = collate([enc(40, target_start=12), enc(25, target_start=20)])

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = trainer.loss(ids, mask, labels)
    ours_grads = grads(ours)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    theirs = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE)
    theirs_grads = grads(theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], theirs_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    body, head = body_and_head(model)
    hidden = torch.randn(7, model.config.get_text_config().hidden_size)
    targets = torch.randint(0, head.weight.shape[0], (7,))
    whole = torch.nn.functional.cross_entropy(head(hidden), targets)
    torch.testing.assert_close(chunked_cross_entropy(hidden, head, targets, chunk=3), whole)


# ---------------------------------------------------------------- stepping inside the backward pass

BATCHES = [enc(40, target_start=12), enc(25, target_start=20), enc(33, target_start=5)]  # 3 steps of 1


def tiny(tiny_model, family: str, dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model(family), dtype=dtype)


def state_of(opt, model) -> dict[str, dict]:
    return {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters() if p in opt.state}


class StepSpy:
    """Wraps an optimizer's step_params (how the trainer steps inside the backward pass): which parameters
    were stepped, with what gradient, and how many parameters held a gradient at that moment."""

    def __init__(self, opt, model, calls: list | None = None):
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.model, self.calls, self.stepped, self.live = model, calls, [], []
        step_params = opt.step_params

        def spy(params):
            params = list(params)
            self.stepped += [(self.names[id(p)], p.grad.clone()) for p in params]
            self.live.append(sum(q.grad is not None for q in model.parameters()))
            if calls is not None and calls[-1] != "step_params":
                calls.append("step_params")
            step_params(params)

        opt.step_params = spy


def bucket_of(model, name: str) -> set[str]:
    """The parameters stepped with `name` in one bucket inside the backward pass: its decoder layer's
    matrices of the same oriented shape (or `name` alone outside the layers, or for a 1-D tensor)."""
    params = dict(model.named_parameters())
    layer = name.split(".mlp.")[0].split(".self_attn.")[0]
    if not layer.startswith("model.layers.") or params[name].ndim != 2:
        return {name}
    shape = sorted(params[name].shape)
    return {n for n, p in params.items() if n.startswith(layer + ".") and p.ndim == 2 and sorted(p.shape) == shape}


@pytest.mark.parametrize("family", ["qwen3", "llama"])  # llama: tied embeddings
@pytest.mark.parametrize("name", ["apollo", "apollo-mini", "adamw"])
def test_step_in_backward_equals_the_whole_model_step(tiny_model, family, name):
    """Bit-equal weights and optimizer state after several steps (docs/optimizer.md says why and where it
    may differ by round-off: not on the CPU)."""
    runs = []
    for step_in_backward in (False, True):
        model = tiny(tiny_model, family)
        opt = make_optimizer(model, name, lr=1e-2, weight_decay=0.1, update_proj_gap=2)
        result = Trainer(model, opt, max_tokens_per_step=64, step_in_backward=step_in_backward).train(
            BATCHES, epochs=2)
        assert result.steps == 6 and result.skipped_steps == result.skipped_params == 0
        assert result.whole_model_reason == (None if step_in_backward else "step_in_backward=False")
        runs.append((weights(model), state_of(opt, model), result.losses))
    (w0, s0, l0), (w1, s1, l1) = runs
    assert l0 == l1 and all(math.isfinite(x) for x in l0)  # (a large lr on purpose: every update is large)
    assert same(w0, w1) and not same(w0, weights(tiny(tiny_model, family)))
    assert s0.keys() == s1.keys() == w0.keys()
    for n in s0:
        assert s0[n].keys() == s1[n].keys() and all(torch.equal(s0[n][k], s1[n][k]) for k in s0[n]), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["apollo", "apollo-mini", "adamw"])
def test_step_in_backward_on_cuda_is_the_whole_model_step_within_one_rounding(tiny_model, name):
    """bf16 on CUDA (Triton kernels, flags read on the device). A bucket of one matrix may sum its norms in
    another order than a bucket of several, so one step may differ by one bf16 rounding of a weight
    (2**-7 relative); see docs/optimizer.md."""
    runs = []
    for step_in_backward in (False, True):
        model = tiny(tiny_model, "qwen3", torch.bfloat16).cuda()
        opt = make_optimizer(model, name, lr=1e-2, weight_decay=0.1)
        result = Trainer(model, opt, max_tokens_per_step=4096, step_in_backward=step_in_backward).train(BATCHES)
        assert result.steps == 1 and result.skipped_params == 0
        runs.append(weights(model))
    before = weights(tiny(tiny_model, "qwen3", torch.bfloat16))
    for n in before:
        assert not torch.equal(runs[0][n], before[n].cuda()), n
        torch.testing.assert_close(runs[1][n], runs[0][n], rtol=2**-7, atol=1e-6, msg=n)


def test_each_parameter_steps_once_with_its_whole_gradient(tiny_model, monkeypatch):
    """The tied embedding is used by the input and, through lm_head, by every loss chunk: it is stepped once,
    after its last accumulation, with the gradient a plain backward gives; at most one decoder layer's
    gradients exist at once."""
    monkeypatch.setattr(trainer_module, "chunked_cross_entropy", functools.partial(chunked_cross_entropy, chunk=7))
    model = tiny(tiny_model, "llama")
    ids, mask, labels = collate([BATCHES[0]])
    plain = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_tokens_per_step=64)
    plain.loss(ids, mask, labels).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    opt = make_optimizer(model, "apollo", lr=1e-2)
    spy = StepSpy(opt, model)
    Trainer(model, opt, max_tokens_per_step=64).train([BATCHES[0]])
    names = [n for n, _ in spy.stepped]
    assert sorted(names) == sorted(expected) and "model.embed_tokens.weight" in names  # each once
    assert names[-1] == "model.embed_tokens.weight"  # its last use is the first layer's input
    for n, grad in spy.stepped:
        assert torch.equal(grad, expected[n]), n
    layer = len(list(model.model.layers[0].parameters()))
    assert max(spy.live) == layer < len(expected) == 20  # one layer's gradients at most, of 20


@pytest.mark.parametrize("bad", ["model.layers.0.mlp.down_proj.weight", "model.norm.weight"], ids=["apollo", "adamw"])
def test_a_non_finite_gradient_skips_only_its_bucket(tiny_model, bad):
    model = tiny(tiny_model, "qwen3")
    opt = make_optimizer(model, "apollo", lr=1e-2)
    trainer = Trainer(model, opt, max_tokens_per_step=64)
    trainer.train([BATCHES[0]])
    before, state = weights(model), state_of(opt, model)
    handle = dict(model.named_parameters())[bad].register_hook(lambda g: g * math.nan)
    try:
        result = trainer.train([BATCHES[1]])
    finally:
        handle.remove()
    skipped = bucket_of(model, bad)
    assert result.skipped_params == len(skipped) and result.skipped_steps == 0 and result.tokens > 0
    after, state_after = weights(model), state_of(opt, model)
    assert {n for n in before if torch.equal(after[n], before[n])} == skipped
    assert state_after[bad].keys() == state[bad].keys()
    assert all(torch.equal(state_after[bad][k], state[bad][k]) for k in state[bad])  # step count included
    assert all(int(s["step"]) == (1 if n in skipped else 2) for n, s in state_after.items())
    result = trainer.train([BATCHES[2]])
    assert result.skipped_params == 0 and not torch.equal(weights(model)[bad], after[bad])


def test_a_parameter_skipped_at_its_first_step_has_no_state(tiny_model):
    model = tiny(tiny_model, "qwen3")
    opt = make_optimizer(model, "apollo", lr=1e-2)
    param = model.model.layers[1].self_attn.q_proj.weight
    handle = param.register_hook(lambda g: g * math.inf)
    try:
        result = Trainer(model, opt, max_tokens_per_step=64).train([BATCHES[0]])
    finally:
        handle.remove()
    skipped = bucket_of(model, "model.layers.1.self_attn.q_proj.weight")
    assert result.skipped_params == len(skipped)
    assert param not in opt.state and len(opt.state) == len(list(model.parameters())) - len(skipped)


@pytest.mark.parametrize("step_in_backward", [False, True], ids=["whole-model", "in-backward"])
def test_hooks_surround_every_weight_written(tiny_model, step_in_backward):
    model = tiny(tiny_model, "qwen3")
    opt = make_optimizer(model, "apollo", lr=1e-2)
    hooks = Recorder()
    StepSpy(opt, model, calls=hooks.calls)
    opt.step = functools.partial(lambda step: (hooks.calls.append("step"), step())[1], opt.step)
    Trainer(model, opt, max_tokens_per_step=64, hooks=hooks, step_in_backward=step_in_backward).train(BATCHES[:2])
    inner = "step_params" if step_in_backward else "step"
    assert hooks.calls == ["before", inner, "after"] * 2


def test_hooks_when_backward_raises_after_some_parameters_stepped(tiny_model):
    model = tiny(tiny_model, "qwen3")
    opt = make_optimizer(model, "apollo", lr=1e-2)
    hooks = Recorder()
    spy = StepSpy(opt, model, calls=hooks.calls)

    def fail(grad):
        raise RuntimeError("backward failed")

    handle = model.model.layers[0].mlp.up_proj.weight.register_hook(fail)
    trainer = Trainer(model, opt, max_tokens_per_step=64, hooks=hooks)
    try:
        with pytest.raises(RuntimeError, match="backward failed"):
            trainer.train([BATCHES[0]])
    finally:
        handle.remove()
    assert hooks.calls == ["before", "step_params", "after"] and spy.stepped  # lm_head etc. were stepped
    assert all(p.grad is None for p in model.parameters())
    assert trainer.train([BATCHES[1]]).skipped_params == 0  # the optimizer finished the broken step


def test_a_failing_before_step_writes_nothing_in_backward(tiny_model):
    model = tiny(tiny_model, "qwen3")
    opt = make_optimizer(model, "apollo", lr=1e-2)
    hooks = Recorder(fail=True)
    before = weights(model)
    with pytest.raises(RuntimeError, match="vLLM went away"):
        Trainer(model, opt, max_tokens_per_step=64, hooks=hooks).train([BATCHES[0]])
    assert hooks.calls == ["before"] and same(weights(model), before) and not opt.state
    assert all(p.grad is None for p in model.parameters())


def test_an_optimizer_without_step_param_steps_the_whole_model(tiny_model):
    model = tiny(tiny_model, "qwen3")
    result = Trainer(model, torch.optim.SGD(model.parameters(), lr=1e-2), max_tokens_per_step=64).train([BATCHES[0]])
    assert result.whole_model_reason == "SGD cannot step one parameter at a time"
    assert result.steps == 1 and result.skipped_steps == 0


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_activation_checkpointing_keeps_loss_and_gradients(tiny_model, family):
    model = tiny(tiny_model, family)
    ids, mask, labels = collate([BATCHES[0], BATCHES[1]])
    forwards = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: forwards.append(1))
    results = []
    for on in (True, False):
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_tokens_per_step=64,
                          activation_checkpointing=on)
        assert model.is_gradient_checkpointing == on
        model.train()
        forwards.clear()
        loss = trainer.loss(ids, mask, labels)
        loss.backward()
        assert len(forwards) == (2 if on else 1)  # recomputed in the backward pass
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (loss_on, grads_on), (loss_off, grads_off) = results
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    assert all(torch.equal(grads_on[n], grads_off[n]) for n in grads_on)


def as_views(model) -> list[torch.Tensor]:
    """Rebind the parameters to views of one tensor per decoder layer (and one per other parameter), as the
    worker's model views vLLM's fused weights: views of one tensor share its autograd version counter."""
    fused: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():  # tied ones once
        key = name[: name.index(".", name.index("layers.") + 7)] if "layers." in name else name
        fused.setdefault(key, []).append(p)
    tensors = []
    for members in fused.values():
        flat = torch.empty(sum(p.numel() for p in members), dtype=members[0].dtype)
        offset = 0
        for p in members:
            view = flat[offset : offset + p.numel()].view(p.shape)
            view.copy_(p.detach())
            offset += p.numel()
            new = torch.nn.Parameter(view, requires_grad=p.requires_grad)
            for n, q in list(model.named_parameters(remove_duplicate=False)):
                if q is p:
                    module, _, attr = n.rpartition(".")
                    setattr(model.get_submodule(module), attr, new)
        tensors.append(flat)
    return tensors


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_model_of_views_is_trained_in_place_like_a_plain_one(tiny_model, family, checkpointing):
    """Stepping a layer's down_proj in backward must not invalidate the weights autograd saved for its
    gate_proj and up_proj, views of the same tensor (checked by autograd without checkpointing)."""
    plain, viewed = tiny(tiny_model, family, torch.bfloat16), tiny(tiny_model, family, torch.bfloat16)
    storages = {t.untyped_storage().data_ptr() for t in as_views(viewed)}
    ptrs = [p.data_ptr() for p in viewed.parameters()]
    for model in (plain, viewed):
        Trainer(model, make_optimizer(model, "apollo-mini", lr=1e-2), max_tokens_per_step=64,
                activation_checkpointing=checkpointing).train(BATCHES)
    assert [p.data_ptr() for p in viewed.parameters()] == ptrs
    assert {p.untyped_storage().data_ptr() for p in viewed.parameters()} == storages
    assert same(weights(viewed), weights(plain)) and not same(weights(plain), weights(tiny(tiny_model, family)))
