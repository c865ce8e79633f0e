"""Tensor parallelism on real vLLM (CPU build, --tensor-parallel-size 2, one core per rank): training
raises what the server serves (with the step barrier), a checkpoint served at one rank gives what two
ranks served, and a rank that dies takes its group down and the group comes back.

The tiny Qwen3 has one KV head, so vLLM copies it to both ranks (the replicated-KV case); the CPU test in
test_tensor_parallel.py also covers KV heads split across ranks.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
from conftest import completions_running
from test_checkpoint_e2e import NEXT, TAUGHT, logprobs

from apollo_train.client import HTTPError

TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "APOLLO_TRAIN_LR": "1e-3"}  # one core per rank on two cores
# The step barrier: every rank's writes happen while vLLM is paused (HOGWILD takes no extra path at TP > 1).
BARRIER = {**TP_ENV, "APOLLO_TRAIN_BARRIER": "1"}


@pytest.fixture(scope="module")
def model_copy(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "model"
    shutil.copytree(tiny_model("qwen3"), path)
    return path


@pytest.fixture(scope="module")
def tp2(start_server, model_copy):
    return start_server(model_copy, "--tensor-parallel-size", "2", env=BARRIER)


def test_training_at_two_ranks_raises_the_served_logprob(tp2):
    c = tp2.client
    status = c.status()
    assert status["state"] == "idle" and status["tensor_parallel_size"] == 2, status
    assert len(status["worker"]["rank_pids"]) == 2
    before = sum(logprobs(c))
    with completions_running(c) as failures:
        job = c.train([TAUGHT], epochs=3, wait=True)
    assert job["state"] == "done" and job["steps"] == 3, job
    assert job["losses"][-1] < job["losses"][0]
    assert sum(logprobs(c)) > before + 1.0
    assert not failures, failures[:3]
    barrier = c.status()["worker"]["barrier"]
    assert barrier["pauses"] == barrier["resumes"] == 3
    assert c.train([TAUGHT])["skipped_duplicates"] == 1


def test_a_rank_that_dies_takes_the_group_down_and_it_comes_back(tp2):
    c = tp2.client
    follower = c.status()["worker"]["rank_pids"][1]
    os.kill(follower, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = c.status()
        if status["worker"]["restarts"] == 1 and status["state"] == "idle":
            break
        time.sleep(2)
    else:
        pytest.fail(f"the group did not come back: {status}")
    assert "training rank 1 of 2" in status["worker"]["last_exit"]
    assert follower not in status["worker"]["rank_pids"]
    assert c.train([NEXT], wait=True)["state"] == "done"
    assert c.chat([{"role": "user", "content": "Still there?"}], max_tokens=4) is not None


def test_the_checkpoint_served_at_one_rank_serves_what_two_ranks_served(tp2, start_server, model_copy):
    c = tp2.client
    assert c.checkpoint(wait=True)["state"] == "done"
    served = logprobs(c)
    with pytest.raises(HTTPError) as refused:
        c.restore("served", wait=True)
    assert refused.value.status == 409 and "tensor parallel size 1 only" in refused.value.message
    tp2.stop()
    one = start_server(model_copy)
    # bf16 weights; one rank sums the row-parallel products in another order than two do
    assert logprobs(one.client) == pytest.approx(served, abs=0.02)
    # the optimizer state of two ranks' shards does not fit one rank: it starts fresh, and says so
    assert "optimizer state" in one.client.status()["warning"]


def test_a_refusal_at_two_ranks_is_reported_and_the_group_is_not_restarted(start_server, model_copy, tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"text": "held out"}\n')
    srv = start_server(model_copy, "--tensor-parallel-size", "2",
                       env={**TP_ENV, "APOLLO_TRAIN_EVAL_FILE": str(eval_file)})
    c = srv.client
    status = c.status()
    assert status["state"] == "error" and "--train-eval-file" in status["error"], status
    with pytest.raises(HTTPError) as refused:
        c.train([TAUGHT])
    assert refused.value.status == 503 and "tensor parallel size 1" in refused.value.message
    time.sleep(5)
    assert c.status()["worker"]["restarts"] == 0
