"""Tests for worker.optim and worker.param_groups: exactness against apollo-torch, resume, safety, in-place
views, grouping."""

import io
import math
import warnings

import pytest
import torch
from torch import nn

from apollo_train.shared.config import OPTIMIZERS
from worker.optim import APOLLO_MINI, DEFAULT_RANK, Apollo, projection
from worker.param_groups import make_optimizer, optimizer_state_bytes, param_groups_for

SHAPES = [(48, 24), (24, 48), (32, 32)]  # m > n, m < n, m = n
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _grads(params, targets, gen, amp):
    """Pull towards targets plus noise; amp jumps 10x halfway to exercise the norm-growth limiter."""
    return [amp * (0.1 * (p.detach() - t) + torch.randn(p.shape, generator=gen))
            for p, t in zip(params, targets)]


@pytest.mark.parametrize("limiter", [True, False], ids=["limiter", "no-limiter"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd0.1"])
@pytest.mark.parametrize("mode", [{"rank": 1, "scale_type": "tensor", "scale": 128.0},
                                  {"rank": 4, "scale_type": "channel", "scale": 2.0}], ids=["mini", "rank4"])
def test_matches_reference(mode, weight_decay, limiter):
    ref = pytest.importorskip("apollo_reference")  # skips where apollo-torch is not installed
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES] + [torch.randn(16, generator=gen),
                                                             torch.randn(3, 4, 5, generator=gen)]
    targets = [torch.randn(x.shape, generator=gen) for x in init]
    ours_p = [nn.Parameter(x.clone()) for x in init]
    ref_p = [nn.Parameter(x.clone()) for x in init]
    common = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": weight_decay}
    ours = Apollo([{"params": ours_p[:3]}, {"params": ours_p[3:], "low_rank": False}], update_proj_gap=50,
                  norm_growth_limit=1.01 if limiter else None, reference_eps=True, seed=7, **mode, **common)
    theirs = ref.reference_apollo(
        [{"params": ref_p[:3], "update_proj_gap": 50, **mode}, {"params": ref_p[3:]}],
        projector=projection, seed=7, limiter=limiter, **common)
    for step in range(300):
        for a, b, g in zip(ours_p, ref_p, _grads(ours_p, targets, gen, 10.0 if step >= 150 else 1.0)):
            a.grad, b.grad = g, g.clone()
        ours.step()
        theirs.step()
        assert not ours.last_step_skipped
    for a, b, x in zip(ours_p, ref_p, init):
        assert not torch.equal(a, x)
        ulp = torch.finfo(torch.float32).eps * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=0, atol=32 * ulp)  # 300 steps of round-off: ~17 ulps seen


def _model(dtype=torch.bfloat16):
    """Linear layers of two shapes, a norm, a 3-D conv weight and a 1-D A_log."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"up": nn.Linear(16, 40), "down": nn.Linear(40, 16, bias=False),
                           "norm": nn.LayerNorm(16), "conv": nn.Conv1d(4, 4, 3, groups=4)})
    model.register_parameter("A_log", nn.Parameter(torch.randn(8)))
    return model.to(dtype)


def _set_grads(model, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def _snapshot(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("preset", [APOLLO_MINI, {"rank": 3}], ids=["mini", "rank3"])
def test_resume_is_bit_identical(preset, device):
    def make(model):
        return Apollo(param_groups_for(model, weight_decay=0.1), lr=1e-2, update_proj_gap=4, **preset)

    model = _model().to(device)
    opt = make(model)
    for step in range(11):
        if step == 5:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        _set_grads(model, step)
        opt.step()

    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed = _model().to(device)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    for step in range(5, 11):
        _set_grads(resumed, step)
        opt2.step()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert opt.state[p].keys() == opt2.state[q].keys()
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt2.state[q][k])


def test_state_is_fp32_for_bf16_params_and_survives_load():
    model = _model(torch.bfloat16)
    opt = Apollo(param_groups_for(model), lr=1e-3)
    _set_grads(model, 0)
    opt.step()
    for s in opt.state.values():
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32
    v0 = {id(p): s["exp_avg_sq"].clone() for p, s in opt.state.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # with zero gradients V must decay by beta2 (in bf16 it could not)
    for p, s in opt.state.items():
        torch.testing.assert_close(s["exp_avg_sq"], v0[id(p)] * 0.999)
    opt2 = Apollo(param_groups_for(model), lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt2.state.values())


@pytest.mark.parametrize("device, dtype",
                         [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=cuda)])
def test_nonfinite_step_changes_nothing(device, dtype):
    model = _model(dtype).to(device)
    opt = Apollo(param_groups_for(model, weight_decay=0.1), lr=1e-2, update_proj_gap=1)
    _set_grads(model, 0)
    opt.step()
    for bad_name, bad_value in [("up.weight", math.inf), ("norm.weight", math.nan), ("down.weight", 3e38)]:
        weights = [p.detach().clone() for p in model.parameters()]
        state = _snapshot(opt)
        _set_grads(model, 1)
        # 3e38 is finite, but its square overflows
        dict(model.named_parameters())[bad_name].grad[0, ...].fill_(bad_value)
        opt.step()
        assert opt.last_step_skipped
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
        for p, s in opt.state.items():
            assert s.keys() == state[id(p)].keys()
            assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())
    _set_grads(model, 2)
    opt.step()
    assert not opt.last_step_skipped
    assert all(int(s["step"]) == 2 for s in opt.state.values())


def test_updates_views_of_a_fused_tensor_in_place():
    fused = torch.randn(110, 48, dtype=torch.bfloat16)
    before = fused.clone()
    views = [fused.narrow(0, 0, 32), fused.narrow(0, 32, 64), fused.narrow(0, 100, 4).narrow(1, 8, 20),
             fused[105]]
    for v in views:
        v.requires_grad_(True)
    copies = [nn.Parameter(v.detach().clone()) for v in views]
    ptrs = [v.data_ptr() for v in views]
    opts = [Apollo([{"params": ps[:3]}, {"params": ps[3:], "low_rank": False}], lr=0.1, rank=2,
                   weight_decay=0.1) for ps in (views, copies)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for v, c in zip(views, copies):
            v.grad = torch.randn(v.shape, generator=gen).to(torch.bfloat16)
            c.grad = v.grad.clone()
        for opt in opts:
            opt.step()
    assert [v.data_ptr() for v in views] == ptrs
    assert all(v._base is fused for v in views)
    for v, c in zip(views, copies):  # same result as contiguous copies, up to bf16 rounding of the decay
        torch.testing.assert_close(v, c)
    touched = torch.zeros(110, 48, dtype=torch.bool)
    touched[0:96] = True
    touched[100:104, 8:28] = True
    touched[105] = True
    assert torch.equal(fused[~touched], before[~touched])
    assert (fused[touched] != before[touched]).float().mean() > 0.9


def _layers(dtype=torch.float32):
    """Two same-shape linear layers of each orientation (buckets of two in a whole-model step), a norm."""
    torch.manual_seed(0)
    return nn.ModuleDict({"a": nn.Linear(16, 40), "b": nn.Linear(16, 40), "c": nn.Linear(40, 16, bias=False),
                          "d": nn.Linear(40, 16, bias=False), "norm": nn.LayerNorm(16)}).to(dtype)


def _optimizer(model, preset):
    groups = param_groups_for(model, weight_decay=0.1)
    if preset is None:  # AdamW
        return Apollo([{**g, "low_rank": False} for g in groups], lr=1e-2)
    return Apollo(groups, lr=1e-2, update_proj_gap=2, **preset)


def _step_each(opt, model) -> int:
    for p in model.parameters():
        opt.step_param(p)
    return opt.finish_param_steps()


PRESETS = pytest.mark.parametrize("preset", [{"rank": 3}, APOLLO_MINI, None], ids=["rank3", "mini", "adamw"])


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                           pytest.param("cuda", torch.bfloat16, marks=cuda)])
@PRESETS
def test_step_param_equals_step(preset, device, dtype):
    """Bit-equal on the CPU; on CUDA within float32 round-off of the scales, bf16-rounded (docs/optimizer.md)."""
    models = [_layers(dtype).to(device) for _ in range(2)]
    opts = [_optimizer(m, preset) for m in models]
    for step in range(5):
        _set_grads(models[0], step)
        _set_grads(models[1], step)
        opts[0].step()
        assert _step_each(opts[1], models[1]) == 0 and not opts[1].last_step_skipped
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if device == "cpu":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4, msg=name)
        state = opts[1].state[b]
        assert state.keys() == opts[0].state[a].keys() and int(state["step"]) == 5
        if device == "cpu":
            assert all(torch.equal(v, opts[0].state[a][k]) for k, v in state.items()), name


@PRESETS
def test_step_param_leaves_a_non_finite_parameter_and_its_state_unchanged(preset):
    model = _layers()
    opt = _optimizer(model, preset)
    _set_grads(model, 0)
    _step_each(opt, model)
    bad = model["c"].weight if preset is not None else model["norm"].weight
    weights, state = [p.detach().clone() for p in model.parameters()], _snapshot(opt)
    _set_grads(model, 1)
    bad.grad[0, ...] = math.nan
    assert _step_each(opt, model) == 1 and not opt.last_step_skipped
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w) == (p is bad)
        assert int(opt.state[p]["step"]) == (1 if p is bad else 2)
    assert opt.state[bad].keys() == state[id(bad)].keys()
    assert all(torch.equal(v, state[id(bad)][k]) for k, v in opt.state[bad].items())

    fresh = _layers()
    opt = _optimizer(fresh, preset)
    _set_grads(fresh, 0)
    for p in fresh.parameters():
        p.grad.fill_(math.inf)
    assert _step_each(opt, fresh) == len(list(fresh.parameters())) and opt.last_step_skipped
    assert not opt.state  # nothing was stepped before: no state at all


def test_step_param_twice_in_one_step_is_refused():
    p = nn.Parameter(torch.randn(8, 4))
    opt = Apollo([p], lr=1e-2, rank=2)
    p.grad = torch.randn_like(p)
    opt.step_param(p)
    with pytest.raises(RuntimeError, match="stepped twice in one step"):
        opt.step_param(p)
    opt.finish_param_steps()
    opt.step_param(p)  # a new step


@cuda
def test_step_param_never_waits_for_the_device():
    model = _layers(torch.bfloat16).cuda()
    opt = _optimizer(model, {"rank": 4})
    for step in range(3):  # the first steps draw projections and create state
        _set_grads(model, step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for p in model.parameters():
                opt.step_param(p)
        torch.cuda.set_sync_debug_mode("default")
        assert not [w for w in record if "synchroniz" in str(w.message)]
        assert opt.finish_param_steps() == 0


def test_param_groups_for_qwen3():
    transformers = pytest.importorskip("transformers")
    for tied in (False, True):
        config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8, attention_bias=True, tie_word_embeddings=tied)
        model = transformers.Qwen3ForCausalLM(config)
        model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
        groups = param_groups_for(model, weight_decay=0.1, rank=2)
        names = {id(p): n for n, p in model.named_parameters()}
        low = [names[id(p)] for g in groups if g["low_rank"] for p in g["params"]]
        dense = {names[id(p)]: g["weight_decay"] for g in groups if not g["low_rank"] for p in g["params"]}
        embeddings = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
        assert sorted(n for n in low if not n.endswith("proj.weight")) == sorted(embeddings)  # projected too
        assert len(low) == 13 + len(embeddings)
        rows = next(g for g in groups if g["low_rank"] and names[id(g["params"][0])] in embeddings)
        assert [names[id(p)] for p in rows["params"]] == embeddings and rows["scale_type"] == "channel"
        assert "model.layers.1.mlp.up_proj.weight" not in low + list(dense)
        assert dense and all(wd == 0.0 and ("norm" in n or n.endswith("bias")) for n, wd in dense.items())
        assert [g["rank"] for g in groups if g["low_rank"]] == [2, 2]

        opt = make_optimizer(model, "apollo-mini", lr=1e-2)
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
            opt.step()
        assert losses[-1] < losses[0]


def test_non_matrix_params_in_a_low_rank_group_use_adamw():
    model = _model(torch.float32)
    opt = Apollo(model.parameters(), lr=1e-2, rank=2)  # conv (3-D), biases and A_log (1-D) among them
    for step in range(3):
        _set_grads(model, step)
        opt.step()
    assert opt.state[model["conv"].weight]["exp_avg"].shape == model["conv"].weight.shape
    assert opt.state[model["up"].weight]["exp_avg"].shape == (40, 2)
    assert opt.state[model["down"].weight]["exp_avg"].shape == (40, 2)  # (max side, rank)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    Apollo(model.parameters(), lr=1e-2, rank=2).load_state_dict(torch.load(io.BytesIO(buf.getvalue())))


def test_make_optimizer_and_state_bytes():
    assert OPTIMIZERS == ("apollo", "apollo-mini", "adamw") and DEFAULT_RANK == 64
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False))
    apollo = make_optimizer(model, "apollo", lr=1e-3)
    mini = make_optimizer(model, "apollo-mini", lr=1e-3)
    adamw = make_optimizer(model, "adamw", lr=1e-3)
    assert isinstance(adamw, Apollo) and not any(g["low_rank"] for g in adamw.param_groups)
    def settings(opt):
        return tuple(opt.param_groups[0][k] for k in ("rank", "scale_type", "scale"))

    assert settings(apollo) == (64, "channel", 1.0)
    assert settings(mini) == (1, "tensor", 128.0)
    with pytest.raises(ValueError):
        make_optimizer(model, "sgd", lr=1e-3)
    for opt in (apollo, mini, adamw):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    # per matrix: fp32 moments 2 r max(m, n), P r min(m, n), limiter norm and step: 4 bytes each
    for opt, r in ((apollo, 64), (mini, 1)):
        assert optimizer_state_bytes(opt) == 2 * (4 * (2 * r * 512 + r * 256) + 8)
    assert optimizer_state_bytes(adamw) == 2 * (2 * 4 * 256 * 512 + 4)


def test_adamw_keeps_fp32_moments_and_skips_a_non_finite_step():
    model = _model(torch.bfloat16)
    opt = make_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]  # up/down, conv, 1-D tensors
    _set_grads(model, 0)
    opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg"].shape == p.shape for p, s in opt.state.items())
    weights, state = [p.detach().clone() for p in model.parameters()], _snapshot(opt)
    _set_grads(model, 1)
    model["norm"].bias.grad[0] = math.nan
    opt.step()
    assert opt.last_step_skipped
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(v, state[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())


@pytest.mark.parametrize("option, value, message", [
    ("lr", -1.0, "param group 1: lr must be >= 0, got -1.0"),
    ("betas", (0.9, 1.0), r"param group 1: betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
    ("rank", 0, "param group 1: rank must be an integer >= 1, got 0"),
    ("scale_type", "row", "param group 1: scale_type must be 'channel' or 'tensor', got 'row'"),
    ("norm_growth_limit", 0.5, "param group 1: norm_growth_limit must be >= 1 or None, got 0.5"),
])
def test_a_bad_option_is_named_with_its_group(option, value, message):
    groups = [{"params": [nn.Parameter(torch.randn(4, 4))]}, {"params": [nn.Parameter(torch.randn(4, 4))]}]
    with pytest.raises(ValueError, match=f"^{message}$"):
        Apollo(groups[:1] + [{**groups[1], option: value}], lr=1e-3)


def test_fused_true_raises_where_the_kernels_cannot_run():
    matrix = nn.Parameter(torch.randn(8, 4))
    with pytest.raises(ValueError, match="fused=True, but .*pass fused=None"):
        Apollo([matrix], lr=1e-3, fused=True)
    Apollo([{"params": [matrix], "low_rank": False}], lr=1e-3, fused=True)  # AdamW groups use no kernels


def test_lr_is_read_each_step_and_closure_loss_returned():
    p = nn.Parameter(torch.randn(8, 4))
    opt = Apollo([p], lr=1e-2, rank=2)
    p.grad = torch.randn_like(p)
    assert opt.step(lambda: torch.tensor(3.0)) == 3.0
    before = p.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert torch.equal(p, before)


def test_projection_is_reproducible_and_distinct():
    q = projection(0, 3, 2, 8, 4096)
    assert q.shape == (4096, 8) and q.dtype == torch.float32
    assert torch.equal(q, projection(0, 3, 2, 8, 4096))
    assert abs(q.var().item() - 1 / 8) < 0.01
    for other in (projection(1, 3, 2, 8, 4096), projection(0, 4, 2, 8, 4096), projection(0, 3, 3, 8, 4096)):
        assert not torch.equal(q, other)
    assert projection(0, 3, 2, 8, 64, torch.bfloat16).dtype == torch.bfloat16


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_projection_and_syncs_once(dtype):
    torch.manual_seed(0)
    cpu = [nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES * 3]
    gpu = [nn.Parameter(p.detach().cuda()) for p in cpu]
    opts = [Apollo(ps, lr=1e-2, rank=4, update_proj_gap=3) for ps in (cpu, gpu)]
    for _ in range(5):
        for a, b in zip(cpu, gpu):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.cuda()
        opts[0].step()
        torch.cuda.set_sync_debug_mode("warn")
        with pytest.warns(UserWarning) as record:
            opts[1].step()
        torch.cuda.set_sync_debug_mode("default")
        assert len([w for w in record if "synchroniz" in str(w.message)]) == 1
    for a, b in zip(cpu, gpu):
        assert torch.equal(opts[0].state[a]["proj"], opts[1].state[b]["proj"].cpu())
        # in bf16 the CPU rounds projections to bf16, the CUDA kernels do not
        bf16 = {"rtol": 2e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(a, b.cpu(), **bf16)


@cuda
@pytest.mark.parametrize("preset", [APOLLO_MINI, {"rank": 4}, {"rank": 64}], ids=["mini", "rank4", "rank64"])
def test_cuda_fused_kernels_match_torch_ops(preset):
    fused = torch.randn(900, 160, device="cuda", dtype=torch.bfloat16)
    before = fused.clone()
    # buckets: oriented (160, 100) holds two row views, a strided view at an unaligned offset and a
    # standalone transposed matrix (three memory layouts); (400, 160) and (100, 80) one view each
    views = [fused.narrow(0, 0, 100), fused.narrow(0, 100, 100), fused.narrow(0, 200, 400),
             fused.narrow(0, 600, 80).narrow(1, 0, 100), fused.narrow(0, 700, 160).narrow(1, 7, 100)]
    standalone = nn.Parameter(torch.randn(100, 160, device="cuda", dtype=torch.bfloat16).T.contiguous().T)
    copies = [nn.Parameter(v.detach().clone()) for v in [*views, standalone]]
    for v in views:
        v.requires_grad_(True)
    opts = [Apollo([*views, standalone], lr=1e-3, weight_decay=0.1, **preset),
            Apollo(copies, lr=1e-3, weight_decay=0.1, fused=False, **preset)]
    for _ in range(5):
        for v, c in zip([*views, standalone], copies):
            v.grad = torch.randn_like(v)
            c.grad = v.grad.clone()
        for opt in opts:
            opt.step()
    for v, c in zip([*views, standalone], copies):
        torch.testing.assert_close(v, c, rtol=2e-2, atol=1e-3)
    assert all(v._base is fused for v in views)
    outside = torch.ones_like(fused, dtype=torch.bool)
    outside[:600] = False
    outside[600:680, :100] = False
    outside[700:860, 7:107] = False
    assert torch.equal(fused[outside], before[outside])
