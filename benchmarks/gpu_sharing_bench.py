"""How two processes share one GPU: a decode-like server and a training-like process, measured.

Serving is memory-bound (a decode step reads every weight for a few tokens), training compute-bound
(large matrix products). How much of each survives when both run on one GPU depends on how the GPU is
shared, which this benchmark measures without vLLM, so every way can be tried in a few seconds:

  - time-slicing (two plain CUDA processes),
  - a duty cycle in the trainer (it sleeps between units of work),
  - CUDA MPS with a private control daemon (both processes are its clients), with the trainer at
    normal or below-normal client priority (CUDA_MPS_CLIENT_PRIORITY) and at a share of the SMs
    (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE),
  - and, under MPS, that a CUDA IPC handle opened by the trainer writes the server's memory.

The "server" replays a CUDA graph of one decode step of a Qwen3-8B-shaped stack (36 layers, batch 32,
bf16 weights, 14 GB) and synchronizes after each step as vLLM does; the "trainer" multiplies 8192 x 8192
bf16 matrices. Each setting runs both for `--seconds` and reports the server's steps/s and p99 step time
and the trainer's TFLOP/s, each also as a ratio of running alone.

    python benchmarks/gpu_sharing_bench.py --json sharing.json      # needs an NVIDIA GPU
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (label, under MPS, trainer environment, trainer duty cycle, who runs)
SETTINGS = [
    ("serve alone", False, {}, 1.0, "serve"),
    ("train alone", False, {}, 1.0, "train"),
    ("time-sliced", False, {}, 1.0, "both"),
    ("time-sliced, trainer duty 0.3", False, {}, 0.3, "both"),
    ("MPS: serve alone", True, {}, 1.0, "serve"),
    ("MPS: train alone, priority below normal", True, {"CUDA_MPS_CLIENT_PRIORITY": "1"}, 1.0, "train"),
    ("MPS", True, {}, 1.0, "both"),
    ("MPS, trainer priority below normal", True, {"CUDA_MPS_CLIENT_PRIORITY": "1"}, 1.0, "both"),
    ("MPS, trainer 50 % SMs", True, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}, 1.0, "both"),
    ("MPS, trainer 25 % SMs", True, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}, 1.0, "both"),
    ("MPS, trainer below normal, 50 % SMs", True,
     {"CUDA_MPS_CLIENT_PRIORITY": "1", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}, 1.0, "both"),
    ("MPS, trainer below normal, duty 0.5", True, {"CUDA_MPS_CLIENT_PRIORITY": "1"}, 0.5, "both"),
]
HIDDEN, LAYERS, BATCH, INTER, QKV = 4096, 36, 32, 12288, 6144
TRAIN_N = 8192


def serve(args) -> dict:
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda")
    w = [(torch.randn(QKV, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.01,
          torch.randn(HIDDEN, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.01,
          torch.randn(2 * INTER, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.01,
          torch.randn(HIDDEN, INTER, device=dev, dtype=torch.bfloat16) * 0.01) for _ in range(LAYERS)]
    x0 = torch.randn(BATCH, HIDDEN, device=dev, dtype=torch.bfloat16)
    shared = torch.zeros(1024, device=dev)
    if args.handle:
        from torch.multiprocessing.reductions import reduce_tensor

        Path(args.handle).write_bytes(pickle.dumps(reduce_tensor(shared)))

    def step():
        x = x0
        for qkv, o, gu, down in w:
            t = F.linear(x, qkv)[:, :HIDDEN]
            x = x + F.linear(t, o)
            g = F.linear(x, gu)
            x = x + F.linear(g[:, :INTER] * g[:, INTER:], down)
        return x

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    start_at = _ready()
    end = start_at + args.seconds
    while time.time() < end:
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        if start_at + 0.5 < time.time() < end - 0.5:  # the trainer runs across the whole window
            times.append(time.perf_counter() - t0)
    ipc = None
    if args.handle:
        time.sleep(1.0)
        ipc = float(shared.sum())  # the trainer wrote 1024 ones through its handle
    times.sort()
    return {"steps_s": len(times) / sum(times), "p50_ms": 1e3 * times[len(times) // 2],
            "p99_ms": 1e3 * times[int(0.99 * (len(times) - 1))], "steps": len(times), "ipc_sum": ipc}


def train(args) -> dict:
    import torch

    dev = torch.device("cuda")
    a = torch.randn(TRAIN_N, TRAIN_N, device=dev, dtype=torch.bfloat16)
    b = torch.randn(TRAIN_N, TRAIN_N, device=dev, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    ipc = None
    if args.handle:
        for _ in range(200):
            if Path(args.handle).exists():
                break
            time.sleep(0.1)
        func, fargs = pickle.loads(Path(args.handle).read_bytes())
        view = func(*fargs)
        view.fill_(1.0)
        torch.cuda.synchronize()
        ipc = "wrote"
    start_at = _ready()
    end, flops, busy = start_at + args.seconds, 0.0, 0.0
    t_start = time.perf_counter()
    while time.time() < end:
        t0 = time.perf_counter()
        for _ in range(4):  # one unit of work (~4 x 1.1 TFLOP)
            torch.mm(a, b, out=c)
        torch.cuda.synchronize()
        unit = time.perf_counter() - t0
        busy += unit
        flops += 4 * 2 * TRAIN_N**3
        if args.duty < 1.0:
            time.sleep(unit * (1 - args.duty) / args.duty)
    wall = time.perf_counter() - t_start
    return {"tflops": flops / wall / 1e12, "busy_share": busy / wall, "ipc": ipc}


def _ready() -> float:
    """Say so, and wait for the start time both processes are given."""
    print("READY", flush=True)
    t = float(sys.stdin.readline())
    while time.time() < t:
        time.sleep(min(0.01, max(0.0, t - time.time())))
    return t


class MPS:
    """A private MPS control daemon: only processes given its pipe directory become its clients."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="apollo-mps-"))
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.dir / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(self.dir / "log")}

    def __enter__(self) -> "MPS":
        for d in self.env.values():
            Path(d).mkdir(parents=True)
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **self.env}, check=True)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env={**os.environ, **self.env})
        time.sleep(1.0)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_setting(label, mps_env, train_env, duty, who, seconds) -> dict:
    handle = tempfile.mktemp(prefix="apollo-ipc-") if who == "both" else None
    common = [sys.executable, __file__, "--seconds", str(seconds)] + (
        ["--handle", handle] if handle else [])
    procs = {}
    base = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}
    if who in ("serve", "both"):
        procs["serve"] = subprocess.Popen(common + ["--role", "serve"], env={**base, **mps_env},
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if who in ("train", "both"):
        procs["train"] = subprocess.Popen(common + ["--role", "train", "--duty", str(duty)],
                                          env={**base, **mps_env, **train_env}, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True)
    for p in procs.values():  # each has its weights (and the server its graph) once it says READY
        if p.stdout.readline().strip() != "READY":
            break
    start_at = f"{time.time() + 0.5}\n"
    for p in procs.values():
        try:
            p.stdin.write(start_at)
            p.stdin.flush()
        except BrokenPipeError:
            pass
    out = {"setting": label}
    for name, p in procs.items():
        text, _ = p.communicate(timeout=120)
        lines = text.strip().splitlines()
        out[name] = json.loads(lines[-1]) if p.returncode == 0 and lines else {"error": f"exit {p.returncode}"}
    if handle:
        Path(handle).unlink(missing_ok=True)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("serve", "train"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--duty", type=float, default=1.0)
    parser.add_argument("--handle")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.role:
        print(json.dumps(serve(args) if args.role == "serve" else train(args)), flush=True)
        return
    results = []
    for label, under_mps, train_env, duty, who in SETTINGS:
        if under_mps:
            with MPS() as mps:
                results.append(run_setting(label, mps.env, train_env, duty, who, args.seconds))
        else:
            results.append(run_setting(label, {}, train_env, duty, who, args.seconds))
    alone_serve = next(r["serve"] for r in results if r["setting"] == "serve alone")
    alone_train = next(r["train"] for r in results if r["setting"] == "train alone")
    print("| setting | serving steps/s (ratio) | p99 step ms | trainer TFLOP/s (ratio) | IPC |")
    print("|---|---|---|---|---|")
    for r in results:
        s, t = r.get("serve", {}), r.get("train", {})
        serving = (f"{s['steps_s']:.1f} ({s['steps_s'] / alone_serve['steps_s']:.2f})" if "steps_s" in s
                   else s.get("error", ""))
        training = (f"{t['tflops']:.0f} ({t['tflops'] / alone_train['tflops']:.2f})" if "tflops" in t
                    else t.get("error", ""))
        ipc = "" if s.get("ipc_sum") is None else ("ok" if s["ipc_sum"] == 1024 else f"FAILED ({s['ipc_sum']})")
        print(f"| {r['setting']} | {serving} | {s.get('p99_ms', 0):.1f} | {training} | {ipc} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
