"""Shared fixtures: tiny random models and real vLLM servers (the CPU build) with our plugins."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from apollo_train.client import Client
from apollo_train.cpu import enable_amx
from apollo_train.tiny_models import build_tiny_model

enable_amx()  # for the tests that train in this process
API_KEY = "test-key"
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`apollo-train serve` on a model, in its own process group, logging to a file."""

    def __init__(
        self, model: Path | None, workdir: Path, *vllm_args: str, env: dict | None = None, api_key: str | None = API_KEY
    ):
        """model None: `apollo-train serve` with no MODEL, i.e. the built-in demo model."""
        self.model, self.workdir = model, workdir
        self.port = free_port()
        self.run_dir = workdir / "run"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "server.log"
        self.env = {
            **os.environ,
            **SERVER_ENV,
            "APOLLO_TRAIN_RUN_DIR": str(self.run_dir),
            "APOLLO_TRAIN_STATE_DIR": str(self.state_dir),
            **(env or {}),
        }
        self.args = [
            "--port",
            str(self.port),
            "--enforce-eager",
            "--max-model-len",
            "512",
            "--dtype",
            "bfloat16",
            *vllm_args,
        ]
        if api_key:
            self.args += ["--api-key", api_key]
        self.client = Client(f"http://127.0.0.1:{self.port}", api_key=api_key, timeout=300)
        self.proc = None

    def start(self, timeout: float = 420) -> "Server":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "apollo_train.cli",
            "serve",
            *([str(self.model)] if self.model else []),
            *self.args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self.client.wait_until_ready(timeout, process=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"server did not start; log tail:\n{self.log_tail()}") from None
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir):
    """Build (once per session) a tiny random model of a family."""

    def build(family: str = "qwen3") -> Path:
        return build_tiny_model(models_dir / family, family)

    return build


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Start extra servers; all are stopped at the end of the session."""
    servers = []

    def start(model: Path | None, *vllm_args: str, **kwargs) -> Server:
        server = Server(model, tmp_path_factory.mktemp("server"), *vllm_args, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, models_dir) -> Server:
    """The one shared server for the end-to-end tests: `apollo-train serve` with no model (the
    built-in demo model, a tiny Qwen3, built into a test cache), API key on, a small queue."""
    cache = models_dir / "cache"
    env = {"APOLLO_TRAIN_CACHE": str(cache), "APOLLO_TRAIN_QUEUE_SIZE": "2", "APOLLO_TRAIN_LR": "1e-3"}
    srv = start_server(None, env=env)
    srv.model = Path(srv.client.status()["model"])
    assert srv.model.resolve() == (cache / "demo-qwen3").resolve()
    return srv
