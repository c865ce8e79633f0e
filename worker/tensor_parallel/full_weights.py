"""Whole tensors for checkpoints, read from every rank's shards by rank 0.

A checkpoint is a normal HF directory, so rank 0 needs each tensor whole. It maps every rank's shared
weights read-only once (shared memory on CPU, CUDA IPC on GPU), and a snapshot copies each rank's box of
each tensor into one host tensor, between steps, as at one rank; the other ranks take no part.
"""

from __future__ import annotations

import os

import torch

from apollo_train.shared import handles
from worker.tensor_parallel.shards import Box


class AllRanks:
    """Rank 0's views of every rank's box of every checkpoint tensor."""

    def __init__(self, run_dir: str | os.PathLike, size: int):
        self.ranks: list[dict[str, tuple[torch.Tensor, Box]]] = []
        for rank in range(size):
            content = handles.read(handles.handles_path(run_dir, rank))
            tensors = {name: handles.open_shared(entry) for name, entry in content["params"].items()}
            self.ranks.append({
                name: (handles.region(tensors[e["param"]], e["offset"], e["shape"]),
                       Box(tuple(e["start"]), tuple(e["shape"]), tuple(e["full_shape"])))
                for name, e in content["checkpoint"].items()})

    def snapshot(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state dict in host memory, by the names ``model`` (a rank's model) uses;
        tied names share one tensor."""
        source = {}  # parameter -> the name vLLM's placements know it by
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in self.ranks[0]:
                source.setdefault(p, name)
        out, done = {}, {}
        for name, t in model.state_dict(keep_vars=True).items():
            if t in source and t not in done:
                _, box = self.ranks[0][source[t]]
                whole = torch.empty(box.full_shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
                for views in self.ranks:
                    view, box = views[source[t]]
                    whole[box.index()].copy_(view)
                done[t] = whole
            out[name] = done[t] if t in done else t.detach().to("cpu", copy=True)
        return out
