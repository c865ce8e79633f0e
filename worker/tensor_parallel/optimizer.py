"""APOLLO on tensor-parallel shards, giving the very update of one rank.

APOLLO's projection, channel scales and norm-growth limiter each read a whole matrix. Rather than
reduce each of them across ranks, a shard's step assembles the whole gradient and weight from every
rank (one all-gather each, one parameter at a time inside the backward pass, so only one whole matrix
exists at once), runs the one-rank step on them, and keeps its own box. Every rank computes the same
step on the same values, so the ranks' optimizer states are identical, each equal to the one-rank state
(saved and restored as such, at any tensor-parallel size); replicated parameters (norms) are stepped
where they are, after their gradients are combined.
Costs, per step: the all-gathers (twice the weights' bytes per rank) and each rank repeating the
optimizer's small math for the whole matrix.
"""

from __future__ import annotations

import torch

from worker.optim import Apollo
from worker.tensor_parallel.shards import Shards


class ShardedApollo(Apollo):
    """Apollo for one tensor-parallel rank's parameters; ``names`` maps them to the names in ``shards``."""

    whole_model_step = False  # parameters are stepped inside the backward pass only (see step)

    def __init__(self, params, *, shards: Shards, names: dict[torch.Tensor, str], **kw):
        self.shards, self.names = shards, names
        super().__init__(params, **kw)

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        name = self.names[p]
        partial = name in self.shards.partial
        if not self.shards.sharded(name):
            self.shards.reduce_replicated(name, p.grad)
            super().step_param(p)
            return
        weight = self.shards.gather(name, p.data, sum_shared=False)
        grad = self.shards.gather(name, p.grad, sum_shared=partial)
        self._step_tensors([(p, weight, grad)])
        p.data.copy_(self.shards.local(name, weight))

    def step_params(self, params) -> None:
        """One at a time: each shard's whole matrix is gathered for its own step (see the module)."""
        for p in params:
            self.step_param(p)

    def state_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        return self.shards.boxes[self.names[p]][0].full_shape

    def step(self, closure=None):
        raise RuntimeError("at tensor parallel size > 1 parameters are stepped inside the backward pass "
                           "(step_param); the whole-model step is not available")
