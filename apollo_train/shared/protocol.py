"""The wire between the router (inside vLLM's API server) and the training worker.

Every message is one msgpack-encoded map. Requests carry a protocol version, an id, an op
name and a body; replies echo the id and carry either a body or an error with the HTTP status
the router should answer with. Both processes import this module, so the message shapes are
defined here once.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import msgpack

VERSION = 1

# Router -> worker (answered on the control socket).
OP_PING = "ping"
OP_STATUS = "status"
OP_JOB = "job"
OP_TRAIN = "train"
OP_CHECKPOINT = "checkpoint"
OP_CANCEL = "cancel"
OP_CHECKPOINTS = "checkpoints"
OP_RESTORE = "restore"
OP_SETTINGS = "settings"
# Worker -> router, one-way (the metrics socket): an event for /metrics.
OP_METRICS = "metrics"

# Worker -> router (answered on the hooks socket): the worker asks vLLM to act around a step.
HOOK_WEIGHTS_CHANGING = "weights_changing"  # step barrier: pause generation before writing
HOOK_WEIGHTS_CHANGED = "weights_changed"  # reset the prefix cache (and resume, with the barrier)
HOOK_CHECKSUMS = "checksums"  # checksums of the weights as vLLM holds them now (parity on attach)
HOOK_OPS = frozenset({HOOK_WEIGHTS_CHANGING, HOOK_WEIGHTS_CHANGED, HOOK_CHECKSUMS})


class ProtocolError(ValueError):
    """A message that is not valid msgpack or does not have the expected shape."""


class RequestError(Exception):
    """A request refused with an HTTP status: the worker replies with `status` and the message, the
    router answers with them. Every status the training API answers is one of these classes."""

    status = 400


class BadRequest(RequestError):
    status = 400


class Forbidden(RequestError):
    status = 403


class NotFound(RequestError):
    status = 404


class Conflict(RequestError):
    status = 409


class Busy(RequestError):
    """Full queue: retry later."""

    status = 429


class Unavailable(RequestError):
    """The worker is starting, restarting, or cannot train this model."""

    status = 503


def request(op: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"v": VERSION, "id": uuid.uuid4().hex, "op": op, "body": body or {}}


def reply(req_id: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "ok": True, "body": body or {}}


def error(req_id: str | None, status: int, message: str) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "ok": False, "error": {"status": status, "message": message}}


def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    """Decode one message, raising ProtocolError for anything malformed or from another version."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not a msgpack message: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a map")
    if msg.get("v") != VERSION:
        raise ProtocolError(f"protocol version {msg.get('v')!r} is not {VERSION}; restart both processes")
    if not isinstance(msg.get("id"), (str, type(None))):
        raise ProtocolError("message id must be a string")
    if "op" in msg:
        if not isinstance(msg["op"], str) or not isinstance(msg.get("body"), dict):
            raise ProtocolError("request needs a string 'op' and a map 'body'")
    elif "ok" in msg:
        if msg["ok"] is True and not isinstance(msg.get("body"), dict):
            raise ProtocolError("reply needs a map 'body'")
        if msg["ok"] is False and not isinstance(msg.get("error"), dict):
            raise ProtocolError("error reply needs a map 'error'")
    else:
        raise ProtocolError("message is neither a request nor a reply")
    return msg


def control_address(run_dir: str | os.PathLike) -> str:
    """Bound by the worker; the router's requests (train, status, checkpoint) go here."""
    return f"ipc://{os.path.join(run_dir, 'control.sock')}"


def metrics_address(run_dir: str | os.PathLike) -> str:
    """Bound by the supervising router; the worker pushes metric events here."""
    return f"ipc://{os.path.join(run_dir, 'metrics.sock')}"


def hooks_address(run_dir: str | os.PathLike) -> str:
    """Bound by the router; the worker's step hooks (reset the prefix cache, pause) go here."""
    return f"ipc://{os.path.join(run_dir, 'hooks.sock')}"


def rendezvous_path(run_dir: str | os.PathLike) -> Path:
    """Where a tensor-parallel training group's ranks meet (torch.distributed's file store); the
    supervisor removes it before starting a group, since a dead group's file would mislead the next."""
    return Path(run_dir) / "tp-rendezvous"
