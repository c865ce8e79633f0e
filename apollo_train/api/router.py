"""vLLM endpoint plugin: /train, /train/status and /checkpoint on vLLM's own port.

The routes are thin: they check the API key and the request's shape, then forward it over
async ZeroMQ to the training worker (see supervisor.py, which starts and restarts it) and
answer with what it says. Nothing here blocks vLLM's event loop or touches the inference path;
the only calls into the engine are the ones the worker asks for around an optimizer step
(reset the prefix cache; pause and resume generation with the step barrier).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from apollo_train.shared import protocol
from apollo_train.shared.config import ENDPOINT_PLUGIN, RUN_DIR_ENV, Settings
from apollo_train.api.supervisor import WorkerSupervisor

log = logging.getLogger("apollo_train")
WAIT_POLL_S = 0.25


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Example(BaseModel):
    messages: list[Message] = Field(
        min_length=1, description="OpenAI-style chat; the last message (assistant) is the target"
    )
    strip: list[int] = Field(
        default_factory=list, description="indices of context messages to remove before tokenizing"
    )


class TrainRequest(BaseModel):
    examples: list[Example] = Field(min_length=1)
    epochs: int = Field(1, ge=1, le=1000)
    lr: float | None = Field(None, gt=0, description="learning rate for this job (default: the server's)")
    force: bool = Field(False, description="train examples already trained before")
    wait: bool = Field(False, description="answer when the job has finished")


class TrainAccepted(BaseModel):
    job_id: str
    accepted: int
    skipped_duplicates: int
    state: str


class CheckpointRequest(BaseModel):
    path: str | None = Field(
        None, description="absolute directory for a complete model copy (default: the served model's own directory)"
    )
    wait: bool = False


def _api_keys(args) -> list[str]:
    """The keys vLLM itself accepts: --api-key (one or several) and VLLM_API_KEY."""
    given = getattr(args, "api_key", None) or []
    keys = [given] if isinstance(given, str) else list(given)
    return [k for k in (*keys, os.environ.get("VLLM_API_KEY")) if k]


def _check_api_key(request: Request) -> None:
    """vLLM's --api-key middleware guards only /v1 and a few other prefixes: guard ours too."""
    keys = getattr(request.app.state, "apollo_train_api_keys", [])
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(token, k) for k in keys):
        raise HTTPException(status_code=401, detail="missing or wrong API key (Authorization: Bearer <key>)")


def _supervisor(request: Request) -> WorkerSupervisor:
    sup = getattr(request.app.state, "apollo_train", None)
    if sup is None:
        raise HTTPException(status_code=503, detail="training is not initialised on this server")
    return sup


router = APIRouter(tags=["training"], dependencies=[Depends(_check_api_key)])


async def _wait_for(sup: WorkerSupervisor, job_id: str) -> dict:
    while True:
        try:
            job = await sup.request(protocol.OP_JOB, {"job_id": job_id})
        except HTTPException as exc:
            if exc.status_code != 404:
                raise
            raise HTTPException(503, f"job {job_id} was lost: the training worker restarted while it waited") from None
        if job["state"] in ("done", "failed"):
            return job
        await asyncio.sleep(WAIT_POLL_S)


@router.post("/train", status_code=202, response_model=None, responses={202: {"model": TrainAccepted}})
async def train(body: TrainRequest, request: Request) -> Any:
    """Queue training on chat examples; the loss covers each example's last (assistant) message."""
    sup = _supervisor(request)
    payload = body.model_dump(exclude={"wait"})
    accepted = await sup.request(protocol.OP_TRAIN, payload)
    if body.wait:
        return JSONResponse(await _wait_for(sup, accepted["job_id"]), status_code=200)
    return accepted


@router.get("/train/status")
async def train_status(request: Request, job_id: str | None = Query(None)) -> dict:
    """The worker's progress, or one job's state with job_id."""
    sup = _supervisor(request)
    if job_id is not None:
        return await sup.request(protocol.OP_JOB, {"job_id": job_id})
    return await sup.status()


@router.post("/checkpoint", status_code=202)
async def checkpoint(request: Request, body: CheckpointRequest | None = None) -> Any:
    """Write the weights (HF safetensors) and the training state, without stalling inference."""
    sup = _supervisor(request)
    body = body or CheckpointRequest()
    accepted = await sup.request(protocol.OP_CHECKPOINT, {"path": body.path})
    if body.wait:
        return JSONResponse(await _wait_for(sup, accepted["job_id"]), status_code=200)
    return accepted


class TrainRouterPlugin:
    """The `vllm.endpoint_plugins` object (see vllm/plugins/endpoint_plugins/interface.py)."""

    name = ENDPOINT_PLUGIN
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            return
        state.apollo_train_api_keys = _api_keys(args)
        settings = Settings.from_env()
        sup = WorkerSupervisor(os.environ[RUN_DIR_ENV], settings, engine_client)
        await sup.start()
        state.apollo_train = sup


def endpoint_plugin() -> TrainRouterPlugin:
    return TrainRouterPlugin()
