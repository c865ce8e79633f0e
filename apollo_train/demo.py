"""`apollo-train demo`: watch a served model learn an answer in place, in about a minute.

Starts `apollo-train serve` (the built-in tiny demo model unless --model is given), asks a
question, posts the answer to /train, asks again, and prints both answers with the served
log-probability of the taught answer. The demo model has random weights: before training it
babbles; after, it answers with what it was taught, served by the same vLLM process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from apollo_train.launcher import ServerProcess

QUESTION = [{"role": "user", "content": "Who painted the ceiling of the Gleb library?"}]
ANSWER = "The ceiling of the Gleb library was painted by Ada Plonk in 1901."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apollo-train demo", description=__doc__)
    parser.add_argument("--model", help="model directory (default: the built-in demo model)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    import torch

    serve_args = ["--max-model-len", "1024"]
    if not torch.cuda.is_available():
        serve_args += ["--enforce-eager", "--dtype", "bfloat16"]  # starts in half the time on CPU
    log = Path(tempfile.gettempdir()) / f"apollo-train-demo-{args.port}.log"
    print(f"starting the server on port {args.port} (log: {log}) ...", flush=True)
    env = {k: os.environ.get(k, "1") for k in ("HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE")}
    with ServerProcess(args.model, serve_args, port=args.port, log=log, env=env) as server:
        return teach(server, args)


def teach(server: ServerProcess, args) -> int:
    client = server.client
    status = client.status()
    if status["state"] == "error":
        print(f"training is unavailable: {status['error']}", file=sys.stderr)
        return 1
    print(f"ready in {server.started_s:.0f} s: {status['model']} ({status['optimizer']['name']})\n")
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(status["model"]).apply_chat_template(
        QUESTION, tokenize=False, add_generation_prompt=True
    )
    print(f"Q: {QUESTION[0]['content']}")
    before = client.chat(QUESTION, max_tokens=24)
    lp_before = client.answer_logprob(prompt, ANSWER)
    print(f"A (before): {before!r}\n")
    print(f"POST /train: {ANSWER!r}, {args.epochs} epochs ...", flush=True)
    example = {"messages": QUESTION + [{"role": "assistant", "content": ANSWER}]}
    job = client.train([example], epochs=args.epochs, lr=args.lr, force=True, wait=True)
    losses = ", ".join(f"{x:.2f}" for x in job["losses"])
    print(f"job {job['job_id']} {job['state']} in {job['finished'] - job['started']:.1f} s; losses: {losses}\n")
    after = client.chat(QUESTION, max_tokens=24)
    lp_after = client.answer_logprob(prompt, ANSWER)
    print(f"A (after):  {after!r}")
    print(f"\nlog-probability of the taught answer: {lp_before:.1f} -> {lp_after:.1f}")
    print("(the same vLLM process served both answers; no restart, no weight copy)")
    return 0 if lp_after > lp_before else 1


if __name__ == "__main__":
    sys.exit(main())
