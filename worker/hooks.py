"""What the worker does around each optimizer step, through the router inside vLLM's API server.

After every step the weights' version is bumped (shared/weight_version.py): requests admitted from
then on are salted with it, so none reuses keys and values the old weights computed. With the step
barrier on, generation is also paused (requests kept) before the step and resumed after it, with
running requests recomputed, so no forward pass mixes weights; a pause that fails fails the step,
with the reason, before anything is written.
"""

from __future__ import annotations

import logging

import zmq

from apollo_train.shared import protocol
from apollo_train.shared.weight_version import WeightVersion
from worker.trainer import StepHooks

log = logging.getLogger("apollo_train.worker")
HOOK_TIMEOUT_MS = 60_000
WHAT = {protocol.HOOK_WEIGHTS_CHANGING: "pause generation", protocol.HOOK_WEIGHTS_CHANGED: "resume generation",
        protocol.HOOK_CHECKSUMS: "report the weights' checksums"}


class HookFailed(RuntimeError):
    """The router could not do what a step needs (e.g. pause generation); the step is not taken."""


class RouterHooks(StepHooks):
    def __init__(self, context: zmq.Context, address: str, run_dir: str, barrier: bool):
        self.barrier = barrier
        self.version = WeightVersion(run_dir, create=True)
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def _ask(self, op: str) -> dict:
        msg = protocol.request(op)
        self.socket.send(protocol.pack(msg))
        while self.socket.poll(HOOK_TIMEOUT_MS):
            answer = protocol.unpack(self.socket.recv())
            if answer.get("id") != msg["id"]:
                continue  # a late answer to an earlier, timed-out question
            if not answer["ok"]:
                raise HookFailed(f"vLLM could not {WHAT[op]}: {answer['error']['message']}")
            return answer["body"]
        raise HookFailed(f"vLLM's API server did not {WHAT[op]} within {HOOK_TIMEOUT_MS // 1000} s")

    @property
    def pauses_generation(self) -> bool:
        return self.barrier

    def vllm_checksums(self) -> list[dict] | None:
        """Checksums of the shared weights computed inside vLLM now, one dict per tensor-parallel rank
        (None if unavailable)."""
        try:
            body = self._ask(protocol.HOOK_CHECKSUMS)
        except HookFailed as exc:
            log.warning("%s; comparing with the checksums taken at load", exc)
            return None
        return [{k: tuple(v) for k, v in rank.items()} for rank in body["checksums"]]

    def before_step(self) -> None:
        if self.barrier:
            self._ask(protocol.HOOK_WEIGHTS_CHANGING)

    def after_step(self) -> None:
        self.version.bump()
        if self.barrier:
            self._ask(protocol.HOOK_WEIGHTS_CHANGED)
