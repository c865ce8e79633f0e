"""The step-barrier mode on real vLLM (CPU build): generation pauses around each step."""

from __future__ import annotations

import threading


def test_barrier_mode_trains_while_requests_keep_succeeding(start_server, tiny_model):
    srv = start_server(tiny_model("qwen3"), "--train-barrier", api_key=None, env={"APOLLO_TRAIN_LR": "1e-3"})
    c = srv.client
    assert c.status()["mode"] == "barrier"
    prompt, answer = "Q: colour of the sky on Zorbia?\nA:", " Violet, always violet."
    before = c.answer_logprob(prompt, answer)
    results, done = [], threading.Event()

    def complete():
        while not done.is_set():
            out = c.request("POST", "/v1/completions", {"model": c.model(), "prompt": "hello", "max_tokens": 8})
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
    assert results and all(r in ("length", "stop") for r in results)
    assert c.answer_logprob(prompt, answer) > before
