"""The router <-> worker wire: one module defines it; nothing malformed gets past it."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from apollo_train.shared import protocol


def test_round_trip():
    msg = protocol.request(protocol.OP_TRAIN, {"examples": [1, 2]})
    assert protocol.unpack(protocol.pack(msg)) == msg
    ok = protocol.reply(msg["id"], {"job_id": "x"})
    assert protocol.unpack(protocol.pack(ok))["body"] == {"job_id": "x"}
    err = protocol.error(msg["id"], 429, "full")
    assert protocol.unpack(protocol.pack(err))["error"] == {"status": 429, "message": "full"}


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1 not msgpack",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 99, "id": "a", "op": "status", "body": {}}),
        msgpack.packb({"v": protocol.VERSION, "id": 5, "op": "status", "body": {}}),
        msgpack.packb({"v": protocol.VERSION, "id": "a", "op": "status", "body": []}),
        msgpack.packb({"v": protocol.VERSION, "id": "a"}),
        msgpack.packb({"v": protocol.VERSION, "id": "a", "ok": False}),
    ],
)
def test_malformed_messages_are_refused(data):
    with pytest.raises(protocol.ProtocolError):
        protocol.unpack(data)


def test_the_live_worker_answers_garbage_with_errors_and_lives_on(server):
    """Straight onto the worker's control socket, past the HTTP layer."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(protocol.control_address(server.run_dir))
    try:
        for data, status in [
            (b"garbage", 400),
            (msgpack.packb({"v": 99, "id": "a", "op": "status", "body": {}}), 400),
            (protocol.pack(protocol.request("no-such-op")), 400),
            (protocol.pack(protocol.request(protocol.OP_TRAIN, {"examples": "nope"})), 400),
            (protocol.pack(protocol.request(protocol.OP_JOB, {"job_id": 7})), 400),
            (protocol.pack(protocol.request(protocol.OP_JOB, {"job_id": "nope"})), 404),
            (protocol.pack(protocol.request(protocol.OP_CHECKPOINT, {"path": "../x"})), 400),
            (protocol.pack(protocol.request(protocol.OP_CANCEL, {"job_id": "nope"})), 404),
        ]:
            sock.send(data)
            assert sock.poll(10_000), "no reply"
            answer = protocol.unpack(sock.recv())
            assert answer["ok"] is False and answer["error"]["status"] == status, answer
        sock.send(protocol.pack(protocol.request(protocol.OP_PING)))
        assert sock.poll(10_000)
        assert protocol.unpack(sock.recv())["ok"] is True
    finally:
        sock.close()
    assert server.client.status()["worker"]["restarts"] == 0


def test_the_weight_version_salts_generation_requests():
    import json

    from apollo_train.api.cache_salt import salted

    assert json.loads(salted(b'{"prompt": "hi"}', 3))["cache_salt"] == "apollo-train-w3"
    assert json.loads(salted(b'{"prompt": "hi", "cache_salt": "user-7"}', 3))["cache_salt"] == "user-7-apollo-train-w3"
    long_salt = json.loads(salted(json.dumps({"cache_salt": "x" * 128}).encode(), 3))["cache_salt"]
    assert len(long_salt) <= 128 and long_salt != json.loads(salted(json.dumps({"cache_salt": "x" * 128}).encode(),
                                                                    4))["cache_salt"]
    assert salted(b"not json", 3) == b"not json" and salted(b"[1]", 3) == b"[1]"


def test_a_pause_the_router_cannot_make_fails_the_step_with_the_reason(tmp_path):
    """The step barrier never silently becomes HOGWILD: the worker's before_step raises (and the trainer
    then writes nothing, see test_trainer.py) when vLLM could not pause."""
    import threading

    from worker.hooks import HookFailed, RouterHooks

    address = protocol.hooks_address(tmp_path)
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(address)
    hooks = RouterHooks(ctx, address, str(tmp_path), barrier=True)

    def refuse():
        identity, data = router.recv_multipart()
        msg = protocol.unpack(data)
        assert msg["op"] == protocol.HOOK_WEIGHTS_CHANGING
        router.send_multipart([identity, protocol.pack(protocol.error(msg["id"], 500, "engine is shutting down"))])

    thread = threading.Thread(target=refuse)
    thread.start()
    try:
        with pytest.raises(HookFailed, match="vLLM could not pause generation: engine is shutting down"):
            hooks.before_step()
    finally:
        thread.join()
        router.close()
