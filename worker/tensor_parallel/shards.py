"""Where each weight lives across the ranks, and the whole tensor assembled from the ranks' boxes.

vLLM gives each rank a box of every checkpoint tensor: a range of rows (column-parallel layers, the
vocabulary), a range of columns (row-parallel layers), or all of it (norms; k and v when there are
fewer KV heads than ranks, each rank then holding a copy of the heads its queries use). The ranks
exchange their boxes once; a gather then rebuilds the whole tensor from the ranks' parts.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Box:
    """The block of a checkpoint tensor of `full_shape` that starts at `start` and has `shape`."""

    start: tuple[int, ...]
    shape: tuple[int, ...]
    full_shape: tuple[int, ...]

    @property
    def whole(self) -> bool:
        return self.shape == self.full_shape

    def split_dim(self) -> int | None:
        """The one dimension the box cuts (None: the whole tensor)."""
        dims = [d for d, (n, full) in enumerate(zip(self.shape, self.full_shape)) if n != full]
        if len(dims) > 1:
            raise ValueError(f"a box of {list(self.full_shape)} cut along {len(dims)} dimensions")
        return dims[0] if dims else None

    def index(self) -> tuple[slice, ...]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.shape))


class Shards:
    """Every rank's box of each of this rank's parameters (by HF name), exchanged once at start.

    ``partial`` names the parameters whose gradient on one rank covers only that rank's heads (replicated
    tensors inside attention or MLP blocks, whose activations are per rank): their gradients are summed over
    the ranks holding the same box. Other replicated tensors get the same gradient on every rank."""

    def __init__(self, boxes: dict[str, Box], partial: set[str], group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        everyone: list[dict[str, Box] | None] = [None] * self.size
        dist.all_gather_object(everyone, boxes, group=group)
        if any(set(b) != set(boxes) for b in everyone):
            raise RuntimeError("tensor-parallel ranks hold different parameters")
        self.boxes = {name: [b[name] for b in everyone] for name in boxes}
        self.partial = partial

    def sharded(self, name: str) -> bool:
        """Whether the ranks hold different parts (not all the whole tensor)."""
        return not all(b.whole for b in self.boxes[name])

    def gather(self, name: str, local: torch.Tensor, sum_shared: bool) -> torch.Tensor:
        """The whole tensor from every rank's part of it; parts of the same box are summed when
        ``sum_shared`` (gradients of partial parameters), else taken once (they are equal)."""
        boxes = self.boxes[name]
        width = max(math.prod(b.shape) for b in boxes)
        send = local.new_zeros(width)
        send[: local.numel()] = local.reshape(-1)
        raw = send.view(torch.uint8)  # a gather only moves bytes, in every dtype the backends know or not
        parts = [torch.empty_like(raw) for _ in boxes]
        dist.all_gather(parts, raw, group=self.group)
        full = local.new_zeros(boxes[0].full_shape)
        seen: set[Box] = set()
        for part, box in zip(parts, boxes):
            value = part.view(local.dtype)[: math.prod(box.shape)].view(box.shape)
            if box not in seen:
                full[box.index()] = value
                seen.add(box)
            elif sum_shared:
                full[box.index()] += value
        return full

    def local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's box of a whole tensor."""
        return full[self.boxes[name][self.rank].index()]

    def reduce_replicated(self, name: str, grad: torch.Tensor) -> None:
        """In place: a replicated parameter's gradient summed over the ranks (partial ones) or averaged (the
        same on every rank up to rounding; averaging keeps the copies bit-identical)."""
        total = grad.float()
        dist.all_reduce(total, group=self.group)
        grad.copy_(total if name in self.partial else total / self.size)
