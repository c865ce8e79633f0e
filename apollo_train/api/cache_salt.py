"""Requests admitted after an optimizer step never reuse keys and values the old weights computed.

vLLM's prefix cache keys blocks by their tokens and the request's `cache_salt`. This ASGI middleware
salts every generation request with the weights' version (shared/weight_version.py), so blocks cached
before a step are never matched after it: no cache reset is needed, and none can fail because running
requests hold blocks. Stale blocks are evicted like any unused block. A salt the client sent is kept
(combined with ours), so per-user cache isolation still holds. Until the first step nothing changes.
"""

from __future__ import annotations

import hashlib
import json

from apollo_train.api.asgi import read_body, replaying
from apollo_train.shared.weight_version import WeightVersion

GENERATION_PATHS = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/inference/v1/generate"}
)
MAX_SALT = 128  # vLLM's limit


def salted(body: bytes, version: int) -> bytes:
    """The request body with `cache_salt` naming the weights' version; unchanged if not a JSON object."""
    try:
        request = json.loads(body)
    except ValueError:
        return body  # vLLM answers the parse error
    if not isinstance(request, dict):
        return body
    ours = f"apollo-train-w{version}"
    theirs = request.get("cache_salt")
    salt = f"{theirs}-{ours}" if isinstance(theirs, str) and theirs else ours
    if len(salt) > MAX_SALT:
        salt = hashlib.sha256(salt.encode("utf-8", "surrogatepass")).hexdigest()
    request["cache_salt"] = salt
    return json.dumps(request).encode()


class WeightVersionSalt:
    def __init__(self, app, run_dir: str):
        self.app = app
        self.version = WeightVersion(run_dir)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        version = self.version.read()
        if version == 0:
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        if body is None:
            return
        body = salted(body, version)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, replaying(body, receive), send)
