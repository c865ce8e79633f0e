"""Jobs: bounded queue, cancellation, what a finished job keeps."""

from __future__ import annotations

import math

import pytest

from apollo_train.shared.protocol import Busy, Conflict, NotFound
from apollo_train.shared.weight_version import WeightVersion
from worker.jobs import Job, JobQueue


def test_queue_is_bounded_and_cancellable():
    q = JobQueue(size=2)
    a, b = Job("train", {"encoded": [1]}), Job("train", {"encoded": [2]})
    q.put(a)
    q.put(b)
    with pytest.raises(Busy, match="queue is full"):
        q.put(Job("train", {}))
    assert q.cancel(b.id).state == "cancelled" and len(q) == 1 and "encoded" not in b.payload
    with pytest.raises(Conflict, match="already finished"):
        q.cancel(b.id)
    with pytest.raises(NotFound):
        q.cancel("nope")
    running = q.get()
    assert running is a and running.state == "running"
    assert q.cancel(a.id) is a and a.cancel_requested and a.state == "running"  # stops after its step


def test_a_finished_job_drops_its_tokens_and_reports_nan_as_null():
    job = Job("train", {"encoded": [[1, 2, 3]], "epochs": 1})
    job.result = {"losses": [1.5, math.nan, math.inf]}
    job.finish("done")
    assert "encoded" not in job.payload
    public = job.public()
    assert public["losses"] == [1.5, None, None] and public["state"] == "done" and public["finished"]


def test_weight_version_is_shared_through_the_run_dir(tmp_path):
    reader = WeightVersion(tmp_path)
    assert reader.read() == 0  # no worker yet
    writer = WeightVersion(tmp_path, create=True)
    assert writer.bump() == 1 and writer.bump() == 2
    assert reader.read() == 2 and WeightVersion(tmp_path).read() == 2
