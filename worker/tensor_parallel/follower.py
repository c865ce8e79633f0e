"""A training rank other than 0: attach to its vLLM rank's shard and run the steps rank 0 announces.

Rank 0 owns everything a client sees (requests, jobs, the registry, checkpoints); a follower only holds
its shard's model, optimizer and trainer, built exactly as rank 0 builds them, and its part of each step.
It runs until it is stopped (SIGTERM) or a collective fails (another rank died, or it failed a step
itself and left): the supervisor then restarts the whole group.
"""

from __future__ import annotations

import logging
from pathlib import Path

from apollo_train.shared.config import Settings, resolve_model_dir
from worker import persist
from worker.registry import DedupeRegistry
from worker.replay import ReplayBuffer
from worker.tensor_parallel.lockstep import StepNotTaken
from worker.training_setup import attach_rank, make_trainer

log = logging.getLogger("apollo_train.worker")


def follow(run_dir: str, rank: int, settings: Settings) -> None:
    me = attach_rank(run_dir, rank, settings)
    trainer = make_trainer(me, settings)
    model_path = str(resolve_model_dir(me.attached.metadata["model_path"]))
    # the optimizer state rank 0 restores (the ranks' states are identical); rank 0 keeps the rest
    _, warning = persist.restore(trainer.model, trainer.optimizer, DedupeRegistry(None), ReplayBuffer(0),
                                 model_path, Path(settings.state_dir))
    if warning:
        log.warning("rank %d: %s", rank, warning)
    log.info("tensor-parallel rank %d ready", rank)
    while True:
        _, args = me.group.receive()
        try:
            trainer.follow(*args)
        except StepNotTaken as exc:  # rank 0 reports it with the job
            log.warning("rank %d: %s", rank, exc)
