"""Jobs: bounded queue, cancellation, what a finished job keeps, across a restart too; the run dir's shared words."""

from __future__ import annotations

import math

import pytest

from apollo_train.shared.protocol import Busy, Conflict, NotFound
from apollo_train.shared.serving_load import serving_load
from apollo_train.shared.weight_version import WeightVersion
from worker.jobs import CheckpointWork, Job, JobQueue, TrainWork


def train_work(encoded: list) -> TrainWork:
    return TrainWork(encoded=encoded, epochs=1, lr=None, keys=[])


def test_queue_is_bounded_and_cancellable():
    q = JobQueue(size=2)
    a, b = Job.of(train_work([1])), Job.of(train_work([2]))
    q.put(a)
    q.put(b)
    with pytest.raises(Busy, match="queue is full"):
        q.put(Job.of(train_work([3])))
    assert q.cancel(b.id).state == "cancelled" and len(q) == 1 and b.work.encoded is None
    with pytest.raises(Conflict, match="already finished"):
        q.cancel(b.id)
    with pytest.raises(NotFound):
        q.cancel("nope")
    running = q.get()
    assert running is a and running.state == "running"
    assert q.cancel(a.id) is a and a.cancel_requested and a.state == "running"  # stops after its step


def test_a_finished_job_drops_its_tokens_and_reports_nan_as_null():
    job = Job.of(train_work([[1, 2, 3]]))
    job.result = {"losses": [1.5, math.nan, math.inf]}
    job.finish("done")
    assert job.work.encoded is None
    public = job.public()
    assert public["losses"] == [1.5, None, None] and public["state"] == "done" and public["finished"]


def test_weight_version_is_shared_through_the_run_dir(tmp_path):
    reader = WeightVersion(tmp_path)
    assert reader.read() == 0  # no worker yet
    writer = WeightVersion(tmp_path, create=True)
    assert writer.bump() == 1 and writer.bump() == 2
    assert reader.read() == 2 and WeightVersion(tmp_path).read() == 2


def test_jobs_outlive_a_restart_of_the_worker(tmp_path):
    """A failed job keeps its status across a restart; one the dead worker never finished is failed with
    the reason, not unknown."""
    journal = tmp_path / "jobs.journal"
    q = JobQueue(size=4, journal_path=journal)
    failed, running, queued = Job.of(train_work([1])), Job.of(train_work([2])), Job.of(CheckpointWork(target=None))
    for job in (failed, running, queued):
        q.put(job)
    q.get().finish("failed", "the job ran out of GPU memory")
    q.get()  # running when the worker dies
    q.get().result["path"] = "/x"  # its result so far is not journaled until it finishes

    again = JobQueue(size=4, journal_path=journal)
    assert again.job(failed.id).public() == failed.public()
    lost = again.job(running.id).public()
    assert lost["state"] == "failed" and "exited before this job finished" in lost["error"]
    assert again.job(queued.id).state == "failed" and len(again) == 0  # nothing of the dead worker's runs again
    assert JobQueue(size=4, journal_path=journal).job(running.id).error == lost["error"]  # stays failed


def test_serving_load_is_shared_through_the_run_dir(tmp_path):
    reader = serving_load(tmp_path)
    assert reader.read() == 0  # no router yet: idle
    writer = serving_load(tmp_path, create=True)
    writer.write(32)
    assert reader.read() == 32
