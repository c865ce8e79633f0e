"""Step hooks that ask the router (inside vLLM's API server) to act around each optimizer step.

After every step vLLM's prefix cache must be reset: its cached keys/values were computed with
the old weights and would keep old answers alive. With the step barrier on, generation is also
paused (requests kept) before the step and resumed after it, so no forward pass mixes weights.
"""

from __future__ import annotations

import logging

import zmq

from apollo_train.shared import protocol
from worker.trainer import StepHooks

log = logging.getLogger("apollo_train.worker")
HOOK_TIMEOUT_MS = 60_000


class RouterHooks(StepHooks):
    def __init__(self, context: zmq.Context, address: str, barrier: bool):
        self.barrier = barrier
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def _ask(self, op: str) -> dict | None:
        msg = protocol.request(op)
        self.socket.send(protocol.pack(msg))
        while self.socket.poll(HOOK_TIMEOUT_MS):
            answer = protocol.unpack(self.socket.recv())
            if answer.get("id") != msg["id"]:
                continue  # a late answer to an earlier, timed-out question
            if not answer["ok"]:
                log.warning("router could not %s: %s", op, answer["error"]["message"])
                return None
            return answer["body"]
        log.warning("router did not answer %s within %d s", op, HOOK_TIMEOUT_MS // 1000)

    def vllm_checksums(self) -> dict | None:
        """Checksums of the shared weights computed inside vLLM now (None if unavailable)."""
        body = self._ask(protocol.HOOK_CHECKSUMS)
        return {k: tuple(v) for k, v in body["checksums"].items()} if body else None

    def before_step(self) -> None:
        if self.barrier:
            self._ask(protocol.HOOK_WEIGHTS_CHANGING)

    def after_step(self) -> None:
        self._ask(protocol.HOOK_WEIGHTS_CHANGED)
