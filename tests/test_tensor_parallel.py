"""Tensor parallelism on the CPU, without vLLM: two ranks (gloo) holding vLLM-style boxes of a tiny
model train the same job as one rank, and end with the same weights and optimizer state.

The boxes are cut here as vLLM cuts them (q/k/v and gate/up by rows, o_proj and down_proj by columns,
the padded vocabulary by rows, k and v copied when there are fewer KV heads than ranks); the end-to-end
tests in test_tensor_parallel_e2e.py take them from real vLLM.
Tolerance: float32 weights; the ranks sum row-parallel products in another order than one rank does, so
they agree to rounding, not bit for bit, which AdamW's per-element normalisation magnifies for gradients
near zero (a single element's update can flip sign). So the measure is the norm: after 6 steps each
tensor's difference from the one-rank result is at most 1 % of how far the job moved it (Frobenius
norms), and each optimizer state tensor's at most 1 % of its norm.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from apollo_train.shared.config import Settings
from worker.chat_tokens import Encoded
from worker.param_groups import make_optimizer
from worker.recipe import GROUP_OPS, Recipe
from worker.tensor_parallel.layers import parallelize
from worker.tensor_parallel.lockstep import Group
from worker.tensor_parallel.shards import Box, Shards
from worker.trainer import Trainer, batches
from worker.training_setup import Rank, make_trainer
from worker.views import Attached

EPOCHS = 3  # of 2 batches each
MAX_TOKENS = 32
LR = 1e-3
TOLERANCE = 0.01


def job() -> list[Encoded]:
    gen = torch.Generator().manual_seed(0)
    return [Encoded(torch.randint(0, 200, (n,), generator=gen).tolist(), n // 2, str(n)) for n in (12, 9, 15, 7)]


def vllm_boxes(model: torch.nn.Module, rank: int, size: int) -> dict[str, Box]:
    """The box of each parameter vLLM gives `rank` of `size`."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads
    boxes = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        full = tuple(p.shape)
        start, shape = [0] * p.dim(), list(full)
        if any(k in name for k in ("q_proj", "gate_proj", "up_proj")):
            shape[0] = full[0] // size
            start[0] = rank * shape[0]
        elif any(k in name for k in ("k_proj", "v_proj")):
            per_rank = max(kv // size, 1)
            head = rank * kv // size if kv >= size else rank // (size // kv)
            start[0], shape[0] = head * head_dim, per_rank * head_dim
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            shape[1] = full[1] // size
            start[1] = rank * shape[1]
        elif "embed_tokens" in name or "lm_head" in name:
            per = math.ceil(full[0] / 64) * 64 // size
            start[0] = min(rank * per, full[0])
            shape[0] = min(per, full[0] - start[0])
        boxes[name] = Box(tuple(start), tuple(shape), full)
    return boxes


def shard(model: torch.nn.Module, boxes: dict[str, Box]) -> None:
    """Replace each parameter by its box (tied ones stay one Parameter), as views.bind_views does."""
    done = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if id(p) not in done:
            done[id(p)] = torch.nn.Parameter(p.detach()[boxes[name].index()].clone())
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, done[id(p)])


def load(model_dir) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def one_rank(model_dir, optimizer: str) -> tuple[dict, dict]:
    model = load(model_dir)
    opt = make_optimizer(model, optimizer, LR)
    Trainer(model, opt, max_tokens_per_step=MAX_TOKENS).train(job(), epochs=EPOCHS)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, state_by_name(model, opt)


def state_by_name(model, opt) -> dict[str, dict]:
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()}


def rank_main(rank: int, size: int, model_dir: str, run_dir: str, optimizer: str, out: str) -> None:
    model = load(model_dir)
    boxes = vllm_boxes(model, rank, size)
    shard(model, boxes)
    group = Group(run_dir, rank, size, torch.device("cpu"))
    partial = parallelize(model, boxes)
    attached = Attached(model, model_dir, {"tp_size": size}, {}, boxes)
    me = Rank(attached, group, Shards(boxes, partial))
    settings = Settings(optimizer=optimizer, lr=LR, max_tokens_per_step=MAX_TOKENS)
    recipe = Recipe(run_dir, rank, settings)  # as Recipe.setup builds it, from these views
    recipe.me, recipe.model, recipe.trainer = me, model, make_trainer(me, settings)
    if rank == 0:  # every step is a group operation: announced, then run by every rank
        recipe.trainer.train(job(), epochs=EPOCHS, step=lambda tensors, lrs: recipe.call("train_step", tensors, lrs))
    else:
        for _ in range(EPOCHS * len(batches(job(), MAX_TOKENS))):
            op, args = group.receive()
            GROUP_OPS[op](recipe, *args)
    whole = {n: me.shards.gather(n, p.detach(), sum_shared=False) for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"weights": whole, "state": state_by_name(model, recipe.trainer.optimizer)}, out)
    dist.destroy_process_group()


def run_ranks(model_dir, tmp_path, optimizer: str) -> dict:
    out = tmp_path / "tp.pt"
    mp.spawn(rank_main, args=(2, str(model_dir), str(tmp_path), optimizer, str(out)), nprocs=2)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["copied-kv-head", "split-kv-heads"])
@pytest.mark.parametrize("optimizer", ["apollo", "apollo-mini", "adamw"])
def test_a_two_rank_step_equals_a_one_rank_step(tiny_model, tmp_path, optimizer, kv_heads):
    from apollo_train.tiny_models import build_tiny_model

    model_dir = tiny_model("qwen3") if kv_heads == 1 else build_tiny_model(
        tmp_path / "qwen3-kv2", "qwen3", num_key_value_heads=2)
    check_equal_steps(model_dir, tmp_path, optimizer)


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # q/k/v biases; tied embeddings split by vocabulary
def test_other_families_too(tiny_model, tmp_path, family):
    check_equal_steps(tiny_model(family), tmp_path, "apollo")


def check_equal_steps(model_dir, tmp_path, optimizer: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    weights, state = one_rank(model_dir, optimizer)
    tp = run_ranks(model_dir, tmp_path, optimizer)
    before = {n: p for n, p in load(model_dir).named_parameters()}
    for name, w in weights.items():
        moved = (w - before[name]).norm()
        assert moved > 0, f"{name} did not train"
        err = (tp["weights"][name] - w).norm()
        assert err <= TOLERANCE * moved, f"{name}: differs by {err:.2e}, moved by {moved:.2e} (Frobenius norms)"
    assert state.keys() == tp["state"].keys()
    for name, s in state.items():
        for key, value in s.items():
            err = (tp["state"][name][key] - value).float().norm()
            assert err <= TOLERANCE * value.float().norm(), (name, key, err)


def test_the_vocabulary_parallel_loss_is_the_whole_vocabularys(tmp_path):
    mp.spawn(_loss_rank, args=(2, str(tmp_path)), nprocs=2)


def _loss_rank(rank: int, size: int, run_dir: str) -> None:
    from worker.tensor_parallel.layers import VocabParallelHead

    torch.manual_seed(0)
    weight, hidden = torch.randn(10, 4), torch.randn(6, 4, requires_grad=True)
    targets = torch.tensor([0, 3, 5, 9, 7, 2])
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (grad_expected,) = torch.autograd.grad(expected, hidden)
    Group(run_dir, rank, size, torch.device("cpu"))
    head = VocabParallelHead(torch.nn.Parameter(weight[rank * 5:(rank + 1) * 5].clone()), rank * 5)
    loss = head.cross_entropy_sum(hidden, targets)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.allclose(loss, expected, atol=1e-5) and torch.allclose(grad, grad_expected, atol=1e-5)
    dist.destroy_process_group()
