"""Runs the training worker next to vLLM's API server and talks to it over async ZeroMQ.

`WorkerLink` is the client side every API-server process has: requests go out on a DEALER socket
with an id each and are matched to their replies, so many HTTP requests wait at once without
blocking the event loop. `WorkerSupervisor` is held by one API-server process (the one that takes
the run dir's supervisor lock; vLLM may run several): it starts the worker (`python -m worker`, from
the private run dir so nothing in the user's current directory can shadow it), restarts it with a
growing pause if it dies and gives up after repeated failures, and carries out the worker's step
hooks on the engine. Under tensor parallelism it starts one training rank per vLLM rank (rank 0 is the
worker the router talks to) and treats them as one: when any exits, it stops the others and restarts
the group. It owns the step barrier: it pauses generation when asked, and resumes it when
asked or as soon as the worker exits while generation is paused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections import deque
from pathlib import Path

import zmq
import zmq.asyncio
from fastapi import HTTPException

from apollo_train.api.metrics import TrainingMetrics
from apollo_train.shared import protocol
from apollo_train.shared.config import Settings
from apollo_train.shared.files import write_atomically
from apollo_train.shared.serving_load import serving_load

log = logging.getLogger("apollo_train")
REQUEST_TIMEOUT_S = 30.0
TRAIN_TIMEOUT_S = 300.0  # a /train reply waits for its examples to be tokenized
STATUS_TIMEOUT_S = 5.0
BACKOFF_S = (1, 2, 5, 10, 30)
GIVE_UP_AFTER = 5  # worker exits within GIVE_UP_WINDOW_S: stop restarting it
GIVE_UP_WINDOW_S = 600.0
SUPERVISION_FILE = "supervision.json"
GROUP_STOP_S = 30.0  # the other ranks' time to exit after SIGTERM (a checkpoint write gets 20 s of it)
LOAD_POLL_S = 0.005  # how often vLLM's requests in flight are published to the worker (a decode step is ms)


class WorkerLink:
    """Requests to the training worker's control socket, from any API-server process."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(protocol.control_address(run_dir))
        self.pending: dict[str, asyncio.Future] = {}
        self.reader = asyncio.create_task(self._read_replies())

    async def request(self, op: str, body: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """The worker's answer to one request; its errors become HTTP errors."""
        unavailable = self.unavailable()
        if unavailable:
            raise HTTPException(503, unavailable)
        msg = protocol.request(op, body)
        fut = asyncio.get_running_loop().create_future()
        self.pending[msg["id"]] = fut
        try:
            await self.socket.send(protocol.pack(msg))
            answer = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"training worker did not answer within {timeout:.0f} s") from None
        finally:
            self.pending.pop(msg["id"], None)
        if not answer["ok"]:
            raise HTTPException(answer["error"]["status"], answer["error"]["message"])
        return answer["body"]

    def fail_pending(self, reason: str) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(HTTPException(503, reason))

    def supervision(self) -> dict:
        """What the supervisor (maybe in another API-server process) says about the worker."""
        try:
            return json.loads((Path(self.run_dir) / SUPERVISION_FILE).read_text())
        except (OSError, ValueError):
            return {"pid": None, "restarts": 0, "last_exit": None, "gave_up": None}

    def unavailable(self) -> str | None:
        s = self.supervision()
        if s.get("gave_up"):
            return s["gave_up"]
        if s.get("pid") is None:
            return f"training worker is not running ({s.get('last_exit') or 'starting'}); retry shortly"
        return None

    async def status(self) -> dict:
        worker = self.supervision()
        if worker.get("gave_up"):
            return {"state": "error", "error": worker["gave_up"], "worker": worker}
        try:
            body = await self.request(protocol.OP_STATUS, {}, timeout=STATUS_TIMEOUT_S)
        except HTTPException as exc:
            return {"state": "starting", "error": exc.detail, "worker": worker}
        return {**body, "worker": worker}

    async def _read_replies(self) -> None:
        while True:
            data = await self.socket.recv()
            try:
                msg = protocol.unpack(data)
            except protocol.ProtocolError as exc:
                log.warning("apollo-train: dropped a malformed reply from the worker: %s", exc)
                continue
            fut = self.pending.get(msg.get("id"))
            if fut is not None and not fut.done():
                fut.set_result(msg)


class WorkerSupervisor:
    """Starts, restarts and serves the hooks of the training worker (one per server)."""

    def __init__(self, run_dir: str, settings: Settings, engine_client, link: WorkerLink, metrics: TrainingMetrics,
                 ranks: int = 1):
        self.run_dir = run_dir
        self.metrics = metrics
        self.settings = settings
        self.engine = engine_client
        self.link = link
        self.ranks = ranks  # one training rank per vLLM tensor-parallel rank
        self.procs: list[asyncio.subprocess.Process] = []  # rank 0 (the worker the router talks to) first
        self.restarts = 0
        self.exits: deque[float] = deque(maxlen=GIVE_UP_AFTER)
        self.last_exit: str | None = None
        self.gave_up: str | None = None
        self.paused = False
        self.barrier = {"pauses": 0, "resumes": 0, "resumed_after_exit": 0}
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self.hooks = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self.hooks.setsockopt(zmq.LINGER, 0)
        self.hooks.bind(protocol.hooks_address(self.run_dir))
        self.events = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind(protocol.metrics_address(self.run_dir))
        self.load = serving_load(self.run_dir, create=True)
        await self._spawn()
        for coro in (self._supervise(), self._serve_hooks(), self._record_metrics(), self._publish_load()):
            self.tasks.append(asyncio.create_task(coro))

    async def _spawn(self) -> None:
        """Start every rank of the training group (a fresh rendezvous: the last group's is stale)."""
        protocol.rendezvous_path(self.run_dir).unlink(missing_ok=True)
        self.procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "--run-dir", self.run_dir, "--settings", self.settings.to_json(),
            "--rank", str(rank), cwd=self.run_dir,
        ) for rank in range(self.ranks)]
        self._publish()
        log.info("apollo-train: training worker started (pid %s)", ", ".join(str(p.pid) for p in self.procs))

    def _publish(self) -> None:
        """Write what the supervisor knows where every API-server process reads it (WorkerLink.supervision)."""
        running = bool(self.procs) and all(p.returncode is None for p in self.procs)
        info = {"pid": self.procs[0].pid if running else None, "restarts": self.restarts,
                "last_exit": self.last_exit, "gave_up": self.gave_up}
        if self.ranks > 1:
            info["rank_pids"] = [p.pid for p in self.procs] if running else None
        if self.settings.barrier or self.barrier["pauses"]:
            info["barrier"] = self.barrier
        path = Path(self.run_dir) / SUPERVISION_FILE
        write_atomically(path, json.dumps(info).encode())

    async def _supervise(self) -> None:
        while True:
            rank, code = await self._first_exit()
            now = time.monotonic()
            self.exits.append(now)
            who = "training worker" if rank == 0 else f"training rank {rank} of {self.ranks}"
            self.last_exit = (f"{who} (pid {self.procs[rank].pid}) exited with {_describe_exit(code)} "
                              f"at {time.strftime('%H:%M:%S')}")
            if self.paused:
                await self._resume_if_paused()
                self.barrier["resumed_after_exit"] += 1
                log.warning("apollo-train: the worker exited while generation was paused; generation resumed")
            if len(self.exits) == GIVE_UP_AFTER and now - self.exits[0] < GIVE_UP_WINDOW_S:
                self.gave_up = (f"the training worker exited {GIVE_UP_AFTER} times within "
                                f"{GIVE_UP_WINDOW_S / 60:.0f} minutes (last: {self.last_exit}); it is not restarted "
                                f"again: see the server's log for the cause, then restart the server")
                log.error("apollo-train: %s", self.gave_up)
            else:
                log.error("apollo-train: %s; restarting it", self.last_exit)
            self._publish()
            self.link.fail_pending(self.gave_up or f"{self.last_exit}; it is being restarted, retry shortly")
            if self.gave_up:
                return
            await asyncio.sleep(BACKOFF_S[min(self.restarts, len(BACKOFF_S) - 1)])
            self.restarts += 1
            self.metrics.restarts.inc()
            await self._spawn()

    async def _first_exit(self) -> tuple[int, int]:
        """(rank, exit code) of the first rank to exit; the others are then stopped, as one group (killed if
        they have not exited once rank 0 has had its time to finish a checkpoint write)."""
        waits = [asyncio.ensure_future(p.wait()) for p in self.procs]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        rank = next(i for i, w in enumerate(waits) if w.done())
        self._terminate()
        _, stuck = await asyncio.wait(waits, timeout=GROUP_STOP_S)
        for p in self.procs:
            if p.returncode is None:
                p.kill()
        await asyncio.gather(*stuck)
        return rank, self.procs[rank].returncode

    def _terminate(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)

    async def _publish_load(self) -> None:
        """vLLM's generation requests in flight, for the worker's governor (worker/governor.py): this API-server
        process's requests (all of them, with vLLM's default of one API server)."""
        processor = getattr(self.engine, "output_processor", None)
        count = getattr(processor, "get_num_unfinished_requests", None)
        if count is None:
            log.warning("apollo-train: this vLLM does not tell its requests in flight; training does not yield the "
                        "GPU to serving (--train-busy-share has no effect)")
            return
        last = None
        while True:
            now = count()
            if now != last:
                self.load.write(now)
                last = now
            await asyncio.sleep(LOAD_POLL_S)

    async def _record_metrics(self) -> None:
        while True:
            data = await self.events.recv()
            try:
                self.metrics.record(protocol.unpack(data)["body"])
            except (protocol.ProtocolError, KeyError, TypeError, ValueError) as exc:
                log.warning("apollo-train: dropped a malformed metric event from the worker: %s", exc)

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
            except Exception as exc:  # a failed hook must not stop serving hooks; the worker gets the reason
                log.warning("apollo-train: step hook failed: %s", exc)
                answer = protocol.error(req_id, 500, f"{type(exc).__name__}: {exc}")
            await self.hooks.send_multipart([identity, protocol.pack(answer)])

    async def _hook(self, op: str) -> dict | None:
        if op == protocol.HOOK_CHECKSUMS:
            return {"checksums": await self.engine.collective_rpc("apollo_train_checksums")}  # one per rank
        if op == protocol.HOOK_WEIGHTS_CHANGING:
            await self.engine.pause_generation(mode="keep", clear_cache=False)
            self.paused = True
            self.barrier["pauses"] += 1
            self._publish()
            return None
        # HOOK_WEIGHTS_CHANGED, barrier mode: running requests are recomputed with the new weights, so
        # none mixes the two, then generation goes on.
        try:
            await self.engine.reset_prefix_cache(reset_running_requests=True)
        finally:
            await self._resume_if_paused()
        return None

    async def _resume_if_paused(self) -> None:
        if self.paused:
            await self.engine.resume_generation()
            self.paused = False
            self.barrier["resumes"] += 1
            self._publish()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
