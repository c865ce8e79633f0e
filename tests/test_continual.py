"""Learning over time on real vLLM (CPU build): replay, listing and restoring checkpoints live, the drift guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from apollo_train.client import HTTPError

QUESTION = [{"role": "user", "content": "What is the capital of Zorbia?"}]


def example(answer: str) -> dict:
    return {"messages": QUESTION + [{"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def served(start_server, tiny_model, tmp_path_factory):
    """A server with an eval file and a tight drift guard."""
    eval_file = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    lines = [{"text": "The quick brown fox jumps over the lazy dog. A small model learns from the text."},
             {"text": "Paris is the capital of France. Berlin is the capital of Germany."},
             {"messages": [{"role": "user", "content": "Where is Rome?"},
                           {"role": "assistant", "content": "Rome is the capital of Italy."}]}]
    eval_file.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return start_server(tiny_model("qwen3"), api_key=None,
                        env={"APOLLO_TRAIN_EVAL_FILE": str(eval_file), "APOLLO_TRAIN_MAX_EVAL_LOSS_RISE": "0.05",
                             "APOLLO_TRAIN_REPLAY_SIZE": "16", "APOLLO_TRAIN_REPLAY_RATIO": "1"})


def next_token_logprobs(c, prompt: str) -> dict[str, float]:
    body = {"model": c.model(), "prompt": prompt, "max_tokens": 1, "logprobs": 5, "temperature": 0}
    return c.request("POST", "/v1/completions", body)["choices"][0]["logprobs"]["top_logprobs"][0]


PROBE = "Zorbia is a country whose capital is"


def test_jobs_fill_the_replay_buffer_and_report_the_eval_loss(served):
    c = served.client
    start = c.status()
    assert start["replay_size"] == 0 and start["eval_loss"] > 0
    first = c.train([example("Plonk.")], lr=1e-4, wait=True)
    assert first["state"] == "done" and first["replayed"] == 0  # nothing to replay yet
    assert set(first["eval_loss"]) == {"before", "after"}
    second = c.train([example("Plonk, on the river Gleb.")], lr=1e-4, wait=True)
    assert second["state"] == "done" and second["replayed"] >= 1  # the first job's example, again
    status = c.status()
    assert status["replay_size"] == 2 and status["examples_trained"] == 2  # replayed examples are not new
    assert status["eval_loss"] == second["eval_loss"]["after"]


def test_restore_brings_back_a_checkpoint_in_place(served):
    c = served.client
    job = c.checkpoint("c1", wait=True)
    assert job["state"] == "done"
    at_checkpoint, status_at = next_token_logprobs(c, PROBE), c.status()
    listed = c.request("GET", "/checkpoints")["checkpoints"]
    entry = next(x for x in listed if x["name"] == "c1")
    assert entry["id"] == job["checkpoint_id"] and entry["step"] == status_at["step"] and entry["bytes"] > 0

    taught = example("Plonk, and its river is the Gleb, which floods in spring.")
    later = c.train([taught], lr=1e-4, epochs=3, wait=True)
    assert later["state"] == "done" and next_token_logprobs(c, PROBE) != at_checkpoint

    pid = c.status()["worker"]["pid"]
    restored = c.request("POST", "/checkpoint/restore", {"checkpoint": "c1", "wait": True})
    assert restored["state"] == "done", restored
    assert next_token_logprobs(c, PROBE) == at_checkpoint  # the same weights, served by the same vLLM
    status = c.status()
    assert status["worker"]["pid"] == pid and status["worker"]["restarts"] == 0  # no restart
    assert status["step"] == status_at["step"] and status["replay_size"] == status_at["replay_size"]
    assert c.train([taught])["accepted"] == 1  # the registry is the checkpoint's: not trained there
    # by id too
    assert c.request("POST", "/checkpoint/restore", {"checkpoint": entry["id"], "wait": True})["state"] == "done"


def test_a_checkpoint_of_another_model_is_refused_with_nothing_changed(served, tiny_model):
    c = served.client
    root = Path(c.status()["checkpoint_root"])
    alien = root / "alien"
    shutil.copytree(tiny_model("qwen2"), alien)
    shutil.copy(root / "c1" / "apollo_train_checkpoint.json", alien)  # names a real training state
    before = next_token_logprobs(c, PROBE)
    job = c.request("POST", "/checkpoint/restore", {"checkpoint": "alien", "wait": True})
    assert job["state"] == "failed" and "another model or layout" in job["error"], job
    assert next_token_logprobs(c, PROBE) == before
    with pytest.raises(HTTPError) as err:
        c.request("POST", "/checkpoint/restore", {"checkpoint": "no-such-checkpoint"})
    assert err.value.status == 404 and "GET /checkpoints" in json.dumps(err.value.body)


def test_a_job_that_raises_the_eval_loss_too_much_is_rolled_back(served):
    c = served.client
    before = next_token_logprobs(c, PROBE)
    harmful = example("Zorbia Zorbia Zorbia Zorbia Zorbia Zorbia Zorbia Zorbia.")
    job = c.train([harmful], lr=1e-2, epochs=20, wait=True)
    assert job["state"] == "rolled_back", job
    numbers = job["rolled_back"]
    assert numbers["rise"] > numbers["max_rise"] == 0.05 and numbers["snapshot_bytes"] > 0
    assert next_token_logprobs(c, PROBE) == before  # undone in the served weights
    assert c.train([harmful], lr=1e-4)["accepted"] == 1  # not recorded as trained
