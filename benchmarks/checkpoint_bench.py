"""Completion latency while /checkpoint writes the served weights, against the same load with no checkpoint.

`--concurrency` closed-loop clients send greedy completions of `--max-tokens` tokens. First the
latencies of an idle phase are taken, then checkpoints are written one after another (POST
/checkpoint, polled until done) and the latencies of the requests that overlapped a write are taken,
until `--min-samples` of them or `--max-checkpoints`. Also reported: how long each checkpoint took
and how fast it wrote.

    python benchmarks/checkpoint_bench.py --url URL [--target served|DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Client,
    ClosedLoop,
    add_server_args,
    emit,
    fmt,
    percentile,
    server_from_args,
    split_argv,
    wait_idle,
)


def stats(lat: list[float]) -> dict:
    return {
        "n": len(lat),
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "mean_s": statistics.mean(lat) if lat else None,
        "max_s": max(lat) if lat else None,
    }


def main(argv=None) -> None:
    own, extra = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--idle-s", type=float, default=8.0)
    parser.add_argument("--min-samples", type=int, default=300)
    parser.add_argument("--max-checkpoints", type=int, default=6)
    parser.add_argument(
        "--target",
        default="new",
        help="'served' (the served model's own directory, the default of /checkpoint), "
        "'new' (fresh directories under the server's checkpoint root) or a name prefix under it",
    )
    args = parser.parse_args(own)

    with server_from_args(args, extra) as server:
        client = Client(server.url)
        model = client.model()
        wait_idle(client)
        with ClosedLoop(server.url, model, args.concurrency, args.max_tokens) as load:
            time.sleep(2.0)  # warm-up
            t_idle0 = time.perf_counter()
            time.sleep(args.idle_s)
            t_idle1 = time.perf_counter()
            windows, jobs = [], []
            for k in range(args.max_checkpoints):
                if args.target == "served":
                    path = None
                else:
                    # under the server's checkpoint root (which keeps the newest --train-keep-checkpoints)
                    prefix = f"ckpt-bench-{int(time.time())}" if args.target == "new" else args.target
                    path = f"{prefix}-{k}"
                t0 = time.perf_counter()
                job_id = client.checkpoint(path)["job_id"]
                while True:
                    job = client.status(job_id)
                    if job["state"] in ("done", "failed"):
                        break
                    time.sleep(0.02)
                t1 = time.perf_counter()
                if job["state"] != "done":
                    raise RuntimeError(f"checkpoint failed: {job.get('error')}")
                windows.append((t0, t1))
                jobs.append(
                    {
                        "wall_s": t1 - t0,
                        "bytes": job.get("bytes"),
                        "path": job.get("path"),
                        "queued_s": (job["started"] or job["created"]) - job["created"],
                        "write_s": job["finished"] - (job["started"] or job["created"]),
                    }
                )
                time.sleep(0.3)
                during = [r for r in load.snapshot() if any(r["start"] < b and r["end"] > a for a, b in windows)]
                if len(during) >= args.min_samples:
                    break
        results = load.snapshot()  # leaving the loop waited for the requests in flight
        idle = [r["latency"] for r in results if r["start"] >= t_idle0 and r["end"] <= t_idle1]
        during = [r["latency"] for r in results if any(r["start"] < b and r["end"] > a for a, b in windows)]
        s_idle, s_during = stats(idle), stats(during)
        ratio = s_during["p99_s"] / s_idle["p99_s"] if idle and during else None
        bytes_ = [j["bytes"] for j in jobs if j["bytes"]]
        write_s = [j["write_s"] for j in jobs]
        result = {
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "idle": s_idle,
            "during_checkpoint": s_during,
            "p99_during_over_idle": ratio,
            "checkpoints": jobs,
            "checkpoint_write_s_median": statistics.median(write_s),
            "checkpoint_bytes": bytes_[0] if bytes_ else None,
            "checkpoint_gb_per_s": (bytes_[0] / statistics.median(write_s) / 1e9) if bytes_ else None,
            "load_errors": load.errors,
        }
        rows = [
            f"| p99 latency {args.concurrency} clients x {args.max_tokens} tok | "
            f"idle {fmt(s_idle['p99_s'] * 1e3, 0)} ms "
            f"(n={s_idle['n']}) | during /checkpoint {fmt(s_during['p99_s'] * 1e3, 0)} ms (n={s_during['n']}) | "
            f"ratio {fmt(ratio, 2)} | {len(jobs)} checkpoints of {fmt((bytes_[0] if bytes_ else 0) / 1e9, 2)} GB, "
            f"{fmt(statistics.median(write_s), 2)} s each |"
        ]
        emit(args, "checkpoint", result, rows)


if __name__ == "__main__":
    main()
