"""Optimizer step time and state size on bf16 matrices shaped like Qwen3-8B's linear layers.

Compares our APOLLO-Mini and rank-64 APOLLO with apollo-torch 1.0.3 (same settings, if installed), with
torch.optim.AdamW (foreach and fused) and with a bandwidth floor, torch._foreach_add_(params, grads):
one read of each weight and gradient and one write of each weight, which every optimizer must do.

    python benchmarks/optim_bench.py [--device cpu|cuda] [--layers N] [--steps N] [--out FILE.md]
"""

import argparse
import gc
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from worker.optim import APOLLO_MINI, DEFAULT_RANK, Apollo
from worker.param_groups import optimizer_state_bytes

# Qwen3-8B: hidden 4096, intermediate 12288, 32 query and 8 key/value heads of 128, 36 layers.
LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (12288, 4096), (12288, 4096), (4096, 12288)]
MINI = dict(APOLLO_MINI)
RANK64 = {"rank": DEFAULT_RANK, "scale_type": "channel", "scale": 1.0}


class Floor:
    """The bandwidth floor as an optimizer-like object."""

    def __init__(self, params):
        self.params = params
        self.state = {}

    @torch.no_grad()
    def step(self):
        torch._foreach_add_(self.params, [p.grad for p in self.params])


def reference(params, settings):
    """apollo-torch's optimizer with its own projections, or None when it is not installed."""
    try:
        from apollo_reference import apollo
    except ModuleNotFoundError:
        return None
    group = {"params": params, "proj": "random", "proj_type": "std", "update_proj_gap": 200, **settings}
    return apollo.AdamW([group], lr=1e-3)


def candidates(params):
    return [
        ("floor: _foreach_add_(params, grads)", lambda: Floor(params)),
        ("ours APOLLO-Mini (rank 1, tensor)", lambda: Apollo(params, lr=1e-3, **MINI)),
        ("ours APOLLO rank 64 (channel)", lambda: Apollo(params, lr=1e-3, **RANK64)),
        ("apollo-torch Mini (rank 1, tensor)", lambda: reference(params, MINI)),
        ("apollo-torch rank 64 (channel)", lambda: reference(params, RANK64)),
        ("torch AdamW foreach", lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True)),
        ("torch AdamW fused", lambda: torch.optim.AdamW(params, lr=1e-3, fused=True)),
    ]


SAME_SETTINGS = [("Mini", "ours APOLLO-Mini (rank 1, tensor)", "apollo-torch Mini (rank 1, tensor)"),
                 ("rank 64", "ours APOLLO rank 64 (channel)", "apollo-torch rank 64 (channel)")]


def timed(opt, steps, sync):
    """(ms of the first step: state allocation and projection draws, ms per later step)."""
    sync()
    start = time.perf_counter()
    opt.step()
    sync()
    first = time.perf_counter() - start
    opt.step()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return first * 1e3, (time.perf_counter() - start) / steps * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, help="decoder layers (default: 36 on cuda, 1 on cpu)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 20 on cuda, 2 on cpu)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    layers = args.layers or (36 if cuda else 1)
    steps = args.steps or (20 if cuda else 2)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    gen = torch.Generator(args.device).manual_seed(0)
    params = []
    for shape in LAYER * layers:
        weight, grad = (torch.randn(shape, generator=gen, device=args.device, dtype=torch.bfloat16)
                        for _ in "wg")
        p = torch.nn.Parameter(weight.mul_(0.02))
        p.grad = grad.mul_(1e-3)
        params.append(p)
    numel = sum(p.numel() for p in params)
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    lines = [(f"{name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {layers} layer(s) "
             f"of Qwen3-8B linear shapes, {len(params)} bf16 matrices, {numel / 1e6:.0f} M parameters; "
             f"mean of {steps} steps after one warm-up step."), "",
             "| optimizer | ms/step | x floor | first step ms | state bytes |", "|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    floor_ms, times = None, {}
    for label, make in candidates(params):
        opt = make()
        if opt is None:
            row = f"| {label} | not installed | | | |"
        else:
            first, ms = timed(opt, steps, sync)
            floor_ms, times[label] = floor_ms or ms, ms
            state = optimizer_state_bytes(opt)
            row = f"| {label} | {ms:.1f} | {ms / floor_ms:.2f} | {first:.0f} | {state:,} |"
        print(row, flush=True)
        lines.append(row)
        del opt
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    speedups = [f"{kind} {times[theirs] / times[ours]:.1f}x" for kind, ours, theirs in SAME_SETTINGS
                 if ours in times and theirs in times]
    if speedups:
        lines += ["", "Ours vs apollo-torch with the same settings (its ms / ours): " + ", ".join(speedups) + "."]
        print(lines[-1])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
