"""The worker's control loop: answers the router's requests over ZeroMQ, one at a time.

Every request gets a reply: a malformed or unknown message and any unexpected exception
become an error reply, so nothing a client sends can take the worker down. Requests are
answered at once (training runs in its own thread), and the loop exits when the process that
started the worker (vLLM's API server) is gone.
"""

from __future__ import annotations

import logging
import os

import zmq

from apollo_train.shared import protocol
from worker.service import RequestError, TrainingService

log = logging.getLogger("apollo_train.worker")


def handle(service: TrainingService, msg: dict) -> dict:
    op, body = msg["op"], msg["body"]
    if op == protocol.OP_PING:
        return {"state": service.state}
    if op == protocol.OP_STATUS:
        return service.status()
    if op == protocol.OP_JOB:
        return service.job(body.get("job_id"))
    if op == protocol.OP_TRAIN:
        return service.submit_train(body)
    if op == protocol.OP_CHECKPOINT:
        return service.submit_checkpoint(body)
    raise RequestError(400, f"unknown operation {op!r}")


def serve(service: TrainingService, socket: zmq.Socket) -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        if not socket.poll(1000):
            continue
        frames = socket.recv_multipart()
        identity, data = frames[0], frames[-1]
        req_id = None
        try:
            msg = protocol.unpack(data)
            req_id = msg.get("id")
            if "op" not in msg:
                raise protocol.ProtocolError("expected a request")
            answer = protocol.reply(req_id, handle(service, msg))
        except protocol.ProtocolError as exc:
            answer = protocol.error(req_id, 400, f"bad message: {exc}")
        except RequestError as exc:
            answer = protocol.error(req_id, exc.status, str(exc))
        except Exception as exc:
            log.exception("request failed")
            answer = protocol.error(req_id, 500, f"training worker error: {type(exc).__name__}: {exc}")
        socket.send_multipart([identity, protocol.pack(answer)])
    log.info("vLLM's API server is gone; training worker exits")
