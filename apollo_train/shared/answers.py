"""The training API's answers, defined once: the worker builds them, the router documents them in
the OpenAPI schema, the examples there are checked against them, and the client commands read them.

The request models live in schema.py; these are what comes back: a job's state (`GET /train/status
?job_id=`, and every route that answers with a job) and the worker's status (`GET /train/status`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "rolled_back")
FINISHED = ("done", "failed", "cancelled", "rolled_back")  # a job in one of these states changes no more
PHASES = ("starting", "idle", "training", "checkpointing", "restoring", "error")


class JobAnswer(BaseModel):
    """A job. Besides these fields, a job carries what its kind reports: a training job `accepted`,
    `skipped_duplicates`, `losses`, `steps`, `tokens`, `input_tokens`, ...; a checkpoint `checkpoint_id`,
    `path`, `bytes`; a restore the counters it brought back (docs/api.md)."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    kind: Literal["train", "checkpoint", "restore"]
    state: Literal["queued", "running", "done", "failed", "cancelled", "rolled_back"]
    created: float
    started: float | None
    finished: float | None
    error: str | None


class OptimizerAnswer(BaseModel):
    name: str
    rank: int | None
    lr: float
    state_bytes: int


class StatusAnswer(BaseModel):
    """The worker's status, as the worker answers it (the router adds `worker`, the supervisor's view)."""

    model_config = ConfigDict(extra="forbid")

    state: Literal["starting", "idle", "training", "checkpointing", "restoring", "error"]
    error: str | None
    warning: str | None
    model: str | None
    step: int
    examples_trained: int
    tokens_trained: int
    input_tokens: int
    last_loss: float | None
    queue: int
    tokenizing: int
    optimizer: OptimizerAnswer | None
    mode: Literal["hogwild", "barrier"]
    busy_share: float
    step_in_backward: bool
    serving_requests: int
    yielded_s: float
    tensor_parallel_size: int
    checkpoint_root: str | None
    last_checkpoint: dict | None
    checkpoint_in_progress: dict | None
    registry_size: int
    replay_size: int
    eval_loss: float | None
    gpu_memory: dict | None
    worker: dict | None = None
