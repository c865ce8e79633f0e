"""End to end on real vLLM (CPU build): /train, /train/status and /checkpoint on vLLM's port."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest
from conftest import completions_running, until
from transformers import AutoTokenizer

from apollo_train.api import openapi_examples
from apollo_train.client import Client, HTTPError
from apollo_train.shared.answers import JobAnswer, StatusAnswer

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
    assert set(status) == set(StatusAnswer.model_fields) == set(openapi_examples.STATUS)  # one schema, shown whole
    StatusAnswer.model_validate(status)
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
    with completions_running(c, threads=2) as failures:
        job = c.train([example()], epochs=4, wait=True)
    assert job["state"] == "done", job
    JobAnswer.model_validate(job)
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
    # strict: unknown keys are refused, not dropped
    ({"examples": [{"messages": [{**QUESTION[0], "name": "bob"}, example()["messages"][1]]}]}, "unknown key 'name'"),
    ({"examples": [{"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}]},
     "unknown key 'tool_calls'"),
    ({"examples": [dict(example(), id=1)]}, "unknown key 'id'"),
    ({"examples": [example()], "priority": 1}, "priority"),
    # bounded: huge numbers, the largest lr, examples per request, tokens x epochs per job
    ({"examples": [example()], "epochs": 10**30}, "epochs"),
    ({"examples": [dict(example(), strip=[10**30])]}, "strip"),
    ({"examples": [example()], "lr": 0.5}, "--train-max-lr"),
    ({"examples": [example(f"answer {i}") for i in range(9)]}, "--train-max-examples-per-request"),
    ({"examples": [example()], "epochs": 1000}, "--train-max-job-tokens"),
    ({"examples": [example()], "force": "yes"}, "force"),
]


@pytest.mark.parametrize("body,needle", BAD_TRAIN_BODIES)
def test_bad_train_requests_get_a_4xx_with_a_message(server, body, needle):
    with pytest.raises(HTTPError) as err:
        server.client.request("POST", "/train", body)
    assert 400 <= err.value.status < 500, err.value
    assert needle in json.dumps(err.value.body).lower() or needle in json.dumps(err.value.body)


def post_raw(c, path: str, data: bytes) -> tuple[int, str]:
    req = urllib.request.Request(
        c.base_url + path, data=data, method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {c.api_key}"},
    )
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("data, needle", [
    (b"{not json", "JSON"),
    (b'{"examples": [{"messages": [{"role": "user", "content": "\\ud800"}, '
     b'{"role": "assistant", "content": "x"}]}]}', "lone surrogate"),
    (b'{"examples": [{"messages": [{"role": "assistant", "content": "x"}]}], "lr": NaN}', "lr"),
    (b'{"examples": [{"messages": [{"role": "assistant", "content": "x"}]}], "lr": Infinity}', "lr"),
    (b'{"examples": [{"messages": [{"role": "assistant", "content": "x"}]}], "epochs": 1e400}', "epochs"),
    (b"[]", "dict"),
])
def test_malformed_bodies_are_a_400_never_a_500(server, data, needle):
    status, text = post_raw(server.client, "/train", data)
    assert status == 400 and needle in text, (status, text)


def test_other_bad_requests(server):
    c = server.client
    with pytest.raises(HTTPError) as err:
        c.status("no-such-job")
    assert err.value.status == 404 and "unknown job" in json.dumps(err.value.body)
    for path, status in (("../escape", 400), ("~/x", 400), ("/etc/apollo-train-test", 403)):
        with pytest.raises(HTTPError) as err:
            c.checkpoint(path)
        assert err.value.status == status, (path, err.value)
    assert c.status()["worker"]["restarts"] == 0  # none of this hurt the worker


def test_api_key_is_required(server):
    anonymous = Client(server.client.base_url)
    wrong = Client(server.client.base_url, api_key="nope")
    non_ascii = Client(server.client.base_url, api_key="t\u00e9st-key")
    for client in (anonymous, wrong, non_ascii):
        for call in (client.status, lambda c=client: c.train([example()]), client.checkpoint):
            with pytest.raises(HTTPError) as err:
                call()
            assert err.value.status == 401


def wait_running(c, job_id: str, timeout: float = 300) -> None:
    until(lambda: c.status(job_id)["state"] != "queued", timeout, f"job {job_id} to start")


def test_a_full_queue_answers_429_and_jobs_can_be_cancelled(server):
    c = server.client
    running = c.train([example("A long job that holds the worker.")], epochs=500)  # within 20000 job tokens
    wait_running(c, running["job_id"])
    queued = [c.train([example(f"Queued answer {i}.")]) for i in range(2)]  # the queue holds 2
    assert all(q["state"] == "queued" for q in queued)
    with pytest.raises(HTTPError) as err:
        c.train([example("One too many.")])
    assert err.value.status == 429 and "queue is full" in json.dumps(err.value.body)

    # A queued job is cancelled at once, a running one after its current step.
    assert c.request("POST", "/train/cancel", {"job_id": queued[0]["job_id"]})["state"] == "cancelled"
    assert c.request("POST", "/train/cancel", {"job_id": running["job_id"]})["state"] == "running"
    stopped = until(lambda: (job := c.status(running["job_id"]))["state"] != "running" and job, 300,
                    "the running job to stop after its step")
    assert stopped["state"] == "cancelled" and 0 < stopped["steps"] == len(stopped["losses"]) < 500
    with pytest.raises(HTTPError) as err:
        c.request("POST", "/train/cancel", {"job_id": "no-such-job"})
    assert err.value.status == 404
    with pytest.raises(HTTPError) as err:
        c.request("POST", "/train/cancel", {"job_id": queued[0]["job_id"]})
    assert err.value.status == 409
    _wait_idle(c)
    # Cancelled examples were not recorded as trained: they can be posted again.
    assert c.train([example("Queued answer 0.")])["accepted"] == 1
    _wait_idle(c)


def test_killed_worker_is_restarted_and_vllm_keeps_serving(server):
    c = server.client
    pid = c.status()["worker"]["pid"]
    job = c.train([example("A job that is killed mid-way.")], epochs=200)
    wait_running(c, job["job_id"])
    os.kill(pid, signal.SIGKILL)
    out = c.request("POST", "/v1/completions", {"model": c.model(), "prompt": "hello", "max_tokens": 4})
    assert out["choices"][0]["text"] is not None
    status = until(lambda: (s := c.status())["worker"]["restarts"] >= 1 and s["state"] == "idle" and s, 300,
                   "the worker to be restarted")
    assert status["worker"]["pid"] != pid, status
    assert "SIGKILL" in status["worker"]["last_exit"]
    lost = c.status(job["job_id"])  # the old worker's job is known, and failed with the reason
    assert lost["state"] == "failed" and "exited before this job finished" in lost["error"], lost
    after = c.train([example("The worker is back and trains again.")], wait=True)
    assert after["state"] == "done"


def _wait_idle(c, timeout=300):
    until(lambda: (s := c.status())["state"] == "idle" and s["queue"] == 0, timeout, "the worker to be idle")


def metrics(c) -> dict[str, float]:
    """vLLM's /metrics, ours only: {'name{labels}': value}."""
    with urllib.request.urlopen(c.base_url + "/metrics") as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("apollo_train:"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def value(found: dict[str, float], name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in found.items() if k.split("{")[0] == name and all(w in k for w in want))


def test_training_yields_to_serving_and_its_settings_change_live(server):
    """While requests are in flight the governor yields the GPU's time (here the CPU's) to serving;
    POST /train/settings changes how much, and refuses what it does not know."""
    c = server.client
    before = c.status()
    assert before["busy_share"] == 0.25 and before["step_in_backward"] and before["mode"] == "hogwild"
    with completions_running(c, threads=2) as failures:
        # the router publishes vLLM's requests in flight
        until(lambda: c.status()["serving_requests"] >= 1, 120, "requests in flight", every=0.02)
        job = c.train([example("Zorbia's anthem is the Plonk March.")], epochs=5, force=True, wait=True)
    assert job["state"] == "done" and not failures, (job, failures[:3])
    assert c.status()["yielded_s"] > before["yielded_s"]

    assert c.settings(busy_share=0.5) == {"busy_share": 0.5, "barrier": False, "step_in_backward": True}
    try:
        assert c.status()["busy_share"] == 0.5 and c.settings() == c.settings(busy_share=0.5)
        for body, needle in (({"busy_share": 0}, "busy_share"), ({"busy_share": 1.5}, "busy_share"),
                             ({"barrier": "yes"}, "barrier"), ({"gpu": 1}, "unknown key 'gpu'")):
            with pytest.raises(HTTPError) as err:
                c.request("POST", "/train/settings", body)
            assert err.value.status == 400 and needle in err.value.message, (body, err.value.message)
    finally:
        c.settings(busy_share=before["busy_share"])


def test_training_metrics_on_vllms_metrics_move_while_a_job_runs(server):
    c = server.client
    before = metrics(c)
    for name in ("apollo_train:optimizer_steps_total", "apollo_train:worker_state", "apollo_train:queue_depth",
                 "apollo_train:optimizer_state_bytes", "apollo_train:worker_restarts_total"):
        assert any(k.split("{")[0] == name for k in before), (name, sorted(before)[:20])
    job = c.train([example("An answer taught while the metrics are watched.")], epochs=60)
    wait_running(c, job["job_id"])
    steps = "apollo_train:optimizer_steps_total"
    until(lambda: value(metrics(c), steps) > value(before, steps), 300, "a step counted")
    moved_at = time.time()
    _wait_idle(c)
    after = metrics(c)
    done = c.status(job["job_id"])
    assert done["finished"] > moved_at  # the counter moved while the job ran, not only at its end

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved(steps) >= done["steps"] == 60
    assert moved("apollo_train:examples_trained_total") == 1
    assert moved("apollo_train:tokens_trained_total") > 0
    assert moved("apollo_train:tokens_computed_total") >= done["input_tokens"] > 0
    assert moved("apollo_train:jobs_total", kind="train", state="done") >= 1
    assert moved("apollo_train:step_duration_seconds_count") >= 60
    assert value(after, "apollo_train:worker_state", state="idle") == 1
    assert value(after, "apollo_train:loss") == pytest.approx(done["losses"][-1])
    assert value(after, "apollo_train:optimizer_state_bytes") == c.status()["optimizer"]["state_bytes"]
