import math

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from apollo_train.tiny_models import build_tiny_model
from worker.examples import Encoded, encode_example
from worker.param_groups import make_optimizer
from worker.trainer import IGNORE, StepHooks, Trainer, batches, collate

MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-qwen3", "qwen3")


@pytest.fixture(scope="module")
def example(model_dir):
    return encode_example(AutoTokenizer.from_pretrained(model_dir), MESSAGES)


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
        [example], epochs=5, on_step=lambda i, loss: seen.append((i, loss))
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


def test_step_the_optimizer_skips_is_counted(model, example):
    opt = make_optimizer(model, "apollo", lr=1e-3)
    before = weights(model)
    handle = model.model.norm.register_forward_hook(lambda mod, args, out: NanGrad.apply(out))
    try:
        result = Trainer(model, opt, max_tokens_per_step=4096).train([example])
    finally:
        handle.remove()
    assert math.isfinite(result.losses[0])  # the loss was fine, the gradients were not
    assert opt.last_step_skipped
    assert result.skipped_steps == 1 and result.tokens == 0
    assert same(weights(model), before)


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
