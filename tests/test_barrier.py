"""Server options on real vLLM (CPU build): the step barrier, frozen embeddings."""

from __future__ import annotations

import threading

import torch
from transformers import AutoModelForCausalLM

from worker.param_groups import make_optimizer, optimizer_state_bytes


def state_bytes_after_one_step(model_dir, freeze: bool) -> int:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    if freeze:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    opt = make_optimizer(model, "apollo", 1e-3)
    model(torch.tensor([[1, 2, 3, 4]])).logits.float().mean().backward()
    opt.step()
    return optimizer_state_bytes(opt)


def test_barrier_mode_trains_while_requests_keep_succeeding(start_server, tiny_model):
    srv = start_server(
        tiny_model("qwen3"),
        "--train-barrier",
        "--train-freeze-embeddings",
        api_key=None,
        env={"APOLLO_TRAIN_LR": "1e-3"},
    )
    c = srv.client
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
    assert not failures and results and all(r in ("length", "stop") for r in results)
    assert c.answer_logprob(prompt, answer) > before
    # Frozen embeddings and head: the optimizer holds state for the other parameters only.
    frozen = state_bytes_after_one_step(srv.model, freeze=True)
    assert c.status()["optimizer"]["state_bytes"] == frozen < state_bytes_after_one_step(srv.model, freeze=False)
