"""Jobs and the queue that orders them: what `/train/status?job_id=` and `/train/cancel` see.

The control thread puts jobs in and answers about them; the training thread takes them out one at
a time. A queued job can be cancelled at once; a running one is marked and stops after its current
step. The last MAX_JOBS_KEPT jobs are remembered, without their tokens once they finish, and, with a
journal in the run dir, across a restart of the worker: a job that was queued or running when the worker
died is then reported failed, with the reason, instead of unknown.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

from apollo_train.shared.answers import FINISHED
from apollo_train.shared.protocol import Busy, Conflict, NotFound
from worker.journal import Journal

MAX_JOBS_KEPT = 1000
LOST = ("the training worker exited before this job finished, and was restarted (the server's log says why); "
        "the steps it took are kept, and its examples may be posted again")
FIELDS = ("kind", "state", "created", "started", "finished", "error")


class Cancelled(Exception):
    """Raised in the training thread to stop a job whose cancellation was asked for."""


@dataclasses.dataclass
class TrainWork:
    encoded: list | None  # the examples' tokens (worker.chat_tokens.Encoded); dropped once the job is done
    epochs: int
    lr: float | None
    keys: list[str]  # their dedupe keys, held as pending while the job is queued or running


@dataclasses.dataclass
class CheckpointWork:
    target: object  # worker.checkpoint_target.Target


@dataclasses.dataclass
class RestoreWork:
    path: Path


WORK_KINDS = {TrainWork: "train", CheckpointWork: "checkpoint", RestoreWork: "restore"}


@dataclasses.dataclass
class Job:
    kind: str  # "train" | "checkpoint" | "restore"
    work: TrainWork | CheckpointWork | RestoreWork | None  # None: read back from the journal
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: str = "queued"  # queued | running | done | failed | cancelled | rolled_back
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result: dict = dataclasses.field(default_factory=dict)
    cancel_requested: bool = False
    cancel_reason: str | None = None  # why it was stopped, when not by /train/cancel
    on_finish: Callable[["Job"], None] | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def of(cls, work: TrainWork | CheckpointWork | RestoreWork, **fields) -> "Job":
        return cls(WORK_KINDS[type(work)], work, **fields)

    @property
    def keys(self) -> list[str]:
        """The dedupe keys of a training job's examples (none for other jobs)."""
        return self.work.keys if isinstance(self.work, TrainWork) else []

    def finish(self, state: str, error: str | None = None) -> None:
        self.state, self.error, self.finished = state, error, time.time()
        if isinstance(self.work, TrainWork):
            self.work.encoded = None  # tokens are ~9x the request's text: not kept once done
        if self.on_finish is not None:
            self.on_finish(self)

    def public(self) -> dict:
        out = {k: getattr(self, k) for k in FIELDS}
        return {"job_id": self.id, **out, **_json_safe(self.result)}

    @classmethod
    def from_public(cls, record: dict) -> "Job":
        """A job as `public()` described it (read back from the journal)."""
        result = {k: v for k, v in record.items() if k not in FIELDS and k != "job_id"}
        return cls(work=None, id=record["job_id"], result=result, **{k: record[k] for k in FIELDS})


class JobQueue:
    def __init__(self, size: int, journal_path: str | os.PathLike | None = None):
        """`journal_path`: where the jobs' states are kept across a restart of the worker (None: in memory)."""
        self.size = size
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._cond = threading.Condition()
        self._journal = Journal(journal_path) if journal_path is not None else None
        self._recorded = 0
        if self._journal is not None:
            self._reload()

    def _reload(self) -> None:
        """The jobs of the worker that ran before this one; those it did not finish are failed (LOST)."""
        for line in self._journal.lines:
            record = json.loads(line)
            self._jobs[record["job_id"]] = Job.from_public(record)
            self._jobs.move_to_end(record["job_id"])
        while len(self._jobs) > MAX_JOBS_KEPT:
            self._jobs.popitem(last=False)
        for job in self._jobs.values():
            if job.state not in FINISHED:
                job.state, job.error, job.finished = "failed", LOST, time.time()
            job.on_finish = self._record
        self._journal.rewrite(json.dumps(job.public()) for job in self._jobs.values())
        self._recorded = len(self._jobs)

    def _record(self, job: Job) -> None:
        if self._journal is None:
            return
        with self._cond:
            self._journal.append([json.dumps(job.public())])
            self._recorded += 1
            if self._recorded > 2 * MAX_JOBS_KEPT:  # a line per change: keep the file to the jobs kept
                self._journal.rewrite(json.dumps(j.public()) for j in self._jobs.values())
                self._recorded = len(self._jobs)

    def put(self, job: Job, first: bool = False) -> None:
        """Queue a job at the end, or (`first`) ahead of every queued job."""
        with self._cond:
            if len(self._queue) >= self.size:
                raise Busy(f"the training queue is full ({self.size} jobs); retry later")
            if first:
                self._queue.appendleft(job)
            else:
                self._queue.append(job)
            self.remember(job)
            self._cond.notify()

    def get(self) -> Job:
        """The next job, marked running (blocks until there is one)."""
        with self._cond:
            while not self._queue:
                self._cond.wait()
            job = self._queue.popleft()
            job.state, job.started = "running", time.time()
            return job

    def remember(self, job: Job) -> None:
        with self._cond:
            self._jobs[job.id] = job
            while len(self._jobs) > MAX_JOBS_KEPT:
                self._jobs.popitem(last=False)
            job.on_finish = self._record
            self._record(job)

    def job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"unknown job id {job_id!r}")
        return job

    def cancel(self, job_id: str) -> Job:
        with self._cond:
            job = self.job(job_id)
            if job.state in FINISHED:
                raise Conflict(f"job {job_id} has already finished ({job.state})")
            if job.state == "queued":
                self._queue.remove(job)
                job.finish("cancelled")
            else:
                job.cancel_requested = True
            return job

    def __len__(self) -> int:
        return len(self._queue)


def _json_safe(value):
    """JSON has no NaN or infinity: a non-finite loss is reported as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
