"""vLLM endpoint plugin: the training routes on vLLM's own port.

The routes are thin: the access middleware (access.py) has already checked the caller and bounded
the body; they validate it with the shared schema, forward it over async ZeroMQ to the training
worker (supervisor.py) and answer with what it says. Nothing here blocks vLLM's event loop or
touches the inference path. At start, `init_state` checks what in-place training needs from this
vLLM (version, our load format and worker extension, a state dir of its own) and, where something
is missing, keeps vLLM serving while every training route answers 503 with the reason.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import logging
import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from apollo_train.api import openapi_examples
from apollo_train.api.access import AccessPolicy, TrainingAccess, error_body
from apollo_train.api.cache_salt import WeightVersionSalt
from apollo_train.api.metrics import TrainingMetrics
from apollo_train.api.supervisor import TRAIN_TIMEOUT_S, WorkerLink, WorkerSupervisor
from apollo_train.shared import protocol, vllm_version
from apollo_train.shared.answers import FINISHED
from apollo_train.shared.config import (
    ENDPOINT_PLUGIN,
    LOAD_FORMAT,
    LOAD_FORMAT_RANDOM,
    RUN_DIR_ENV,
    WORKER_EXTENSION,
    Settings,
    resolve_model_dir,
)
from apollo_train.shared.schema import (
    CancelRequest,
    CheckpointRequest,
    RestoreRequest,
    SettingsRequest,
    TrainRequest,
    describe_errors,
)

log = logging.getLogger("apollo_train")
WAIT_POLL_S = 0.25


class Training:
    """What the routes use: the link to the worker, the settings, or why training is unavailable."""

    def __init__(self, settings: Settings, link: WorkerLink | None = None, refusal: str | None = None):
        self.settings, self.link, self.refusal = settings, link, refusal

    def worker(self) -> WorkerLink:
        if self.link is None:
            raise HTTPException(503, f"training is unavailable on this server: {self.refusal}")
        return self.link


def _training(request: Request) -> Training:
    training = getattr(request.app.state, "apollo_train", None)
    if training is None:
        raise HTTPException(503, "training is not initialised on this server yet; retry shortly")
    return training


class TrainingRoute(APIRoute):
    """Our routes answer refusals in vLLM's error format with our messages: a body the shared schema
    refuses (FastAPI validates it with the same models) and any RequestError, with its status."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _error(400, describe_errors(exc.errors()))
            except protocol.RequestError as exc:
                return _error(exc.status, str(exc))
            except HTTPException as exc:  # the worker's answer: our message as it is (paths in it are the fix)
                return _error(exc.status_code, str(exc.detail))

        return handle


def _error(status: int, message: str) -> Response:
    return Response(error_body(status, message), status_code=status, media_type="application/json")


router = APIRouter(tags=["training"], route_class=TrainingRoute)


async def _wait_for(link: WorkerLink, job_id: str) -> dict:
    """The job once finished. Through a restart of the worker too: its journal keeps the job, which it reports
    failed if the worker died while it ran."""
    while True:
        try:
            job = await link.request(protocol.OP_JOB, {"job_id": job_id})
        except HTTPException as exc:
            if exc.status_code == 503 and not link.supervision().get("gave_up"):
                await asyncio.sleep(WAIT_POLL_S)  # restarting
                continue
            if exc.status_code != 404:
                raise
            raise HTTPException(503, f"job {job_id} was lost: the training worker restarted while it waited") from None
        if job["state"] in FINISHED:
            return job
        await asyncio.sleep(WAIT_POLL_S)


@router.post("/train", status_code=202, responses=openapi_examples.TRAIN_RESPONSES)
async def train(body: Annotated[TrainRequest, Body(openapi_examples=openapi_examples.TRAIN)],
                request: Request) -> Any:
    """Queue training on chat examples; the loss covers each example's last (assistant) message."""
    training = _training(request)
    link = training.worker()
    body.check_limits(training.settings)
    accepted = await link.request(protocol.OP_TRAIN, body.model_dump(exclude={"wait"}), timeout=TRAIN_TIMEOUT_S)
    if body.wait:
        return JSONResponse(await _wait_for(link, accepted["job_id"]), status_code=200)
    return accepted


@router.get("/train/status", responses=openapi_examples.STATUS_RESPONSES)
async def train_status(
    request: Request, job_id: str | None = Query(None, max_length=64, openapi_examples=openapi_examples.JOB_ID),
) -> dict:
    """The worker's progress, or one job's state with job_id."""
    training = _training(request)
    if job_id is not None:
        return await training.worker().request(protocol.OP_JOB, {"job_id": job_id})
    if training.link is None:
        return {"state": "error", "error": training.refusal}
    return await training.link.status()


@router.post("/train/cancel", responses=openapi_examples.CANCEL_RESPONSES)
async def cancel(body: Annotated[CancelRequest, Body(openapi_examples=openapi_examples.CANCEL)],
                 request: Request) -> dict:
    """Cancel a job: a queued one at once, a running one after its current step."""
    return await _training(request).worker().request(protocol.OP_CANCEL, body.model_dump())


@router.post("/checkpoint", status_code=202, responses=openapi_examples.CHECKPOINT_RESPONSES)
async def checkpoint(
    request: Request,
    body: Annotated[CheckpointRequest | None, Body(openapi_examples=openapi_examples.CHECKPOINT)] = None,
) -> Any:
    """Write the weights (HF safetensors) and the training state, without stalling inference."""
    link = _training(request).worker()
    body = body or CheckpointRequest()
    accepted = await link.request(protocol.OP_CHECKPOINT, body.model_dump(exclude={"wait"}))
    if body.wait:
        return JSONResponse(await _wait_for(link, accepted["job_id"]), status_code=200)
    return accepted


@router.get("/checkpoints", responses=openapi_examples.CHECKPOINTS_RESPONSES)
async def checkpoints(request: Request) -> dict:
    """The checkpoints this server can restore: the copies under its checkpoint root and the served directory's
    own ("served"), oldest first."""
    return await _training(request).worker().request(protocol.OP_CHECKPOINTS, {})


@router.post("/checkpoint/restore", status_code=202, responses=openapi_examples.RESTORE_RESPONSES)
async def restore(body: Annotated[RestoreRequest, Body(openapi_examples=openapi_examples.RESTORE)],
                  request: Request) -> Any:
    """Make a checkpoint the served model again, in place and without a restart: its weights, optimizer state,
    dedupe registry, replay buffer and counters. Runs ahead of queued jobs; a running job stops after its step."""
    link = _training(request).worker()
    accepted = await link.request(protocol.OP_RESTORE, body.model_dump(exclude={"wait"}))
    if body.wait:
        return JSONResponse(await _wait_for(link, accepted["job_id"]), status_code=200)
    return accepted


@router.post("/train/settings", responses=openapi_examples.SETTINGS_RESPONSES)
async def train_settings(body: Annotated[SettingsRequest, Body(openapi_examples=openapi_examples.SETTINGS)],
                         request: Request) -> dict:
    """Change how training shares the GPU with serving while the server runs (until it restarts); answers the
    settings now in force. An empty body changes nothing."""
    return await _training(request).worker().request(protocol.OP_SETTINGS, body.model_dump(exclude_none=True))


class TrainRouterPlugin:
    """The `vllm.endpoint_plugins` object (see vllm/plugins/endpoint_plugins/interface.py)."""

    name = ENDPOINT_PLUGIN
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        openapi_examples.amend_openapi(app, router.routes)
        app.add_middleware(WeightVersionSalt, run_dir=os.environ[RUN_DIR_ENV])
        app.add_middleware(TrainingAccess)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            return
        settings = Settings.from_env()
        state.apollo_train_access = AccessPolicy(
            keys=tuple(k.encode() for k in _api_keys(args)),
            allow_remote=settings.allow_remote,
            max_request_bytes=settings.max_request_bytes,
        )
        if settings.allow_remote and not state.apollo_train_access.keys:
            log.warning("apollo-train: --train-allow-remote: ANY client that reaches this port can train and "
                        "checkpoint the served model; set --api-key to require a key")
        state.apollo_train = await start_training(engine_client, settings, args)


async def start_training(engine_client, settings: Settings, args) -> Training:
    """Start (or, in an API-server process that is not the first, connect to) the training worker;
    or the reason it cannot run on this server."""
    run_dir = os.environ[RUN_DIR_ENV]
    try:
        refusal = _refusal(args)
        if refusal is None:
            settings = settings.resolved(resolve_model_dir(args.model))
    except ValueError as exc:
        refusal = str(exc)
    if refusal is not None:
        log.warning("apollo-train: training is unavailable: %s", refusal)
        return Training(settings, refusal=refusal)
    link = WorkerLink(run_dir)
    if _take_lock(Path(run_dir) / "supervisor.lock") is None:
        return Training(settings, link)  # another API-server process of this server supervises
    state_dir = Path(settings.state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if _take_lock(state_dir / ".lock") is None:
        refusal = (f"the state dir {state_dir} is in use by another apollo-train server; give this one its own "
                   f"with --train-state-dir")
        log.warning("apollo-train: training is unavailable: %s", refusal)
        return Training(settings, refusal=refusal)
    supervisor = WorkerSupervisor(run_dir, settings, engine_client, link, TrainingMetrics(_model_name(args)),
                                  ranks=getattr(args, "tensor_parallel_size", 1) or 1)
    await supervisor.start()
    return Training(settings, link)


def _refusal(args) -> str | None:
    """Why this vLLM cannot train in place, or None."""
    refusal, warning = vllm_version.check(vllm_version.installed())
    if warning:
        log.warning("apollo-train: %s", warning)
    if refusal:
        return refusal
    load_format = getattr(args, "load_format", None)
    if load_format not in (LOAD_FORMAT, LOAD_FORMAT_RANDOM):
        return (f"vLLM loads the weights with --load-format {load_format}; in-place training needs apollo-train's "
                f"loader: start with `apollo-train serve`, or pass --load-format {LOAD_FORMAT} "
                f"({LOAD_FORMAT_RANDOM} for random weights) and --worker-extension-cls {WORKER_EXTENSION}")
    extension = getattr(args, "worker_extension_cls", "")
    if not _extends_ours(extension):
        return (f"vLLM runs with --worker-extension-cls {extension or '(none)'}; in-place training needs "
                f"--worker-extension-cls {WORKER_EXTENSION} (or a class derived from it)")
    return None


def _extends_ours(qualname: str) -> bool:
    from apollo_train.vllm_worker.extension import TrainingWorkerExtension

    module, _, name = qualname.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, TrainingWorkerExtension)


_held_locks: list[int] = []


def _take_lock(path: Path) -> int | None:
    """An exclusive lock held for this process's life, or None if another process holds it."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    _held_locks.append(fd)
    return fd


def _model_name(args) -> str:
    """The `model_name` label vLLM's own metrics carry."""
    served = getattr(args, "served_model_name", None)
    return (served[0] if isinstance(served, list) else served) or args.model


def _api_keys(args) -> list[str]:
    """The keys vLLM itself accepts: --api-key (one or several) and VLLM_API_KEY."""
    given = getattr(args, "api_key", None) or []
    keys = [given] if isinstance(given, str) else list(given)
    return [k for k in (*keys, os.environ.get("VLLM_API_KEY")) if k]


def endpoint_plugin() -> TrainRouterPlugin:
    return TrainRouterPlugin()
