"""Start and stop `apollo-train serve` as a child process: for the demo, the tests and the benchmarks.

The server runs in its own process group (vLLM's processes and the training worker), so one
signal stops all of it; its output goes to a log file whose tail explains a failed start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from apollo_train.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        model: str | os.PathLike | None,
        serve_args=(),
        *,
        port: int,
        log: Path,
        env: dict | None = None,
        api_key: str | None = None,
        timeout: float = 900,
        cwd: str | os.PathLike | None = None,
    ):
        """model None: the built-in demo model. `env` is added to this process's environment."""
        self.model, self.serve_args, self.port, self.timeout, self.cwd = model, list(serve_args), port, timeout, cwd
        self.log, self.env = Path(log), dict(env or {})
        self.url = f"http://127.0.0.1:{port}"
        self.client = Client(self.url, api_key=api_key, timeout=600)
        self.proc: subprocess.Popen | None = None
        self.started_s: float | None = None

    def start(self) -> "ServerProcess":
        model = [str(self.model)] if self.model else []
        cmd = [sys.executable, "-m", "apollo_train.cli", "serve", *model, "--port", str(self.port), *self.serve_args]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.cwd,
            )
        try:
            self.client.wait_until_ready(self.timeout, process=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"server did not start ({' '.join(cmd)}); log tail:\n{self.log_tail()}") from None
        self.started_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        except ProcessLookupError:
            pass

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
