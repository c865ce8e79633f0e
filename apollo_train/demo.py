"""`apollo-train demo`: watch a served model learn an answer in place, in about a minute.

Starts `apollo-train serve` (the built-in tiny demo model unless --model is given), asks a
question, posts the answer to /train, asks again, and prints both answers with the served
log-probability of the taught answer. The demo model has random weights: before training it
babbles; after, it answers with what it was taught, served by the same vLLM process.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from apollo_train.client import Client

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

    serve = [sys.executable, "-m", "apollo_train.cli", "serve", *([args.model] if args.model else [])]
    serve += ["--port", str(args.port), "--max-model-len", "1024"]
    if not torch.cuda.is_available():
        serve += ["--enforce-eager", "--dtype", "bfloat16"]  # starts in half the time on CPU
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    log = tempfile.NamedTemporaryFile(prefix="apollo-train-demo-", suffix=".log", delete=False)
    print(f"starting the server on port {args.port} (log: {log.name}) ...", flush=True)
    proc = subprocess.Popen(serve, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = Client(f"http://127.0.0.1:{args.port}")
    try:
        t0 = time.time()
        client.wait_until_ready(900, process=proc)
        status = client.status()
        if status["state"] == "error":
            print(f"training is unavailable: {status['error']}", file=sys.stderr)
            return 1
        print(f"ready in {time.time() - t0:.0f} s: {status['model']} ({status['optimizer']['name']})\n")
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
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    sys.exit(main())
