"""A small HTTP client for a server running apollo-train (standard library only).

Used by the `apollo-train` client commands, the demo, the benchmarks and the tests; any HTTP client
works the same way.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request


class HTTPError(RuntimeError):
    def __init__(self, status: int, body: dict | str, route: str | None = None):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body
        self.route = route  # "POST /train": which request it answers

    @property
    def message(self) -> str:
        """The server's own message: vLLM's error format, FastAPI's `detail`, or the raw body."""
        if isinstance(self.body, dict):
            error = self.body.get("error")
            if isinstance(error, dict) and error.get("message"):
                return str(error["message"])
            if self.body.get("detail"):
                return str(self.body["detail"])
        return str(self.body) or f"HTTP {self.status}"


class Unreachable(ConnectionError):
    """No HTTP answer at all: nothing listens on the URL, or the network is in the way."""

    def __init__(self, url: str, reason: object):
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        if self.api_key:
            req.add_header("authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raw = exc.read().decode(errors="replace")
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw
            raise HTTPError(exc.code, payload, f"{method} {path.partition('?')[0]}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unreachable(self.base_url, getattr(exc, "reason", exc)) from None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_until_ready(self, timeout: float = 600, process=None) -> None:
        """Wait for vLLM's /health and for the training worker to leave 'starting'."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with code {process.returncode}")
            if self.healthy() and self.status().get("state") not in (None, "starting"):
                return
            time.sleep(1)
        raise TimeoutError(f"server at {self.base_url} not ready after {timeout:.0f} s")

    def model(self) -> str:
        return self.request("GET", "/v1/models")["data"][0]["id"]

    def status(self, job_id: str | None = None) -> dict:
        return self.request("GET", "/train/status" + (f"?job_id={urllib.parse.quote(job_id)}" if job_id else ""))

    def train(self, examples: list[dict], **options) -> dict:
        return self.request("POST", "/train", {"examples": examples, **options})

    def settings(self, **changes) -> dict:
        """Change the server's runtime settings (busy_share, barrier, step_in_backward); the settings now."""
        return self.request("POST", "/train/settings", changes)

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", "/train/cancel", {"job_id": job_id})

    def checkpoint(self, path: str | None = None, wait: bool = False) -> dict:
        return self.request("POST", "/checkpoint", {"path": path, "wait": wait})

    def checkpoints(self) -> list[dict]:
        return self.request("GET", "/checkpoints")["checkpoints"]

    def restore(self, checkpoint: str, wait: bool = False) -> dict:
        return self.request("POST", "/checkpoint/restore", {"checkpoint": checkpoint, "wait": wait})

    def chat(self, messages: list[dict], max_tokens: int = 32) -> str:
        body = {"model": self.model(), "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        return self.request("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"]

    def answer_logprob(self, prompt: str, answer: str) -> float:
        """Sum of the served log-probabilities of `answer`'s tokens after `prompt` (echo + logprobs)."""
        body = {
            "model": self.model(),
            "prompt": prompt + answer,
            "max_tokens": 1,
            "echo": True,
            "logprobs": 0,
            "temperature": 0,
        }
        lp = self.request("POST", "/v1/completions", body)["choices"][0]["logprobs"]
        start = len(prompt)
        return sum(
            v
            for off, v in zip(lp["text_offset"], lp["token_logprobs"])
            if v is not None and start <= off < start + len(answer)
        )
