"""Generated requests from the training routes' OpenAPI schema against a live server (CPU build):
no 5xx, the worker never dies, and vLLM keeps serving. Bounded in examples per route."""

from __future__ import annotations

import shutil

import pytest
import schemathesis
from conftest import API_KEY, until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAX_EXAMPLES = 40  # per route


@pytest.fixture(scope="module")
def fuzzed(start_server, tiny_model, tmp_path_factory):
    # A copy of the model: a generated POST /checkpoint {} writes into the served directory.
    model = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(tiny_model("qwen3"), model)
    # Small limits keep generated jobs short; a 1-deep queue makes many of them 429s, as under load.
    return start_server(model, env={"APOLLO_TRAIN_MAX_JOB_TOKENS": "3000", "APOLLO_TRAIN_QUEUE_SIZE": "1",
                                                  "APOLLO_TRAIN_KEEP_CHECKPOINTS": "2"})


def test_generated_requests_never_get_a_server_error(fuzzed):
    schema = schemathesis.openapi.from_url(fuzzed.client.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.include(path_regex="^/(train|checkpoint)").get_all_operations()]
    assert {op.path for op in operations} >= {"/train", "/train/status", "/train/cancel", "/checkpoint"}
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        wait_idle(fuzzed.client)  # the jobs of one route do not fill the 1-deep queue for the next
        cases = operation.as_strategy()
        if operation.path == "/train":  # half of them nudged past the answer rules, to reach tokenizing and jobs
            cases = st.tuples(cases, st.booleans()).map(lambda c: plausible(c[0]) if c[1] else c[0])
        fuzz(cases, statuses.setdefault(f"{operation.method.upper()} {operation.path}", set()))
    # The fuzzer reached past validation too, not only into 400s.
    assert any(s < 300 for s in statuses["POST /train"]) and any(s < 300 for s in statuses["POST /checkpoint"]), \
        statuses


def wait_idle(client, timeout: float = 300) -> None:
    until(lambda: not (s := client.status())["queue"] and s["state"] in ("idle", "error"), timeout,
          "the worker to be idle", every=0.5)


def fuzz(cases, statuses: set[int]) -> None:
    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)  # the same cases on every run
    def call(case):
        response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
        statuses.add(response.status_code)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:1000])

    call()


def plausible(case):
    """The case nudged toward a job the server takes: each example's last message made an
    assistant's non-empty answer, no strip, one epoch, and an lr under the server's limit."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("examples"), list):
        body.pop("lr", None)
        body["epochs"] = 1
        for example in body["examples"]:
            if isinstance(example, dict):
                example.pop("strip", None)
            messages = example.get("messages") if isinstance(example, dict) else None
            if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
                messages[-1].update(role="assistant", content=str(messages[-1].get("content") or "ok") or "ok")
    return case


def test_after_the_fuzzing_the_worker_lives_and_vllm_serves(fuzzed):
    wait_idle(fuzzed.client)  # the last generated jobs (a restore, say) finish
    status = fuzzed.client.status()
    assert status["state"] == "idle" and status["worker"]["restarts"] == 0, status
    assert fuzzed.client.chat([{"role": "user", "content": "Still there?"}], max_tokens=4) is not None
