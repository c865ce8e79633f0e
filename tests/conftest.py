"""Shared fixtures: tiny random models and real vLLM servers (the CPU build) with our plugins."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from apollo_train.launcher import ServerProcess, free_port
from apollo_train.shared.cpu import enable_amx
from apollo_train.tiny_models import build_tiny_model

enable_amx()  # for the tests that train in this process
API_KEY = "test-key"
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


class Server(ServerProcess):
    """`apollo-train serve` on a model with its own run and state dirs, CPU-friendly vLLM flags."""

    def __init__(
        self,
        model: Path | None,
        workdir: Path,
        *vllm_args: str,
        env: dict | None = None,
        api_key: str | None = API_KEY,
        cwd: Path | None = None,
    ):
        """model None: `apollo-train serve` with no MODEL, i.e. the built-in demo model."""
        self.workdir = workdir
        self.run_dir = workdir / "run"
        self.state_dir = workdir / "state"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        args = ["--enforce-eager", "--max-model-len", "512", "--dtype", "bfloat16", *vllm_args]
        if api_key:
            args += ["--api-key", api_key]
        env = {
            **SERVER_ENV,
            "APOLLO_TRAIN_RUN_DIR": str(self.run_dir),
            "APOLLO_TRAIN_STATE_DIR": str(self.state_dir),
            **(env or {}),
        }
        super().__init__(
            model, args, port=free_port(), log=workdir / "server.log", env=env, api_key=api_key, timeout=420,
            cwd=cwd,
        )


def until(predicate: Callable, timeout: float = 300, what: str = "the condition", every: float = 0.1):
    """Wait for an event: `predicate()`'s first truthy value. Fails, naming `what` and the last value, only
    after `timeout` seconds, which are generous (CI runs on 2 shared cores): tests observe events, they
    do not time them."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}; last: {value!r}")
        time.sleep(every)
    return value


@contextlib.contextmanager
def completions_running(client, threads: int = 1):
    """While inside, `threads` threads ask the server for completions one after another; yields the list of
    the requests' failures (serving must go on while training runs)."""
    failures: list[Exception] = []
    done = threading.Event()

    def keep_completing():
        while not done.is_set():
            try:
                client.request("POST", "/v1/completions", {"model": client.model(), "prompt": "hello", "max_tokens": 4})
            except Exception as exc:  # collected for the test to assert on
                failures.append(exc)

    workers = [threading.Thread(target=keep_completing) for _ in range(threads)]
    for t in workers:
        t.start()
    try:
        yield failures
    finally:
        done.set()
        for t in workers:
            t.join()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir):
    """Build (once per session) a tiny random model of a family."""

    def build(family: str = "qwen3") -> Path:
        return build_tiny_model(models_dir / family, family)

    return build


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Start servers for one test module; they are stopped when the module is done (each holds a
    few GiB: CI's machine fits a handful at once)."""
    servers = []

    def start(model: Path | None, *vllm_args: str, **kwargs) -> Server:
        server = Server(model, tmp_path_factory.mktemp("server"), *vllm_args, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory, models_dir) -> Server:
    """The one shared server for the end-to-end tests: `apollo-train serve` with no model (the
    built-in demo model, a tiny Qwen3, built into a test cache), API key on, a small queue and
    small request limits."""
    cache = models_dir / "cache"
    env = {"APOLLO_TRAIN_CACHE": str(cache), "APOLLO_TRAIN_QUEUE_SIZE": "2", "APOLLO_TRAIN_LR": "1e-3",
           "APOLLO_TRAIN_MAX_EXAMPLES_PER_REQUEST": "8", "APOLLO_TRAIN_MAX_JOB_TOKENS": "20000"}
    srv = Server(None, tmp_path_factory.mktemp("server"), env=env).start()
    try:
        srv.model = Path(srv.client.status()["model"])
        assert srv.model.resolve() == (cache / "demo-qwen3").resolve()
        yield srv
    finally:
        srv.stop()


SERVER_FIXTURES = {"server", "start_server"}


def pytest_collection_modifyitems(items):
    """`e2e`: the test runs a real vLLM server (CPU build); the rest are unit tests. `make test` runs both;
    `pytest -m "not e2e"` the unit tests alone, in seconds."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
