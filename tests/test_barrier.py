"""Server options on real vLLM (CPU build): the step barrier, frozen embeddings."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
import zmq
from conftest import until
from transformers import AutoModelForCausalLM

from apollo_train.shared import protocol
from worker.param_groups import make_optimizer, optimizer_state_bytes
from worker.trainer import BARRIER_REASON


def state_bytes_after_one_step(model_dir, freeze: bool) -> int:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    if freeze:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    opt = make_optimizer(model, "apollo", 1e-3)
    model(torch.tensor([[1, 2, 3, 4]])).logits.float().mean().backward()
    opt.step()
    return optimizer_state_bytes(opt)


@pytest.fixture(scope="module")
def barrier_server(start_server, tiny_model):
    return start_server(
        tiny_model("qwen3"),
        "--train-barrier",
        "--train-freeze-embeddings",
        api_key=None,
        env={"APOLLO_TRAIN_LR": "1e-3"},
    )


def test_barrier_mode_trains_while_requests_keep_succeeding(barrier_server):
    srv = barrier_server
    c = srv.client
    paused_before = c.status()["worker"]["barrier"]
    assert c.status()["mode"] == "barrier"
    prompt, answer = "Q: colour of the sky on Zorbia?\nA:", " Violet, always violet."
    before = c.answer_logprob(prompt, answer)
    results, failures, done = [], [], threading.Event()

    def complete():
        while not done.is_set():
            try:
                out = c.request("POST", "/v1/completions", {"model": c.model(), "prompt": "hello", "max_tokens": 8})
            except Exception as exc:  # reported by the assert below
                failures.append(exc)
                return
            results.append(out["choices"][0]["finish_reason"])

    thread = threading.Thread(target=complete)
    thread.start()
    try:
        job = c.train(
            [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}],
            epochs=6,
            wait=True,
        )
    finally:
        done.set()
        thread.join()
    assert job["state"] == "done" and job["skipped_steps"] == 0
    assert job["whole_model_step"] == BARRIER_REASON  # paused for the step's writes, not the backward pass
    # Generation was paused around every step, and resumed as often.
    barrier = c.status()["worker"]["barrier"]
    assert barrier["pauses"] - paused_before["pauses"] == job["steps"] == 6
    assert barrier["resumes"] == barrier["pauses"]
    assert not failures and results and all(r in ("length", "stop") for r in results)
    assert c.answer_logprob(prompt, answer) > before
    # Frozen embeddings and head: the optimizer holds state for the other parameters only.
    frozen = state_bytes_after_one_step(srv.model, freeze=True)
    assert c.status()["optimizer"]["state_bytes"] == frozen < state_bytes_after_one_step(srv.model, freeze=False)


def test_a_worker_that_dies_while_generation_is_paused_does_not_leave_it_paused(barrier_server):
    """The supervisor owns the pause: it resumes generation as soon as the worker exits while paused. The
    pause is asked for on the hooks socket as the worker asks for it before a step; while paused, a request
    gets no token; the worker is killed; the request then completes."""
    srv, c = barrier_server, barrier_server.client
    status = c.status()
    resumed = status["worker"]["barrier"]["resumed_after_exit"]
    hooks = zmq.Context.instance().socket(zmq.DEALER)
    hooks.setsockopt(zmq.LINGER, 0)
    hooks.connect(protocol.hooks_address(srv.run_dir))
    hooks.send(protocol.pack(protocol.request(protocol.HOOK_WEIGHTS_CHANGING)))
    assert hooks.poll(60_000) and protocol.unpack(hooks.recv())["ok"]
    answers = []
    request = threading.Thread(target=lambda: answers.append(c.request(
        "POST", "/v1/completions", {"model": c.model(), "prompt": "hello", "max_tokens": 4})))
    request.start()
    request.join(3.0)
    assert request.is_alive() and not answers  # paused: no token came
    os.kill(status["worker"]["pid"], signal.SIGKILL)
    request.join(120)
    assert answers and answers[0]["usage"]["completion_tokens"] == 4
    assert c.status()["worker"]["barrier"]["resumed_after_exit"] == resumed + 1
    hooks.close()
    until(lambda: c.status()["state"] == "idle", 300, "the restarted worker")
