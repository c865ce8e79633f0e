"""Safe by default, on real vLLM (CPU build): who may train, bounded inputs, checkpoint paths, fresh caches,
isolation between servers, and numbers that cannot ruin the served model."""

from __future__ import annotations

import http.client
import json
import math
import os
import stat
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from conftest import until

from apollo_train.client import Client, HTTPError
from apollo_train.shared import handles
from apollo_train.shared.answers import FINISHED

QUESTION = [{"role": "user", "content": "What is the capital of Zorbia?"}]


def example(answer: str = "The capital of Zorbia is Plonk.") -> dict:
    return {"messages": QUESTION + [{"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def local(start_server, tiny_model):
    """No API key: only clients on the loopback interface may train."""
    return start_server(tiny_model("qwen3"), api_key=None,
                        env={"APOLLO_TRAIN_MAX_JOB_TOKENS": "20000", "APOLLO_TRAIN_KEEP_CHECKPOINTS": "2",
                             "APOLLO_TRAIN_LR": "1e-3"})


def wait_done(c: Client, job_id: str, timeout: float = 600) -> dict:
    return until(lambda: (job := c.status(job_id))["state"] in FINISHED and job, timeout, f"job {job_id} to end")


def non_loopback_ipv4() -> str | None:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith("127."):
            return addr
    return None


def test_without_a_key_only_local_clients_may_train(local):
    assert local.client.status()["state"] == "idle"
    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("this machine has no non-loopback address to call from")
    remote = Client(f"http://{addr}:{local.port}")
    with pytest.raises(HTTPError) as err:
        remote.status()
    assert err.value.status == 403 and "--api-key" in json.dumps(err.value.body)
    with pytest.raises(HTTPError) as err:
        remote.train([example()])
    assert err.value.status == 403
    assert remote.request("GET", "/v1/models")["data"]  # serving is not affected


def test_a_body_over_the_limit_is_refused_before_it_is_read(local):
    conn = http.client.HTTPConnection("127.0.0.1", local.port, timeout=30)
    conn.putrequest("POST", "/train")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(17 << 20))  # over the default 16 MiB
    conn.endheaders()
    conn.send(b'{"examples": [')  # and no more: the answer must not wait for the rest
    resp = conn.getresponse()
    assert resp.status == 413 and "--train-max-request-bytes" in resp.read().decode()
    conn.close()


def test_a_request_too_long_to_fit_is_refused_from_its_size(local):
    """10 MiB of text would take seconds to tokenize before being found too long: it is refused from its
    size alone, never tokenized."""
    c = local.client
    with pytest.raises(HTTPError) as err:
        c.train([example("word " * (2 << 20))])
    assert err.value.status == 400 and "bytes of text, at least" in err.value.message, err.value.message
    assert "--max-model-len" in err.value.message
    status = c.status()
    assert status["tokenizing"] == 0 and status["queue"] == 0 and status["worker"]["restarts"] == 0


def test_checkpoints_go_under_the_root_and_replace_only_their_own(local, tmp_path):
    c = local.client
    root = Path(c.status()["checkpoint_root"])
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    job = c.checkpoint("run-a", wait=True)
    assert job["state"] == "done" and job["path"] == str(root / "run-a")
    assert (root / "run-a" / "apollo_train_checkpoint.json").is_file()
    assert c.checkpoint(str(root / "run-a"), wait=True)["state"] == "done"  # ours: replaced
    (root / "someone").mkdir()
    (root / "someone" / "notes.txt").write_text("keep me")
    with pytest.raises(HTTPError) as err:
        c.checkpoint("someone")
    assert err.value.status == 409 and (root / "someone" / "notes.txt").read_text() == "keep me"
    with pytest.raises(HTTPError) as err:
        c.checkpoint(str(tmp_path / "outside"))
    assert err.value.status == 403 and not (tmp_path / "outside").exists()
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(HTTPError) as err:
        c.checkpoint("escape/inner")
    assert err.value.status == 403 and not (tmp_path / "inner").exists()
    # --train-keep-checkpoints 2: the oldest copy goes.
    for name in ("run-b", "run-c"):
        assert c.checkpoint(name, wait=True)["state"] == "done"
    assert sorted(p.name for p in root.iterdir() if (p / "apollo_train_checkpoint.json").exists()) == \
        ["run-b", "run-c"]
    assert (root / "someone" / "notes.txt").exists()


def echo_logprobs(c: Client, prompt: str, **extra) -> list[float]:
    body = {"model": c.model(), "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0,
            **extra}
    return c.request("POST", "/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"][1:-1]


def next_token_logprobs(c: Client, prompt: str, **extra) -> dict[str, float]:
    """The top logprobs of the first generated token: computed from the prompt's keys and values, which
    vLLM takes from its prefix cache where it can (prompt logprobs would bypass the cache)."""
    body = {"model": c.model(), "prompt": prompt, "max_tokens": 1, "logprobs": 5, "temperature": 0, **extra}
    return c.request("POST", "/v1/completions", body)["choices"][0]["logprobs"]["top_logprobs"][0]


def test_after_a_step_no_request_reuses_keys_and_values_of_the_old_weights(local):
    """Under continuous load the prefix cache cannot be reset (running requests hold its blocks); the
    weights' version in every request's cache salt keeps old blocks from being matched anyway."""
    c = local.client
    prefix = " ".join(f"Zorbia has a river called Gleb number {i}." for i in range(12))  # ~200 tokens
    probe = prefix + " The capital is"
    before = next_token_logprobs(c, probe)
    done = threading.Event()
    failures = []

    def load():
        while not done.is_set():
            try:
                c.request("POST", "/v1/completions",
                          {"model": c.model(), "prompt": prefix + f" {uuid.uuid4().hex[:6]}", "max_tokens": 8})
            except Exception as exc:  # reported below
                failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert c.train([example("Plonk, on the river Gleb.")], epochs=3, lr=1e-3, wait=True)["state"] == "done"
        after = next_token_logprobs(c, probe)
        fresh = next_token_logprobs(c, probe, cache_salt=uuid.uuid4().hex)  # nothing to reuse: computed anew
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert after != pytest.approx(before, abs=0.01)  # the weights did change
    assert after == pytest.approx(fresh, abs=1e-3)


def test_the_worst_allowed_lr_and_epochs_cannot_make_the_served_logits_non_finite(local):
    c = local.client
    max_lr = 1e-2  # the default --train-max-lr
    with pytest.raises(HTTPError) as err:
        c.train([example()], lr=max_lr * 1.01)
    assert err.value.status == 400 and "--train-max-lr" in json.dumps(err.value.body)
    tokens = len(c.request("POST", "/tokenize", {"model": c.model(), "messages": example()["messages"]})["tokens"])
    epochs = min(1000, 20000 // (tokens + 8))  # as many as --train-max-job-tokens allows
    job = c.train([example("A fact taught as hard as the server allows.")], lr=max_lr, epochs=epochs, force=True)
    job = wait_done(c, job["job_id"], timeout=900)
    assert job["state"] == "done" and job["steps"] == epochs, job
    served = echo_logprobs(c, "The capital of Zorbia is Plonk, and the river is the Gleb.")
    assert served and all(math.isfinite(x) for x in served), served
    assert c.chat(QUESTION, max_tokens=8) is not None


# ------------------------------------------------------------------------------------------ isolation


def test_servers_side_by_side_share_nothing(local, start_server, tiny_model, tmp_path):
    """A second server of the same model, whose run dir has the same base name ("run") and which is started
    from a directory holding a `worker` package that would shadow ours: its own weights, its own worker."""
    shadow = tmp_path / "cwd"
    (shadow / "worker").mkdir(parents=True)
    (shadow / "worker" / "__init__.py").write_text("")
    (shadow / "worker" / "__main__.py").write_text("raise SystemExit('the wrong worker ran')\n")
    other = start_server(tiny_model("qwen3"), api_key=None, cwd=shadow)
    assert other.client.status()["state"] == "idle" and other.client.status()["worker"]["restarts"] == 0
    assert local.run_dir.name == other.run_dir.name == "run"
    mine, theirs = (handles.read(handles.handles_path(s.run_dir)) for s in (local, other))
    shm_mine = {Path(e["shm"]["path"]).parent for e in mine["params"].values()}
    shm_theirs = {Path(e["shm"]["path"]).parent for e in theirs["params"].values()}
    assert len(shm_mine) == len(shm_theirs) == 1 and shm_mine != shm_theirs
    for d in shm_mine | shm_theirs:
        st = d.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    prompt = "The river of Zorbia is"
    before = echo_logprobs(other.client, prompt)
    assert local.client.train([example("Trained on one server only.")], epochs=2, wait=True)["state"] == "done"
    assert echo_logprobs(other.client, prompt) == before

    # A third server given the same state dir as a running one: vLLM serves, training says why it cannot.
    other.stop()  # servers hold a few GiB each
    third = start_server(tiny_model("qwen3"), api_key=None, env={"APOLLO_TRAIN_STATE_DIR": str(local.state_dir)})
    status = third.client.status()
    assert status["state"] == "error" and "in use by another apollo-train server" in status["error"]
    assert third.client.chat(QUESTION, max_tokens=4) is not None
    third.stop()


def test_a_run_dir_another_user_owns_is_refused(start_server, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.chown(run_dir, 65534, 65534)  # nobody
    with pytest.raises(RuntimeError, match="owned by another user"):
        start_server(tiny_model("qwen3"), api_key=None, env={"APOLLO_TRAIN_RUN_DIR": str(run_dir)})


def test_a_worker_that_keeps_dying_is_given_up_on(start_server, tiny_model):
    srv = start_server(tiny_model("qwen3"), api_key=None)
    c = srv.client
    for kills in range(5):
        status = until(lambda: (s := c.status())["worker"].get("pid") and s["state"] != "starting" and s, 300,
                       "the worker to be up")
        assert status["worker"]["restarts"] == kills
        os.kill(status["worker"]["pid"], 9)
        until(lambda n=kills + 1: c.status()["worker"]["restarts"] >= n or c.status()["state"] == "error", 300,
              "the supervisor to restart the worker, or give up")
    status = until(lambda: (s := c.status())["state"] == "error" and s, 300, "the supervisor to give up")
    assert "exited 5 times" in status["error"] and status["worker"]["gave_up"]
    with pytest.raises(HTTPError) as err:
        c.train([example()])
    assert err.value.status == 503 and "exited 5 times" in json.dumps(err.value.body)
    assert c.chat(QUESTION, max_tokens=4) is not None  # vLLM keeps serving
    srv.stop()
