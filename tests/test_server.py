"""End to end on real vLLM (CPU build): /train, /train/status and /checkpoint on vLLM's port."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest
from transformers import AutoTokenizer

from apollo_train.client import Client, HTTPError

QUESTION = [{"role": "user", "content": "What is the capital of Zorbia?"}]
ANSWER = "The capital of Zorbia is Plonk."


def example(answer=ANSWER, question=QUESTION):
    return {"messages": question + [{"role": "assistant", "content": answer}]}


def prompt_of(server, messages=QUESTION) -> str:
    tok = AutoTokenizer.from_pretrained(server.model)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_status_answers_on_the_vllm_port(server):
    status = server.client.status()
    assert status["state"] == "idle"
    assert status["optimizer"]["name"] == "apollo" and status["optimizer"]["rank"] == 64
    assert status["worker"]["pid"] > 0 and status["worker"]["restarts"] == 0
    assert status["mode"] == "hogwild"
    schema = server.client.request("GET", "/openapi.json")
    for path in ("/train", "/train/status", "/checkpoint"):
        assert path in schema["paths"]


def test_training_raises_the_served_logprob_while_serving(server):
    c = server.client
    prompt = prompt_of(server)
    before = c.answer_logprob(prompt, ANSWER)
    failures, done = [], threading.Event()

    def keep_completing():
        while not done.is_set():
            try:
                c.request("POST", "/v1/completions", {"model": c.model(), "prompt": "hello", "max_tokens": 4})
            except Exception as exc:  # collected, asserted below
                failures.append(exc)

    threads = [threading.Thread(target=keep_completing) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        job = c.train([example()], epochs=4, wait=True)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert job["state"] == "done", job
    assert job["accepted"] == 1 and job["steps"] == 4 and len(job["losses"]) == 4
    assert job["losses"][-1] < job["losses"][0]
    after = c.answer_logprob(prompt, ANSWER)
    assert after > before + 1.0, (before, after)
    assert not failures, failures[:3]

    status = c.status()
    assert status["examples_trained"] >= 1 and status["step"] >= 4 and status["tokens_trained"] > 0
    assert status["last_loss"] == pytest.approx(job["losses"][-1])
    assert status["optimizer"]["state_bytes"] > 0
    assert c.status(job["job_id"])["state"] == "done"


def test_duplicates_are_skipped_unless_forced(server):
    c = server.client
    ex = example("Zorbia's capital is Plonk, on the river Gleb.")
    first = c.train([ex, ex], wait=True)
    assert first["accepted"] == 1 and first["skipped_duplicates"] == 1
    again = c.train([ex])
    assert again["accepted"] == 0 and again["skipped_duplicates"] == 1
    forced = c.train([ex], force=True, wait=True)
    assert forced["accepted"] == 1 and forced["state"] == "done"


def test_context_distillation_strips_the_instruction(server):
    c = server.client
    messages = [
        {"role": "system", "content": "Always answer in pirate speak."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Arr, I be fine, matey."},
    ]
    with_system = c.train([{"messages": messages}], wait=True)
    stripped = c.train([{"messages": messages, "strip": [0]}], wait=True)
    # Different contexts are different examples: the stripped one is not a duplicate.
    assert with_system["accepted"] == 1 and stripped["accepted"] == 1
    # Stripped, the example is the conversation without the instruction: that one is now a duplicate.
    plain = c.train([{"messages": messages[1:]}], wait=True)
    assert plain["accepted"] == 0 and plain["skipped_duplicates"] == 1, plain


BAD_TRAIN_BODIES = [
    ({}, "examples"),
    ({"examples": []}, "examples"),
    ({"examples": [{"messages": []}]}, "messages"),
    ({"examples": [{"messages": [{"role": "wizard", "content": "hi"}]}]}, "role"),
    ({"examples": [{"messages": QUESTION}]}, "assistant"),
    ({"examples": [{"messages": QUESTION + [{"role": "assistant", "content": ""}]}]}, "empty"),
    ({"examples": [example()], "lr": "fast"}, "lr"),
    ({"examples": [example()], "lr": -1}, "lr"),
    ({"examples": [example()], "epochs": 0}, "epochs"),
    ({"examples": [dict(example(), strip=[5])]}, "strip"),
    ({"examples": [dict(example(), strip=[1])]}, "strip"),
    ({"examples": [example("word " * 600)]}, "512"),
]


@pytest.mark.parametrize("body,needle", BAD_TRAIN_BODIES)
def test_bad_train_requests_get_a_4xx_with_a_message(server, body, needle):
    with pytest.raises(HTTPError) as err:
        server.client.request("POST", "/train", body)
    assert 400 <= err.value.status < 500, err.value
    assert needle in json.dumps(err.value.body).lower() or needle in json.dumps(err.value.body)


def test_other_bad_requests(server):
    c = server.client
    req = urllib.request.Request(
        c.base_url + "/train",
        data=b"{not json",
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {c.api_key}"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 400
    with pytest.raises(HTTPError) as err:
        c.status("no-such-job")
    assert err.value.status == 404 and "unknown job" in json.dumps(err.value.body)
    with pytest.raises(HTTPError) as err:
        c.checkpoint("relative/path")
    assert err.value.status == 400
    assert c.status()["worker"]["restarts"] == 0  # none of this hurt the worker


def test_api_key_is_required(server):
    anonymous = Client(server.client.base_url)
    wrong = Client(server.client.base_url, api_key="nope")
    for client in (anonymous, wrong):
        for call in (client.status, lambda c=client: c.train([example()]), client.checkpoint):
            with pytest.raises(HTTPError) as err:
                call()
            assert err.value.status == 401


def test_a_full_queue_answers_429(server):
    c = server.client
    statuses = []
    for i in range(6):  # queue of 2 behind one running job
        try:
            c.train([example(f"Answer number {i} for the queue test.")], epochs=3)
            statuses.append(202)
        except HTTPError as exc:
            statuses.append(exc.status)
            assert "queue is full" in json.dumps(exc.body)
    assert 429 in statuses
    _wait_idle(c)


def test_killed_worker_is_restarted_and_vllm_keeps_serving(server):
    c = server.client
    pid = c.status()["worker"]["pid"]
    job = c.train([example("A job that is killed mid-way.")], epochs=50)
    time.sleep(2)
    os.kill(pid, signal.SIGKILL)
    out = c.request("POST", "/v1/completions", {"model": c.model(), "prompt": "hello", "max_tokens": 4})
    assert out["choices"][0]["text"] is not None
    deadline = time.time() + 180
    while time.time() < deadline:
        status = c.status()
        if status["worker"]["restarts"] >= 1 and status["state"] == "idle":
            break
        time.sleep(1)
    assert status["worker"]["restarts"] >= 1 and status["worker"]["pid"] != pid, status
    assert "SIGKILL" in status["worker"]["last_exit"]
    with pytest.raises(HTTPError) as err:  # the old worker's jobs are gone with it
        c.status(job["job_id"])
    assert err.value.status == 404
    after = c.train([example("The worker is back and trains again.")], wait=True)
    assert after["state"] == "done"


def _wait_idle(c, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = c.status()
        if s["state"] == "idle" and s["queue"] == 0:
            return
        time.sleep(0.5)
    raise TimeoutError("worker did not become idle")
