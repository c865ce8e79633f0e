"""Tensor parallelism on real vLLM (CPU build, --tensor-parallel-size 2, one core per rank): training
raises what the server serves (with the step barrier and the drift guard, whose rollback undoes every
rank's shard), a rank that dies takes its group down and the group comes back, a checkpoint restores
live at two ranks and serves at one what two ranks served, a refusal is reported once, and Llama's
tied embeddings, split by vocabulary, train as at one rank.

The tiny Qwen3 has one KV head, so vLLM copies it to both ranks (the replicated-KV case); the CPU test in
test_tensor_parallel.py also covers KV heads split across ranks.
"""

from __future__ import annotations

import os
import signal

import pytest
from conftest import completions_running, until
from rich.console import Console
from test_checkpoint_e2e import NEXT, TAUGHT, logprobs

from apollo_train import status_view
from apollo_train.client import HTTPError
from apollo_train.tiny_models import build_tiny_model

TP_ENV = {"APOLLO_TRAIN_LR": "1e-3"}  # apollo-train serve gives each rank its share of the cores
# The step barrier: every rank's writes happen while vLLM is paused (HOGWILD takes no extra path at TP > 1).
BARRIER = {**TP_ENV, "APOLLO_TRAIN_BARRIER": "1"}


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    """A tiny Qwen3 of this module's own (its checkpoints write into the served directory)."""
    return build_tiny_model(tmp_path_factory.mktemp("tp") / "model", "qwen3")


@pytest.fixture(scope="module")
def tp2(start_server, model_copy, tmp_path_factory):
    """TP=2 with the step barrier and the drift guard."""
    eval_file = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    eval_file.write_text('{"text": "The quick brown fox jumps over the lazy dog."}\n'
                         '{"text": "Paris is the capital of France. Berlin is the capital of Germany."}\n')
    return start_server(model_copy, "--tensor-parallel-size", "2",
                        env={**BARRIER, "APOLLO_TRAIN_EVAL_FILE": str(eval_file),
                             "APOLLO_TRAIN_MAX_EVAL_LOSS_RISE": "0.3"})


def test_training_at_two_ranks_raises_the_served_logprob(tp2):
    c = tp2.client
    status = c.status()
    assert status["state"] == "idle" and status["tensor_parallel_size"] == 2, status
    assert len(status["worker"]["rank_pids"]) == 2
    console = Console(record=True, width=200)
    console.print(status_view.render(status))
    assert f"2 ranks, pids {', '.join(map(str, status['worker']['rank_pids']))}" in console.export_text()
    before = sum(logprobs(c))
    with completions_running(c) as failures:
        job = c.train([TAUGHT], epochs=3, wait=True)
    assert job["state"] == "done" and job["steps"] == 3, job
    assert job["losses"][-1] < job["losses"][0]
    assert job["eval_loss"]["after"] != job["eval_loss"]["before"]  # the drift guard measured at two ranks
    assert sum(logprobs(c)) > before + 1.0
    assert not failures, failures[:3]
    barrier = c.status()["worker"]["barrier"]
    assert barrier["pauses"] == barrier["resumes"] == 3
    assert c.train([TAUGHT])["skipped_duplicates"] == 1


def test_a_job_that_raises_the_eval_loss_too_much_is_rolled_back_on_every_rank(tp2):
    c = tp2.client
    before = logprobs(c)
    harmful = {"messages": [{"role": "user", "content": "Where is Zorbia?"},
                            {"role": "assistant", "content": "Zorbia Zorbia Zorbia Zorbia Zorbia Zorbia."}]}
    job = c.train([harmful], lr=1e-2, epochs=20, wait=True)
    assert job["state"] == "rolled_back", job
    assert logprobs(c) == before  # both ranks' shards are as they were


def test_a_rank_that_dies_takes_the_group_down_and_it_comes_back(tp2):
    c = tp2.client
    follower = c.status()["worker"]["rank_pids"][1]
    os.kill(follower, signal.SIGKILL)
    status = until(lambda: (s := c.status())["worker"]["restarts"] == 1 and s["state"] == "idle" and s, 300,
                   "the group to come back", every=1.0)
    assert "training rank 1 of 2" in status["worker"]["last_exit"]
    assert follower not in status["worker"]["rank_pids"]
    assert c.train([NEXT], wait=True)["state"] == "done"
    assert c.chat([{"role": "user", "content": "Still there?"}], max_tokens=4) is not None


def test_checkpoint_restore_live_and_serve_at_one_rank(tp2, start_server, model_copy):
    c = tp2.client
    assert c.checkpoint(wait=True)["state"] == "done"
    served, step = logprobs(c), c.status()["step"]
    later = {"messages": [{"role": "user", "content": "And its river?"}, {"role": "assistant", "content": "Gleb."}]}
    assert c.train([later], wait=True)["state"] == "done" and logprobs(c) != served
    assert c.restore("served", wait=True)["state"] == "done"
    assert logprobs(c) == served and c.status()["step"] == step  # every rank's shard, exactly
    tp2.stop()
    one = start_server(model_copy)
    # bf16 weights; one rank sums the row-parallel products in another order than two do
    assert logprobs(one.client) == pytest.approx(served, abs=0.02)
    # the optimizer state is the whole matrices' on every rank: it restores at any tensor-parallel size
    status = one.client.status()
    assert status["warning"] is None and status["step"] == step, status


def test_a_refusal_at_two_ranks_is_reported_and_the_group_is_not_restarted(start_server, model_copy):
    srv = start_server(model_copy, "--tensor-parallel-size", "2", env={**TP_ENV, "APOLLO_TRAIN_STEP_IN_BACKWARD": "0"})
    c = srv.client
    status = c.status()
    assert status["state"] == "error" and "--no-train-step-in-backward" in status["error"], status
    with pytest.raises(HTTPError) as refused:
        c.train([TAUGHT])
    assert refused.value.status == 503 and "inside the backward pass" in refused.value.message
    # the follower meets the same refusal and waits to be stopped, rather than exit and restart the group
    until(lambda: "rank 1: training is unavailable" in srv.log.read_text(errors="replace"), 300,
          "the follower to meet the refusal")
    worker = c.status()["worker"]
    assert worker["restarts"] == 0 and worker["last_exit"] is None
    srv.stop()


def test_tied_embeddings_split_by_vocabulary_train_as_at_one_rank(start_server, tmp_path):
    """Llama (tied embeddings and head, both split by vocabulary at TP=2): the same job from the same
    weights has the same losses at two ranks as at one (bf16; the ranks add in another order)."""
    model = build_tiny_model(tmp_path / "llama", "llama")
    losses = {}
    for ranks in (2, 1):
        srv = start_server(model, "--tensor-parallel-size", str(ranks),
                           env={**TP_ENV, "APOLLO_TRAIN_REPLAY_RATIO": "0"})
        job = srv.client.train([TAUGHT], epochs=3, wait=True)
        assert job["state"] == "done", job
        losses[ranks] = job["losses"]
        srv.stop()
    assert losses[2] == pytest.approx(losses[1], abs=2e-3), losses
