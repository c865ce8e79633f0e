"""A mixture of experts' weights in the two layouts that meet here: transformers holds each layer's experts as
stacks (`...experts.gate_up_proj` [experts, 2 x intermediate, hidden], `...experts.down_proj` [experts,
hidden, intermediate]), checkpoints (and vLLM's weight loaders) one tensor per expert and projection
(`...experts.3.gate_proj.weight`). Random weights drawn inside vLLM and the worker's checkpoints go from the
first to the second; the worker's views and restores read placements and checkpoints by the second.
"""

from __future__ import annotations

EXPERT_STACKS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def as_checkpoint_tensors(tensors: dict, weight_map: dict[str, str] | None = None) -> dict:
    """`tensors` (a transformers state dict, or part of one) named as a checkpoint names them: each expert
    stack split into one tensor per expert and projection, wherever `weight_map` (a checkpoint's names) holds
    the stack so, or always (None). The parts are views, not copies."""
    out = {}
    for name, t in tensors.items():
        prefix, _, stack = name.rpartition(".")
        parts = EXPERT_STACKS.get(stack) if prefix.endswith("experts") and t.ndim == 3 else None
        if parts is None or (weight_map is not None and (
                name in weight_map or f"{prefix}.0.{parts[0]}.weight" not in weight_map)):
            out[name] = t
            continue
        for e in range(t.shape[0]):
            for part, piece in zip(parts, t[e].chunk(len(parts), dim=0)):
                out[f"{prefix}.{e}.{part}.weight"] = piece
    return out
