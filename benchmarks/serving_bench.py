"""Serving throughput while the served model trains: output tokens/s idle vs during continuous training.

`--concurrency` requests of `--max-tokens` output tokens each (ignore_eos, greedy) are sent at once,
`--rounds` times, first with the training worker idle, then while it trains without pause (jobs
are submitted so that one is always queued). Whether training runs HOGWILD or with the step barrier
is the server's setting (`apollo-train serve --train-barrier`); the result names the mode.

    python benchmarks/serving_bench.py --url http://127.0.0.1:8000 [--json out.json]
    python benchmarks/serving_bench.py --model DIR [-- --enforce-eager ...]   # starts its own server
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Client,
    ContinuousTraining,
    add_server_args,
    chat_examples,
    emit,
    fmt,
    server_from_args,
    split_argv,
    throughput_round,
    wait_idle,
)


def measure(url: str, model: str, concurrency: int, max_tokens: int, rounds: int, offset: int) -> dict:
    runs = [throughput_round(url, model, concurrency, max_tokens, offset + k * concurrency) for k in range(rounds)]
    return {
        "rounds": runs,
        "tok_s": statistics.median(r["tok_s"] for r in runs),
        "mean_latency_s": statistics.median(r["mean_latency_s"] for r in runs),
    }


def main(argv=None) -> None:
    own, extra = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-examples", type=int, default=8, help="examples per training job")
    parser.add_argument("--skip-idle", action="store_true")
    args = parser.parse_args(own)

    with server_from_args(args, extra) as server:
        client = Client(server.url)
        model = client.model()
        wait_idle(client)
        throughput_round(server.url, model, args.concurrency, 16)  # warm-up
        idle = None if args.skip_idle else measure(server.url, model, args.concurrency, args.max_tokens, args.rounds, 0)
        mode = client.status().get("mode")
        with ContinuousTraining(client, chat_examples(args.train_examples, seed=1)) as training:
            busy = measure(server.url, model, args.concurrency, args.max_tokens, args.rounds, 10_000)
        ratio = busy["tok_s"] / idle["tok_s"] if idle else None
        result = {
            "mode": mode,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "idle": idle,
            "training": busy,
            "training_over_idle": ratio,
            "train_steps": training.steps,
            "train_steps_per_s": training.steps / training.seconds,
            "server_start_s": server.started_s,
        }
        rows = [
            f"| serving {args.concurrency}x{args.max_tokens} tok, {mode} | "
            f"idle {fmt(idle and idle['tok_s'], 0)} tok/s | "
            f"training {fmt(busy['tok_s'], 0)} tok/s | ratio {fmt(ratio, 2)} | "
            f"{training.steps} optimizer steps in {training.seconds:.1f} s |"
        ]
        emit(args, "serving", result, rows)


if __name__ == "__main__":
    main()
