"""The loss of every step of a real run, as a chart: a served model taught through /train, job by job.

A server (`--url`, or `apollo-train serve MODEL` started with `--model`) is taught `--jobs` jobs of `--facts`
short question-and-answer chats each, `--epochs` passes per job, one job after another as an
assistant's day would post them, with the server's defaults (APOLLO, replay on). Each job's losses
come from its status (`GET /train/status?job_id=`); the chart shows them step after step, a job's
first step (new facts, replayed ones beside them) high and the rest falling.

    python benchmarks/loss_chart.py --model MODEL --out docs/loss-per-step.png --json docs/loss-per-step.json \
        -- --enforce-eager --max-model-len 1024
    python benchmarks/loss_chart.py plot --json docs/loss-per-step.json --out docs/loss-per-step.png

Needs matplotlib for the chart (not a dependency of apollo-train: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORDS, Client, add_server_args, server_from_args, split_argv  # noqa: E402


def facts(n: int, seed: int) -> list[dict]:
    """`n` made-up facts as chats: who keeps which made-up place."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        place, keeper = (" ".join(rng.choice(WORDS) for _ in range(2)).title() for _ in range(2))
        out.append({"messages": [{"role": "user", "content": f"Who keeps the lighthouse at {place}?"},
                                 {"role": "assistant", "content": f"{keeper} keeps it."}]})
    return out


def run(args, extra: list[str]) -> dict:
    with server_from_args(args, extra) as server:
        c = Client(server.url)
        status = c.status()
        jobs = []
        for j in range(args.jobs):
            job = c.train(facts(args.facts, seed=j), epochs=args.epochs, wait=True)
            if job["state"] != "done":
                raise SystemExit(f"job {j} ended {job['state']}: {job.get('error')}")
            jobs.append({"job_id": job["job_id"], "losses": job["losses"], "replayed": job.get("replayed", 0)})
            print(f"job {j}: {len(job['losses'])} steps, loss {job['losses'][0]:.3f} -> {job['losses'][-1]:.3f}",
                  flush=True)
    return {"model": status["model"], "optimizer": status["optimizer"], "mode": status["mode"],
            "jobs": args.jobs, "facts": args.facts, "epochs": args.epochs, "runs": jobs}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    step = 0
    for i, job in enumerate(result["runs"]):
        xs = list(range(step + 1, step + len(job["losses"]) + 1))
        ax.plot(xs, job["losses"], marker="o", markersize=3, color="tab:blue" if i % 2 else "tab:orange")
        if step:
            ax.axvline(step + 0.5, color="0.85", linewidth=0.8, zorder=0)
        step = xs[-1]
    opt = result["optimizer"]
    ax.set(xlabel="optimizer step (a new job at each grey line)", ylabel="loss (mean over answer tokens)",
           title=f"{result['jobs']} jobs of {result['facts']} facts, {result['epochs']} epochs each; "
                 f"{opt['name']}, lr {opt['lr']:g}, {result['mode']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main(argv=None) -> None:
    own, extra = split_argv(argv)
    if own[:1] == ["plot"]:
        parser = argparse.ArgumentParser(description="the chart of a saved run")
        parser.add_argument("--json", type=Path, required=True)
        parser.add_argument("--out", type=Path, required=True)
        args = parser.parse_args(own[1:])
        plot(json.loads(args.json.read_text()), args.out)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, help="the chart (PNG)")
    args = parser.parse_args(own)
    result = run(args, extra)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.out:
        plot(result, args.out)


if __name__ == "__main__":
    main()
