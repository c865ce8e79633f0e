"""A training rank other than 0: attach to its vLLM rank's shard and run what rank 0 announces.

Rank 0 owns everything a client sees (requests, jobs, the registry, checkpoints); a follower only holds
its shard's model, optimizer and trainer, built exactly as rank 0 builds them, and does its part of each
step, eval loss, rollback and restore.
It runs until it is stopped (SIGTERM) or a collective fails (another rank died, or it failed a step
itself and left): the supervisor then restarts the whole group. When vLLM or the settings refuse
training, every rank meets the same refusal: rank 0 reports it, and a follower waits to be stopped
rather than exit (which would restart the group again and again).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from apollo_train.shared.config import Settings, resolve_model_dir
from apollo_train.shared.protocol import Conflict
from worker import drift, persist
from worker.registry import DedupeRegistry
from worker.replay import ReplayBuffer
from worker.tensor_parallel.lockstep import Group, StepNotTaken
from worker.trainer import Trainer
from worker.training_setup import Rank, Refused, attach_rank, make_trainer

log = logging.getLogger("apollo_train.worker")


def follow(run_dir: str, rank: int, settings: Settings) -> None:
    try:
        me = attach_rank(run_dir, rank, settings)
    except Refused as exc:  # every rank meets it: rank 0 reports it; this rank waits to be stopped
        log.error("rank %d: training is unavailable: %s", rank, exc)
        threading.Event().wait()
        return
    trainer = make_trainer(me, settings)
    model_path = str(resolve_model_dir(me.attached.metadata["model_path"]))
    # the optimizer state rank 0 restores (the ranks' states are identical); rank 0 keeps the rest
    _, warning = persist.restore(trainer.model, trainer.optimizer, DedupeRegistry(None), ReplayBuffer(0),
                                 model_path, Path(settings.state_dir))
    if warning:
        log.warning("rank %d: %s", rank, warning)
    log.info("tensor-parallel rank %d ready", rank)
    Follower(me, trainer, Path(settings.state_dir)).run()


class Follower:
    """Runs what rank 0 announces, on this rank's shard: the trainer's steps and losses, the drift guard's
    snapshot, rollback and release, a live restore."""

    def __init__(self, me: Rank, trainer: Trainer, state_dir: Path):
        self.me, self.trainer, self.state_dir = me, trainer, state_dir
        self.snapshot: drift.Snapshot | None = None
        self.ops = {Group.STEP: trainer.follow, Group.LOSS: trainer.batch_loss, Group.SNAPSHOT: self.take_snapshot,
                    Group.ROLLBACK: self.rollback, Group.FORGET: self.forget, Group.RESTORE: self.restore}

    def run(self) -> None:
        while True:
            op, args = self.me.group.receive()
            try:
                self.ops[op](*args)
            except (StepNotTaken, Conflict) as exc:  # rank 0 meets the same and reports it with the job
                log.warning("rank %d: %s", self.me.group.rank, exc)

    def take_snapshot(self) -> None:
        self.snapshot = drift.Snapshot(self.trainer.model, self.trainer.optimizer)

    def rollback(self) -> None:
        with self.trainer.writing_weights():
            self.snapshot.restore(self.trainer.model, self.trainer.optimizer)
        self.snapshot = None

    def forget(self) -> None:
        self.snapshot = None

    def restore(self, checkpoint_dir: str) -> None:
        persist.restore_live(model=self.trainer.model, optimizer=self.trainer.optimizer,
                             registry=DedupeRegistry(None), replay=ReplayBuffer(0),
                             checkpoint_dir=Path(checkpoint_dir), state_dir=self.state_dir,
                             writing=self.trainer.writing_weights, boxes=self.me.attached.boxes)
