"""Who may call the training routes, and how much they may send: checked before any body is read.

An ASGI middleware on the training paths (vLLM's own `--api-key` middleware guards only `/v1...`):
- with an API key (`--api-key` / `VLLM_API_KEY`): `Authorization: Bearer <key>`, compared in
  constant time as bytes; a missing, malformed or wrong header is a 401;
- without one: only loopback clients, others get a 403 naming `--api-key`, unless the operator
  passed `--train-allow-remote`;
- the body is read here, at most `--train-max-request-bytes` of it (413 beyond), and handed on if it
  is labelled JSON (415 otherwise: `curl -d` alone labels it a form, which would fail validation with
  a message that does not say why).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass
from http import HTTPStatus

from apollo_train.api.asgi import TooLarge, read_body, replaying

TRAINING_PATHS = ("/train", "/checkpoint", "/checkpoints")  # and everything below them
NOT_JSON = ("send the body as JSON, labelled Content-Type: application/json "
            "(curl: -H 'Content-Type: application/json', or --json)")
WRONG_KEY = "missing or wrong API key (send Authorization: Bearer <key>)"
NOT_LOCAL = ("the training routes answer only local clients when the server has no API key: start it with "
             "--api-key (or VLLM_API_KEY), or pass --train-allow-remote to accept any client")


@dataclass(frozen=True)
class AccessPolicy:
    keys: tuple[bytes, ...]
    allow_remote: bool
    max_request_bytes: int


def is_training_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in TRAINING_PATHS)


class TrainingAccess:
    """ASGI middleware; the policy is set on `app.state.apollo_train_access` once the plugin's state is up."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_training_path(scope["path"]):
            return await self.app(scope, receive, send)
        policy: AccessPolicy | None = getattr(scope["app"].state, "apollo_train_access", None)
        if policy is None:
            return await _refuse(send, 503, "training is not initialised on this server yet; retry shortly")
        refusal = check_caller(policy, scope)
        if refusal:
            return await _refuse(send, *refusal)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await _refuse(send, 400, "the Content-Length header is not a number")
        if declared is not None and int(declared) > policy.max_request_bytes:
            return await _refuse(send, 413, too_large(policy.max_request_bytes))
        try:
            body = await read_body(receive, policy.max_request_bytes)
        except TooLarge:
            return await _refuse(send, 413, too_large(policy.max_request_bytes))
        if body and not _is_json(scope):
            return await _refuse(send, 415, NOT_JSON)
        if body is not None:
            await self.app(scope, replaying(body, receive), send)


def check_caller(policy: AccessPolicy, scope) -> tuple[int, str] | None:
    """(status, message) refusing the caller, or None."""
    if policy.keys:
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not any(hmac.compare_digest(token, k) for k in policy.keys):
            return 401, WRONG_KEY
        return None
    if policy.allow_remote or _is_loopback(scope.get("client")):
        return None
    return 403, NOT_LOCAL


def _is_json(scope) -> bool:
    media_type = dict(scope["headers"]).get(b"content-type", b"").partition(b";")[0].strip().lower()
    return media_type == b"application/json"


def _is_loopback(client) -> bool:
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False  # a Unix socket path, or a name: not provably local


def too_large(max_request_bytes: int) -> str:
    return (f"request body is larger than {max_request_bytes} bytes (--train-max-request-bytes); "
            f"send fewer examples per request")


def error_body(status: int, message: str) -> bytes:
    """An error in vLLM's format."""
    return json.dumps({"error": {"message": message, "type": HTTPStatus(status).phrase, "param": None,
                                 "code": status}}).encode()


async def _refuse(send, status: int, message: str) -> None:
    body = error_body(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})



