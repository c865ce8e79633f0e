"""Training tokens/s of the in-place worker against plain transformers training of an unshared copy.

The same examples, optimizer (the server's), learning rate and batching (`--max-tokens-per-step`,
the server's default 4096) are trained twice, alternately, `--repeats` times each:
- by the server's training worker (POST /train, wait=true; time from the job's start to its end);
- in this process, on a copy of the model loaded from its directory with transformers, with the same
  training loop (worker/trainer.py) and no step hooks.
No requests are served meanwhile. Tokens are all tokens of the examples (prompt and answer).

    python benchmarks/train_throughput_bench.py --url URL [--examples 64 --epochs 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Client, add_server_args, chat_examples, emit, fmt, server_from_args, split_argv, wait_idle  # noqa: E402


def encode_all(model_path: str, examples: list[dict], max_len: int | None):
    from transformers import AutoTokenizer

    from apollo_train.shared.schema import Example
    from worker.chat_tokens import encode_example, eos_token_ids

    tok = AutoTokenizer.from_pretrained(model_path)
    eos_ids = eos_token_ids(model_path, tok)
    return [encode_example(tok, Example.model_validate(ex), max_len, eos_token_ids=eos_ids) for ex in examples]


def main(argv=None) -> None:
    own, extra = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens-per-step", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-5, help="small: the served model should stay usable")
    args = parser.parse_args(own)

    import torch
    from transformers import AutoModelForCausalLM

    from worker.param_groups import make_optimizer
    from worker.trainer import Trainer

    with server_from_args(args, extra) as server:
        client = Client(server.url)
        wait_idle(client)
        st = client.status()
        model_path, opt_name = st["model"], st["optimizer"]["name"]
        examples = chat_examples(args.examples, seed=7)
        encoded = encode_all(model_path, examples, None)
        total_tokens = sum(len(e.input_ids) for e in encoded) * args.epochs
        target_tokens = sum(e.num_target_tokens for e in encoded) * args.epochs

        def worker_run(epochs: int) -> dict:
            job = client.train(examples, epochs=epochs, lr=args.lr, force=True, wait=True)
            if job["state"] != "done":
                raise RuntimeError(f"training job failed: {job.get('error')}")
            return {"s": job["finished"] - job["started"], "steps": job["steps"], "target_tokens": job["tokens"]}

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        config_dtype = getattr(
            torch,
            str(
                getattr(__import__("transformers").AutoConfig.from_pretrained(model_path), "dtype", None) or "bfloat16"
            ).removeprefix("torch."),
        )
        plain_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=config_dtype).to(device)
        plain_opt = make_optimizer(plain_model, opt_name, args.lr)
        trainer = Trainer(plain_model, plain_opt, max_tokens_per_step=args.max_tokens_per_step)

        def plain_run(epochs: int) -> dict:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = trainer.train(encoded, epochs=epochs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return {"s": time.perf_counter() - t0, "steps": res.steps, "target_tokens": res.tokens}

        worker_run(1)  # warm-up (first-step allocations, kernels)
        plain_run(1)
        worker, plain = [], []
        for _ in range(args.repeats):
            worker.append(worker_run(args.epochs))
            plain.append(plain_run(args.epochs))
        w_s = statistics.median(r["s"] for r in worker)
        p_s = statistics.median(r["s"] for r in plain)
        result = {
            "optimizer": opt_name,
            "examples": args.examples,
            "epochs": args.epochs,
            "tokens_per_job": total_tokens,
            "target_tokens_per_job": target_tokens,
            "steps_per_job": worker[0]["steps"],
            "worker": worker,
            "plain": plain,
            "worker_tok_s": total_tokens / w_s,
            "plain_tok_s": total_tokens / p_s,
            "plain_over_worker": w_s / p_s,
        }
        rows = [
            f"| training tokens/s ({opt_name}, {worker[0]['steps']} steps of <= {args.max_tokens_per_step} tokens) | "
            f"worker {fmt(result['worker_tok_s'], 0)} | plain transformers copy {fmt(result['plain_tok_s'], 0)} | "
            f"plain/worker {fmt(result['plain_over_worker'], 2)} |"
        ]
        emit(args, "train_throughput", result, rows)


if __name__ == "__main__":
    main()
