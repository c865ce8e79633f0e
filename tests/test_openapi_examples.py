"""Every training route shows, in the OpenAPI schema, a request the schema accepts and the answers the server
gives: its success, and each refusal in vLLM's error format with its own status."""

from __future__ import annotations

import typing

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from apollo_train.api import openapi_examples
from apollo_train.api.router import TrainRouterPlugin, router
from apollo_train.shared import schema
from apollo_train.shared.answers import JobAnswer, StatusAnswer
from apollo_train.shared.config import RUN_DIR_ENV

ROUTES = [r for r in router.routes if isinstance(r, APIRoute)]


@pytest.fixture
def openapi(monkeypatch, tmp_path) -> dict:
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    app = FastAPI()
    TrainRouterPlugin().attach_router(app)
    return app.openapi()


def _operations(openapi: dict):
    for route in ROUTES:
        for method in route.methods:
            yield route, openapi["paths"][route.path][method.lower()]


def _examples(content: dict) -> list:
    media = content["content"]["application/json"]
    if "example" in media:
        return [media["example"]]
    return [e["value"] for e in media["examples"].values()]


def _model(route: APIRoute) -> type:
    """The body's model: `CheckpointRequest | None` is a CheckpointRequest (or no body)."""
    annotation = route.body_field.field_info.annotation
    return next((t for t in typing.get_args(annotation) if t is not type(None)), annotation)


@pytest.mark.parametrize("route", [r for r in ROUTES if r.body_field], ids=lambda r: r.path)
def test_request_examples_are_valid(openapi, route):
    model = _model(route)
    examples = openapi["paths"][route.path]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert examples
    for example in examples.values():
        schema.parse(model, example["value"])


def test_answers_and_query_have_examples(openapi):
    for route, op in _operations(openapi):
        assert all(param.get("examples") for param in op.get("parameters", [])), route.path
        success = op["responses"][str(route.status_code or 200)]
        assert _examples(success), route.path
        if route.status_code == 202:  # with wait: 200, the finished job
            for job in _examples(op["responses"]["200"]):
                JobAnswer.model_validate(job)
        for status, answer in op["responses"].items():
            assert status != "422", route.path  # a refused body or query is a 400
            if status.startswith("4") or status == "503":
                error = _examples(answer)[0]["error"]
                assert error["code"] == int(status) and error["message"], (route.path, status)


def test_the_answer_examples_follow_the_answer_schema():
    StatusAnswer.model_validate(openapi_examples.STATUS)  # the router adds `worker`; the schema allows it
    assert set(openapi_examples.STATUS) == set(StatusAnswer.model_fields)
    for job in (openapi_examples.TRAIN_JOB, openapi_examples.CANCELLED_JOB, openapi_examples.CHECKPOINT_JOB,
                openapi_examples.RESTORE_JOB):
        JobAnswer.model_validate(job)
