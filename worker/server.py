"""The worker's control loop: answers the router's requests over ZeroMQ.

Every request gets exactly one reply: a malformed or unknown message and any unexpected exception
become an error reply, so nothing a client sends can take the worker down. Most requests are
answered at once; /train is answered by the intake thread once its examples are tokenized, through
an outbox this loop drains (ZeroMQ sockets belong to one thread). The loop exits when asked to stop
(SIGTERM) or when the process that started the worker (vLLM's API server) is gone.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

import zmq

from apollo_train.shared import protocol
from worker.front_desk import FrontDesk

log = logging.getLogger("apollo_train.worker")
POLL_MS = 20  # how soon a deferred reply goes out


def handle(desk: FrontDesk, msg: dict, respond) -> dict | None:
    """The reply body, or None when `respond` will be called later."""
    op, body = msg["op"], msg["body"]
    if op == protocol.OP_PING:
        return {"state": desk.state.phase}
    if op == protocol.OP_STATUS:
        return desk.status()
    if op == protocol.OP_JOB:
        return desk.job(body)
    if op == protocol.OP_TRAIN:
        desk.submit_train(body, respond)
        return None
    if op == protocol.OP_CHECKPOINT:
        return desk.submit_checkpoint(body)
    if op == protocol.OP_CANCEL:
        return desk.cancel(body)
    if op == protocol.OP_CHECKPOINTS:
        return desk.checkpoints()
    if op == protocol.OP_RESTORE:
        return desk.submit_restore(body)
    if op == protocol.OP_SETTINGS:
        return desk.update_settings(body)
    raise protocol.BadRequest(f"unknown operation {op!r}")


def answer(req_id: str | None, result: dict | Exception) -> dict:
    if isinstance(result, protocol.RequestError):
        return protocol.error(req_id, result.status, str(result))
    if isinstance(result, protocol.ProtocolError):
        return protocol.error(req_id, 400, f"bad message: {result}")
    if isinstance(result, Exception):
        return protocol.error(req_id, 500, f"training worker error: {type(result).__name__}: {result}")
    return protocol.reply(req_id, result)


class Reply:
    """Answers one request, now or later from another thread, through the loop's outbox."""

    def __init__(self, outbox: queue.SimpleQueue, identity: bytes):
        self.outbox, self.identity, self.req_id = outbox, identity, None

    def __call__(self, result: dict | Exception) -> None:
        self.outbox.put([self.identity, protocol.pack(answer(self.req_id, result))])


def serve(desk: FrontDesk, socket: zmq.Socket, stop: threading.Event) -> None:
    parent = os.getppid()
    outbox: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
    while not stop.is_set() and os.getppid() == parent:
        while not outbox.empty():
            socket.send_multipart(outbox.get())
        if not socket.poll(POLL_MS):
            continue
        frames = socket.recv_multipart()
        reply = Reply(outbox, frames[0])
        try:
            msg = protocol.unpack(frames[-1])
            reply.req_id = msg.get("id")
            if "op" not in msg:
                raise protocol.ProtocolError("expected a request")
            result = handle(desk, msg, reply)
        except Exception as exc:
            if not isinstance(exc, (protocol.RequestError, protocol.ProtocolError)):
                log.exception("request failed")
            result = exc
        if result is not None:
            reply(result)
    log.info("training worker stops (%s)", "asked to" if stop.is_set() else "vLLM's API server is gone")
