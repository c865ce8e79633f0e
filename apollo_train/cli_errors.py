"""What the client commands say when a request fails: the server's own message (it carries the fix), and
the fix where only the client knows it (the key it sent, the URL it tried, a route this server lacks)."""

from __future__ import annotations

from apollo_train.client import HTTPError, Unreachable

KEY_HINT = "pass the server's API key with --api-key KEY or the APOLLO_TRAIN_API_KEY environment variable"


def explain(exc: HTTPError | Unreachable) -> str:
    if isinstance(exc, Unreachable):
        if isinstance(exc.reason, ConnectionRefusedError):
            return f"cannot reach {exc.url}: is `apollo-train serve` running?"
        return f"cannot reach {exc.url}: {exc.reason}"
    if exc.status in (401, 403):
        return f"{exc.message}\n  {KEY_HINT}"
    if exc.status in (404, 405) and not _ours(exc.body):
        return f"this server has no {exc.route} ({exc.message}): it runs an older apollo-train, or is not apollo-train"
    return exc.message


def _ours(body: dict | str) -> bool:
    """Our routes answer errors in vLLM's format; a route that does not exist answers FastAPI's `detail`."""
    return isinstance(body, dict) and isinstance(body.get("error"), dict)
