"""Who may call the training routes and how much they may send: the middleware on its own."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from apollo_train.api.access import AccessPolicy, TrainingAccess, check_caller, is_training_path

KEY = b"s3cret"
JSON = {"content-type": "application/json"}


def app_with(policy: AccessPolicy | None) -> tuple[FastAPI, list[int]]:
    app = FastAPI()
    seen = []

    @app.post("/train")
    async def train(request: Request):
        body = await request.body()
        seen.append(len(body))
        return {"bytes": len(body)}

    @app.get("/v1/models")
    async def models():
        return {"data": []}

    app.add_middleware(TrainingAccess)
    if policy is not None:
        app.state.apollo_train_access = policy
    return app, seen


def scope(client_host="127.0.0.1", auth: bytes | None = None) -> dict:
    headers = [(b"authorization", auth)] if auth is not None else []
    return {"client": (client_host, 1234), "headers": headers}


@pytest.mark.parametrize("path, ours", [("/train", True), ("/train/status", True), ("/train/cancel", True),
                                        ("/checkpoint", True), ("/checkpoints", True), ("/checkpoint/restore", True),
                                        ("/trainx", False), ("/v1/completions", False), ("/", False)])
def test_training_paths(path, ours):
    assert is_training_path(path) is ours


def test_without_a_key_only_loopback_clients_pass():
    policy = AccessPolicy(keys=(), allow_remote=False, max_request_bytes=100)
    assert check_caller(policy, scope("127.0.0.1")) is None
    assert check_caller(policy, scope("::1")) is None
    status, message = check_caller(policy, scope("10.1.2.3"))
    assert status == 403 and "--api-key" in message and "--train-allow-remote" in message
    assert check_caller(policy, {"client": None, "headers": []})[0] == 403
    remote_ok = AccessPolicy(keys=(), allow_remote=True, max_request_bytes=100)
    assert check_caller(remote_ok, scope("10.1.2.3")) is None


@pytest.mark.parametrize("auth", [None, b"", b"Bearer", b"Bearer ", b"Basic czNjcmV0", b"Bearer wrong",
                                  b"Bearer s3cret2", "Bearer s\u00e9cret".encode("latin-1"), b"Bearer \xff\xfe"])
def test_a_key_is_required_and_anything_else_is_a_401(auth):
    policy = AccessPolicy(keys=(KEY,), allow_remote=False, max_request_bytes=100)
    assert check_caller(policy, scope("127.0.0.1", auth))[0] == 401


def test_the_right_key_passes_from_anywhere():
    policy = AccessPolicy(keys=(b"other", KEY), allow_remote=False, max_request_bytes=100)
    assert check_caller(policy, scope("10.1.2.3", b"Bearer s3cret")) is None
    assert check_caller(policy, scope("10.1.2.3", b"bearer s3cret")) is None


def test_the_key_is_checked_before_the_body_is_read():
    app, seen = app_with(AccessPolicy(keys=(KEY,), allow_remote=False, max_request_bytes=10))
    with TestClient(app) as client:
        r = client.post("/train", content=b"x" * 1000, headers={"authorization": "Bearer nope"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        ok = client.post("/train", content=b"x" * 5, headers={"authorization": "Bearer s3cret", **JSON})
        assert ok.json() == {"bytes": 5}
    assert seen == [5]


def test_bodies_over_the_limit_are_a_413_and_other_paths_are_untouched():
    # (the test client's address is the name "testclient", which is not provably local)
    app, seen = app_with(AccessPolicy(keys=(), allow_remote=True, max_request_bytes=10))
    with TestClient(app) as client:
        r = client.post("/train", content=b"x" * 11)
        assert r.status_code == 413 and "--train-max-request-bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(5):
                yield b"xxxx"

        assert client.post("/train", content=chunks()).status_code == 413
        assert client.post("/train", content=b"x" * 10, headers=JSON).json() == {"bytes": 10}
        assert client.get("/v1/models").status_code == 200
    assert seen == [10]


def test_a_body_not_labelled_json_is_a_415_naming_the_header():
    app, seen = app_with(AccessPolicy(keys=(), allow_remote=True, max_request_bytes=100))
    with TestClient(app) as client:
        form = client.post("/train", content=b'{"examples": []}',
                           headers={"content-type": "application/x-www-form-urlencoded"})  # curl -d
        assert form.status_code == 415 and "Content-Type: application/json" in form.json()["error"]["message"]
        labelled = client.post("/train", content=b"{}", headers={"content-type": "Application/JSON; charset=utf-8"})
        assert labelled.json() == {"bytes": 2}
        assert client.post("/train").json() == {"bytes": 0}  # no body: nothing to label
    assert seen == [2, 0]


def test_before_the_plugin_is_initialised_training_answers_503():
    app, _ = app_with(None)
    with TestClient(app) as client:
        assert client.post("/train", content=b"{}").status_code == 503
        assert client.get("/train/status").status_code == 503
        assert client.get("/v1/models").status_code == 200
