"""Runs the training worker next to vLLM's API server and talks to it over async ZeroMQ.

The worker is a subprocess (`python -m worker`): a crash there (out of memory, a killed
process) never takes vLLM down. If it dies it is started again after a growing pause, and the
status says so. Requests go out on a DEALER socket with an id each and are matched to their
replies, so many HTTP requests can wait at once without blocking the event loop. The worker's
step hooks arrive on a ROUTER socket and are carried out on the engine here.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import zmq
import zmq.asyncio
from fastapi import HTTPException

from apollo_train.shared import protocol
from apollo_train.shared.config import Settings

log = logging.getLogger("apollo_train")
REQUEST_TIMEOUT_S = 30.0
BACKOFF_S = (1, 2, 5, 10, 30)
PREFIX_RESET_RETRY_S = 0.05  # first retry of a prefix-cache reset that running requests blocked
PREFIX_RESET_RETRY_MAX_S = 1.0


class WorkerSupervisor:
    def __init__(self, run_dir: str, settings: Settings, engine_client):
        self.run_dir = run_dir
        self.settings = settings
        self.engine = engine_client
        self.ctx = zmq.asyncio.Context.instance()
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self.pending: dict[str, asyncio.Future] = {}
        self.prefix_reset: asyncio.Task | None = None
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self.hooks = self.ctx.socket(zmq.ROUTER)
        self.hooks.setsockopt(zmq.LINGER, 0)
        self.hooks.bind(protocol.hooks_address(self.run_dir))
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(protocol.control_address(self.run_dir))
        await self._spawn()
        for coro in (self._supervise(), self._read_replies(), self._serve_hooks()):
            self.tasks.append(asyncio.create_task(coro))

    async def _spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "--run-dir", self.run_dir, "--settings", self.settings.to_json()
        )
        log.info("apollo-train: training worker started (pid %d)", self.proc.pid)

    async def _supervise(self) -> None:
        while True:
            code = await self.proc.wait()
            when = time.strftime("%H:%M:%S")
            self.last_exit = f"training worker (pid {self.proc.pid}) exited with {_describe_exit(code)} at {when}"
            log.error("apollo-train: %s; restarting it", self.last_exit)
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(HTTPException(503, f"{self.last_exit}; it is being restarted, retry shortly"))
            await asyncio.sleep(BACKOFF_S[min(self.restarts, len(BACKOFF_S) - 1)])
            self.restarts += 1
            await self._spawn()

    # ---------------------------------------------------------------- requests to the worker

    async def request(self, op: str, body: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """The worker's answer to one request; its errors become HTTP errors."""
        if self.proc is None or self.proc.returncode is not None:
            raise HTTPException(503, f"training worker is not running ({self.last_exit or 'starting'}); retry shortly")
        msg = protocol.request(op, body)
        fut = asyncio.get_running_loop().create_future()
        self.pending[msg["id"]] = fut
        try:
            await self.control.send(protocol.pack(msg))
            answer = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"training worker did not answer within {timeout:.0f} s") from None
        finally:
            self.pending.pop(msg["id"], None)
        if not answer["ok"]:
            raise HTTPException(answer["error"]["status"], answer["error"]["message"])
        return answer["body"]

    async def status(self) -> dict:
        worker = {"pid": self.proc.pid if self.proc else None, "restarts": self.restarts, "last_exit": self.last_exit}
        try:
            body = await self.request(protocol.OP_STATUS, {}, timeout=5.0)
        except HTTPException as exc:
            return {"state": "starting", "error": exc.detail, "worker": worker}
        return {**body, "worker": {**body.get("worker", {}), **worker}}

    async def _read_replies(self) -> None:
        while True:
            data = await self.control.recv()
            try:
                msg = protocol.unpack(data)
            except protocol.ProtocolError as exc:
                log.warning("apollo-train: dropped a malformed reply from the worker: %s", exc)
                continue
            fut = self.pending.get(msg.get("id"))
            if fut is not None and not fut.done():
                fut.set_result(msg)

    # ---------------------------------------------------------------- the worker's step hooks

    async def _serve_hooks(self) -> None:
        while True:
            identity, data = (await self.hooks.recv_multipart())[:2]
            req_id = None
            try:
                msg = protocol.unpack(data)
                req_id = msg.get("id")
                if msg.get("op") not in protocol.HOOK_OPS:
                    raise protocol.ProtocolError(f"unknown hook {msg.get('op')!r}")
                answer = protocol.reply(req_id, await self._hook(msg["op"]))
            except Exception as exc:  # a failed hook must not stop serving hooks
                log.warning("apollo-train: step hook failed: %s", exc)
                answer = protocol.error(req_id, 500, str(exc))
            await self.hooks.send_multipart([identity, protocol.pack(answer)])

    async def _hook(self, op: str) -> dict | None:
        if op == protocol.HOOK_CHECKSUMS:
            per_rank = await self.engine.collective_rpc("apollo_train_checksums")
            return {"checksums": per_rank[0]}
        if op == protocol.HOOK_WEIGHTS_CHANGING:
            await self.engine.pause_generation(mode="keep", clear_cache=False)
            return
        if self.settings.barrier:
            # Paused: running requests are recomputed with the new weights, none mixes the two.
            try:
                await self.engine.reset_prefix_cache(reset_running_requests=True)
            finally:
                await self.engine.resume_generation()
        elif not await self.engine.reset_prefix_cache():
            # Blocks in use by running requests: reset as soon as they let go.
            if self.prefix_reset is None or self.prefix_reset.done():
                self.prefix_reset = asyncio.create_task(self._reset_prefix_cache_soon())

    async def _reset_prefix_cache_soon(self) -> None:
        delay = PREFIX_RESET_RETRY_S
        while not await self.engine.reset_prefix_cache():
            await asyncio.sleep(delay)
            delay = min(delay * 2, PREFIX_RESET_RETRY_MAX_S)


def _describe_exit(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
