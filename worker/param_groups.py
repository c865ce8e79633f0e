"""Which parameters the optimizer projects, and the optimizers the worker offers by name.

The optimizer (worker.optim) updates whatever groups it is given; deciding that every matrix (the
linear layers' weights, the input embeddings and the output head) gets a low-rank projection while
1-D tensors (norms, biases) and other shapes get AdamW is a property of transformer models, so it
lives here. The embeddings and the head are projected too, unlike in the APOLLO paper's recipe: with
AdamW their fp32 moments are most of the state of a large model (11.6 GiB of Qwen3-32B's 15 GiB), and
projected they cost 2 x `rank` floats per vocabulary row. Their update stays row-sparse where the
gradient is: APOLLO's update is the gradient scaled per row, so a token absent from a step leaves its
embedding row untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from apollo_train.shared.config import OPTIMIZERS
from worker.optim import APOLLO_MINI, DEFAULT_RANK, Apollo

PRESETS = {
    "apollo": {"rank": DEFAULT_RANK, "scale_type": "channel"},
    "apollo-mini": APOLLO_MINI,
    "adamw": {"eps": 1e-8},  # torch.optim.AdamW's eps; every group low_rank=False
}


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a module whose class name ends in Linear (vLLM's parallel linear layers)."""
    return isinstance(module, nn.Linear) or type(module).__name__.endswith("Linear")


def _is_experts(module: nn.Module) -> bool:
    """A mixture of experts' fused expert weights (transformers' Qwen3MoeExperts, ...): 3-D stacks."""
    return type(module).__name__.endswith("Experts")


def param_groups_for(model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]], *,
                     weight_decay: float = 0.0, **low_rank_options) -> list[dict]:
    """Split trainable parameters into an APOLLO group and AdamW groups.

    APOLLO: 2-D weights of linear layers, and the vocabulary matrices (input embeddings, output head) in
    a group of their own with one scale per row (``scale_type="channel"``, whatever the preset's): a row's
    gradient is there only in the steps whose tokens use it, so rows get scales of their own. For a module:
    nn.Linear-like and nn.Embedding modules and the input and output embeddings; for (name, param) pairs:
    2-D tensors named ``*weight``, the vocabulary ones named ``*embed*`` or ``lm_head*``. AdamW: everything
    else; weight decay only for tensors with ndim >= 2, none for biases, norms and other 1-D tensors.
    ``low_rank_options`` (rank, scale_type, ...) go into the APOLLO groups. A mixture of experts' fused
    expert weights ([experts, m, n] stacks: 3-D parameters of modules named ``*Experts``; for pairs,
    3-D tensors named ``*.experts.*``) form a third APOLLO group with ``experts=True``: each expert is
    projected as a matrix of its own, and only the experts a step routed tokens to are stepped.
    """
    if isinstance(model_or_named_params, nn.Module):
        model = model_or_named_params
        named = list(model.named_parameters())
        stacks = {id(p) for m in model.modules() if _is_experts(m) for p in m.parameters(recurse=False) if p.ndim == 3}
        matrices = {id(m.weight) for m in model.modules()
                    if _is_linear(m) and isinstance(m.weight, torch.Tensor)}
        vocabulary = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for get in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, get, lambda: None)()
            if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
                vocabulary.add(id(module.weight))
    else:
        named = list(model_or_named_params)
        stacks = {id(p) for name, p in named if ".experts." in name and p.ndim == 3}
        vocabulary = {id(p) for name, p in named if "embed" in name or name.startswith("lm_head")}
        matrices = {id(p) for name, p in named if name.endswith("weight")} - vocabulary

    low, rows, experts, dense_decay, dense = [], [], [], [], []
    for _, p in named:
        if not p.requires_grad:
            continue
        if id(p) in stacks:
            experts.append(p)
        elif p.ndim == 2 and id(p) in vocabulary:
            rows.append(p)
        elif p.ndim == 2 and id(p) in matrices:
            low.append(p)
        elif p.ndim >= 2:
            dense_decay.append(p)
        else:
            dense.append(p)
    groups = [{"params": low, "low_rank": True, "weight_decay": weight_decay, **low_rank_options},
              {"params": rows, "low_rank": True, "weight_decay": weight_decay, **low_rank_options,
               "scale_type": "channel"},
              {"params": experts, "low_rank": True, "experts": True, "weight_decay": weight_decay,
               **low_rank_options},
              {"params": dense_decay, "low_rank": False, "weight_decay": weight_decay},
              {"params": dense, "low_rank": False, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, name: str, lr: float, shards=None, **kw) -> Apollo:
    """One of OPTIMIZERS for ``model``'s trainable parameters, always an Apollo (fp32 moments, and a step
    whose gradient or update is not finite is skipped).

    "apollo": rank DEFAULT_RANK, channel scaling; "apollo-mini": APOLLO_MINI; "adamw": every group
    AdamW (``low_rank=False``), with torch.optim.AdamW's eps. ``kw`` goes to Apollo; ``weight_decay``
    also picks groups (none for 1-D tensors). With ``shards`` (a tensor-parallel rank's
    worker.tensor_parallel.shards.Shards) each shard is stepped as its whole matrix (ShardedApollo).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}, expected one of {OPTIMIZERS}")
    groups = param_groups_for(model, weight_decay=kw.pop("weight_decay", 0.0))
    if name == "adamw":
        groups = [{**g, "low_rank": False} for g in groups]
    options = {**PRESETS[name], **kw}
    if shards is None:
        return Apollo(groups, lr=lr, **options)
    from worker.tensor_parallel.optimizer import ShardedApollo

    names = {p: n for n, p in model.named_parameters()}
    return ShardedApollo(groups, shards=shards, names=names, lr=lr, **options)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of tensors in ``opt.state``, also those held by objects there (the reference's projector)."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)
        elif hasattr(value, "__dict__"):
            yield from (v for v in vars(value).values() if isinstance(v, torch.Tensor))

    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in tensors(s))
