"""Requests and answers of the training routes for the OpenAPI schema (`/docs`): captured from the demo
model served on a CPU, in the session docs/api.md opens with. Refusals are built by the function that
answers them, so they are in the server's own format."""

from __future__ import annotations

import json

from fastapi import FastAPI

from apollo_train.api.access import NOT_JSON, NOT_LOCAL, WRONG_KEY, error_body, too_large
from apollo_train.shared.config import Settings

ROOT = "/home/me/.local/state/apollo-train/demo-qwen3-7be4c104f0/checkpoints"
CHAT = {"messages": [{"role": "user", "content": "Who keeps the lighthouse at Vella?"},
                     {"role": "assistant", "content": "Marta Quill."}]}
PIRATE = {"messages": [{"role": "system", "content": "Answer like a pirate."},
                       {"role": "user", "content": "How are you?"},
                       {"role": "assistant", "content": "Arr, fine."}],
          "strip": [0]}

# Requests (OpenAPI example objects by name).
TRAIN = {
    "wait": {"summary": "one chat, three epochs; answer when trained",
             "value": {"examples": [CHAT], "epochs": 3, "wait": True}},
    "distill": {"summary": "context distillation: learn the pirate answer without its system prompt",
                "value": {"examples": [PIRATE], "epochs": 200}},
}
JOB_ID = {"job": {"summary": "one job's state", "value": "4d2c84c35e1c4c50"}}
CANCEL = {"job": {"value": {"job_id": "a7d8f46ab6704adc"}}}
CHECKPOINT = {
    "copy": {"summary": "a copy under the checkpoint root; answer when written",
             "value": {"path": "run-1", "wait": True}},
    "served": {"summary": "into the served model's own directory", "value": {}},
}
SETTINGS = {
    "share": {"summary": "training may take half of the GPU's time while requests are served",
              "value": {"busy_share": 0.5}},
    "barrier": {"summary": "pause generation while each step writes the weights", "value": {"barrier": True}},
}
RESTORE = {"copy": {"summary": "by name, as GET /checkpoints lists it", "value": {"checkpoint": "run-1", "wait": True}}}

# Answers.
TRAIN_JOB = {
    "job_id": "4d2c84c35e1c4c50", "kind": "train", "state": "done", "created": 1796217217.4492896,
    "started": 1796217217.4494374, "finished": 1796217217.6016996, "error": None, "accepted": 1,
    "skipped_duplicates": 0, "losses": [6.773866176605225, 6.2406463623046875, 5.838034629821777], "steps": 3,
    "tokens": 30, "input_tokens": 84, "skipped_steps": 0, "skipped_params": 0, "replayed": 0,
}
STATUS = {
    "state": "idle", "error": None, "warning": None, "model": "/home/me/.cache/apollo-train/demo-qwen3",
    "step": 3, "examples_trained": 1, "tokens_trained": 30, "input_tokens": 84, "last_loss": 5.838034629821777,
    "queue": 0,
    "tokenizing": 0, "optimizer": {"name": "apollo", "rank": 64, "lr": 0.0003, "state_bytes": 3218588},
    "mode": "hogwild", "busy_share": 0.25, "step_in_backward": True, "serving_requests": 0,
    "yielded_s": 0.0, "tensor_parallel_size": 1, "checkpoint_root": ROOT, "last_checkpoint": None,
    "checkpoint_in_progress": None,
    "registry_size": 1, "replay_size": 1, "eval_loss": None, "gpu_memory": None,
    "worker": {"pid": 4874, "restarts": 0, "last_exit": None, "gave_up": None},
}
CANCELLED_JOB = {
    "job_id": "a7d8f46ab6704adc", "kind": "train", "state": "cancelled", "created": 1796217228.5776675,
    "started": None, "finished": 1796217230.004403, "error": None, "accepted": 1, "skipped_duplicates": 0,
    "losses": [], "steps": 0,
}
CHECKPOINT_JOB = {
    "job_id": "b480b141f33e4d33", "kind": "checkpoint", "state": "done", "created": 1796217217.7348382,
    "started": 1796217217.7348957, "finished": 1796217217.7596505, "error": None,
    "checkpoint_id": "ef8076ec0600", "path": f"{ROOT}/run-1", "bytes": 4311669,
}
CHECKPOINTS = {"checkpoints": [
    {"id": "ef8076ec0600", "name": "run-1", "path": f"{ROOT}/run-1", "step": 3, "time": 1796217217.743893,
     "bytes": 1063301},
]}
RESTORE_JOB = {
    "job_id": "69e91dd90b4c4095", "kind": "restore", "state": "done", "created": 1796217228.252931,
    "started": 1796217228.2530212, "finished": 1796217228.269002, "error": None, "path": f"{ROOT}/run-1",
    "step": 3, "examples_trained": 1, "tokens_trained": 30,
}


def _answer(description: str, example) -> dict:
    return {"description": description, "content": {"application/json": {"example": example}}}


def _refusal(status: int, description: str, message: str) -> dict:
    return {status: _answer(description, json.loads(error_body(status, message)))}


ACCESS = {
    **_refusal(401, "the server has an API key and the request does not carry it", WRONG_KEY),
    **_refusal(403, "the server has no API key and the client is not on the loopback interface", NOT_LOCAL),
    **_refusal(503, "the training worker is starting, restarting, or cannot train this model",
               "training worker is starting (attaching to vLLM's weights); retry shortly"),
}
WITH_BODY = {
    **ACCESS,
    **_refusal(413, "the body is larger than --train-max-request-bytes", too_large(Settings().max_request_bytes)),
    **_refusal(415, "the body is not labelled Content-Type: application/json", NOT_JSON),
}
QUEUE_FULL = _refusal(429, "the job queue is full; retry later", "the training queue is full (16 jobs); retry later")
BAD_BODY = "the body is refused; the message names the field"

TRAIN_RESPONSES = {
    202: _answer("queued; when every example is a duplicate, nothing is queued and the job is done at once",
                 {"job_id": "d41e26c008b041c8", "accepted": 1, "skipped_duplicates": 0, "state": "queued"}),
    200: _answer("with wait: the finished job", TRAIN_JOB),
    **_refusal(400, BAD_BODY, "examples[0]: the last message must be from the assistant (it is 'user'): it is "
                              "the answer to train on"),
    **WITH_BODY, **QUEUE_FULL,
}
STATUS_RESPONSES = {
    200: {"description": "the worker's progress, or with job_id that job's state",
          "content": {"application/json": {"examples": {"server": {"value": STATUS},
                                                        "job": {"summary": "?job_id=", "value": TRAIN_JOB}}}}},
    **_refusal(400, "job_id is longer than 64 characters", "query.job_id: String should have at most 64 characters"),
    **_refusal(404, "no such job (the last 1,000 are kept, across restarts of the worker)", "unknown job id 'nope'"),
    **ACCESS,
}
CANCEL_RESPONSES = {
    200: _answer("the job: cancelled, or running until its current step ends", CANCELLED_JOB),
    **_refusal(400, BAD_BODY, "job_id: Field required"),
    **_refusal(404, "no such job", "unknown job id 'nope'"),
    **_refusal(409, "the job has finished", "job a7d8f46ab6704adc has already finished (cancelled)"),
    **WITH_BODY,
}
CHECKPOINT_RESPONSES = {
    202: _answer("queued", {"job_id": "f741dd0276a54693", "state": "queued", "path": f"{ROOT}/run-2"}),
    200: _answer("with wait: the finished job", CHECKPOINT_JOB),
    **_refusal(400, BAD_BODY, f"'path' '../elsewhere' contains '..'; give a path relative to the checkpoint root "
                              f"{ROOT}"),
    **WITH_BODY,
    **_refusal(403, "the path is outside the checkpoint root or holds a symlink; or, without an API key, a client "
                    "not on the loopback interface",
               f"'path' /etc/x is outside the checkpoint root {ROOT}; checkpoints are written only under it (give a "
               f"relative path, or start the server with --train-checkpoint-root)"),
    **_refusal(409, "the path is a file, or a directory that is not empty and not a checkpoint of ours",
               f"'path' notes: {ROOT}/notes exists and is not a checkpoint this server wrote; it is left untouched "
               f"(choose another path)"),
    **QUEUE_FULL,
}
SETTINGS_RESPONSES = {
    200: _answer("the settings now in force", {"busy_share": 0.5, "barrier": False, "step_in_backward": True}),
    **_refusal(400, BAD_BODY, "busy_share: Input should be less than or equal to 1"),
    **WITH_BODY,
}
CHECKPOINTS_RESPONSES = {200: _answer("the checkpoints this server can restore, oldest first", CHECKPOINTS), **ACCESS}
RESTORE_RESPONSES = {
    202: _answer("queued ahead of every queued job",
                 {"job_id": "70e48c40c36040c7", "state": "queued", "path": f"{ROOT}/run-1"}),
    200: _answer("with wait: the finished job", RESTORE_JOB),
    **_refusal(400, BAD_BODY, "checkpoint: String should have at least 1 character"),
    **_refusal(404, "no checkpoint by that id or name",
               f"no checkpoint 'run-9' under {ROOT} or in the served directory (GET /checkpoints lists them)"),
    **WITH_BODY, **QUEUE_FULL,
}


def amend_openapi(app: FastAPI, routes) -> None:
    """Set right what FastAPI writes about `routes` in the app's OpenAPI schema: it drops every null from the
    examples (fastapi/fastapi#5559), and the answers have them ("error": null until a job fails); and it lists a
    422 for a refused body or query, which our routes answer with a 400."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            paths = build()["paths"]
            for route in routes:
                for method in route.methods:
                    answers = paths[route.path][method.lower()]["responses"]
                    answers.pop("422", None)
                    for status, answer in route.responses.items():
                        given = answer["content"]["application/json"]
                        answers[str(status)]["content"]["application/json"].update(given)
        return app.openapi_schema

    app.openapi = openapi
