"""A training rank other than 0: attach to its vLLM rank's shard and run what rank 0 calls.

Rank 0 owns everything a client sees (requests, jobs, the registry, checkpoints); a follower only holds
its shard's model, optimizer and trainer, built exactly as rank 0 builds them (worker/recipe.py), and
runs its part of each group operation rank 0 calls: the steps, the eval losses, the drift guard's
snapshot and rollback, a live restore.
It runs until it is stopped (SIGTERM) or a collective fails (another rank died, or it failed a step
itself and left): the supervisor then restarts the whole group. When vLLM or the settings refuse
training, every rank meets the same refusal: rank 0 reports it, and a follower waits to be stopped
rather than exit (which would restart the group again and again).
"""

from __future__ import annotations

import logging
import threading

from apollo_train.shared.config import Settings
from worker.recipe import Recipe
from worker.training_setup import TrainingRefused

log = logging.getLogger("apollo_train.worker")


def follow(run_dir: str, rank: int, settings: Settings) -> None:
    recipe = Recipe(run_dir, rank, settings)
    try:
        recipe.setup()
    except TrainingRefused as exc:  # every rank meets it: rank 0 reports it; this rank waits to be stopped
        log.error("rank %d: training is unavailable: %s", rank, exc)
        threading.Event().wait()
        return
    log.info("tensor-parallel rank %d ready", rank)
    recipe.follow()
