"""What every training rank builds at start: its view model, and the optimizer and trainer over it.

Rank 0 (the worker the router talks to) and, under tensor parallelism, the other ranks (followers)
build the same things from the same settings, so the ranks' parameter groups, and so their collectives,
line up.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

from apollo_train.shared.config import Settings
from worker.param_groups import make_optimizer
from worker.tensor_parallel.layers import parallelize
from worker.tensor_parallel.lockstep import Group, LockstepHooks
from worker.tensor_parallel.shards import Shards
from worker.trainer import StepHooks, Trainer
from worker.views import Attached, AttachError, attach, read_handles

ATTACH_TIMEOUT_S = 600  # vLLM writes the handles once its weights are loaded


@dataclasses.dataclass
class Rank:
    attached: Attached
    group: Group | None = None  # None: one rank
    shards: Shards | None = None


class TrainingRefused(Exception):
    """Training is refused before the ranks meet (by vLLM, or by the settings): every rank finds the same."""


def attach_rank(run_dir: str | os.PathLike, rank: int, settings: Settings,
                checksums: Callable[[], list[dict] | None] | None = None) -> Rank:
    """Attach to vLLM rank `rank`'s weights; under tensor parallelism join the training group and make the
    model tensor-parallel. `checksums()` (rank 0) gives every vLLM rank's current weight checksums, which
    rank 0 hands to the others."""
    try:
        content = read_handles(run_dir, rank, timeout=ATTACH_TIMEOUT_S)
        meta = content["__metadata__"]
        size, device = meta["tp_size"], torch.device(meta["device"])
        if size > 1:
            check_tensor_parallel(settings, size)
    except AttachError as exc:
        raise TrainingRefused(str(exc)) from None
    group = Group(run_dir, rank, size, device) if size > 1 else None
    if rank == 0:
        per_rank = checksums() if checksums else None
        if group is not None:
            group.announce(Group.CHECKSUMS, per_rank)
    else:
        _, (per_rank,) = group.receive()
    attached = attach(run_dir, checksums=lambda: per_rank[rank] if per_rank else None, rank=rank, content=content)
    if group is None:
        return Rank(attached)
    return Rank(attached, group, Shards(attached.boxes, parallelize(attached.model, attached.boxes)))


def check_tensor_parallel(settings: Settings, size: int) -> None:
    """Refuse, with the fix, settings that tensor-parallel training does not offer."""
    if not settings.step_in_backward:
        raise AttachError(f"at tensor parallel size {size} parameters are stepped inside the backward pass; "
                          f"remove --no-train-step-in-backward (APOLLO_TRAIN_STEP_IN_BACKWARD=0)")


def make_trainer(rank: Rank, settings: Settings, hooks: StepHooks | None = None, governor=None) -> Trainer:
    """The optimizer and trainer over a rank's model, from the settings (the same on every rank); `governor`
    (rank 0) yields the GPU to serving (worker/governor.py)."""
    model = rank.attached.model
    if settings.freeze_embeddings:
        # Fewer parameters to move, and more recall at less drift in the small-model study (docs/learning-quality.md).
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)
    optimizer = make_optimizer(model, settings.optimizer, settings.learning_rate, shards=rank.shards)
    if rank.group is not None:
        hooks = LockstepHooks(rank.group, hooks)
    return Trainer(model, optimizer, max_tokens_per_step=settings.max_tokens_per_step, hooks=hooks,
                   step_in_backward=settings.step_in_backward,
                   activation_checkpointing=settings.activation_checkpointing,
                   governor=governor)
