"""Memory: vLLM alone vs vLLM + training worker, and what the worker holds per optimizer.

Server part (run it first on a fresh server): the GPU memory of the vLLM engine process and of the
training worker (nvidia-smi, per process; on CPU the resident set, which counts the shared weights
in both), once right after start (worker attached, nothing trained) and once after one training job.
The worker shares vLLM's weights, so what it adds is gradients, activations, optimizer state and
its CUDA context.

Breakdown part (`--breakdown`): in this process, on an unshared copy of the model, one training job
per optimizer (APOLLO-Mini, APOLLO rank 64, AdamW): the peak CUDA memory above the weights
(gradients + activations + optimizer state + temporaries), the gradients and the optimizer state.

    python benchmarks/memory_bench.py --url URL --run-dir RUN_DIR [--breakdown] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Client,
    add_server_args,
    chat_examples,
    emit,
    fmt,
    gpu_memory_by_pid,
    gpus_memory_used,
    process_name,
    rss,
    server_from_args,
    split_argv,
    wait_idle,
)

GIB = 2**30


def gib(n) -> str:
    return fmt(n / GIB, 2) if n is not None else "n/a"


def snapshot(vllm_pid: int, worker_pid: int) -> dict:
    gpu = gpu_memory_by_pid()
    if gpu:
        others = {pid: b for pid, b in gpu.items() if pid not in (vllm_pid, worker_pid, os.getpid())}
        return {
            "kind": "gpu",
            "vllm": gpu.get(vllm_pid),
            "worker": gpu.get(worker_pid),
            "gpu_total_used": (gpus_memory_used() or [None])[0],
            "other_processes": {f"{pid} {process_name(pid)}": b for pid, b in others.items()},
        }
    return {"kind": "rss", "vllm": rss(vllm_pid), "worker": rss(worker_pid), "other_processes": {}}


def breakdown(model_path: str, examples: list[dict], max_tokens_per_step: int) -> list[dict]:
    import torch
    from train_throughput_bench import encode_all
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker.param_groups import make_optimizer, optimizer_state_bytes
    from worker.trainer import Trainer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(
        torch, str(getattr(AutoConfig.from_pretrained(model_path), "dtype", None) or "bfloat16").removeprefix("torch.")
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    encoded = encode_all(model_path, examples, None)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for name in ("apollo-mini", "apollo", "adamw"):
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        opt = make_optimizer(model, name, 1e-6)
        trainer = Trainer(model, opt, max_tokens_per_step=max_tokens_per_step)
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        trainer.train(encoded, epochs=1)
        row = {
            "optimizer": name,
            "weights_bytes": weights,
            "grad_bytes": grads,
            "state_bytes": optimizer_state_bytes(opt),
        }
        if cuda:
            torch.cuda.synchronize()
            row["peak_above_weights_bytes"] = torch.cuda.max_memory_allocated() - base
            row["after_job_bytes"] = torch.cuda.memory_allocated() - base
        rows.append(row)
        del opt, trainer
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    own, extra = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--max-tokens-per-step", type=int, default=4096)
    parser.add_argument("--breakdown", action="store_true", help="also the per-optimizer breakdown on a copy")
    parser.add_argument("--snapshot-to", type=Path, help="only take the untrained snapshot and write it here")
    parser.add_argument(
        "--snapshot-from",
        type=Path,
        help="use this earlier untrained snapshot (e.g. taken before other jobs trained on the server)",
    )
    args = parser.parse_args(own)

    from apollo_train.shared import handles

    with server_from_args(args, extra) as server:
        client = Client(server.url)
        wait_idle(client)
        st = client.status()
        meta = handles.read(handles.handles_path(server.run_dir, 0))["__metadata__"]
        vllm_pid, worker_pid = meta["pid"], st["worker"]["pid"]
        examples = chat_examples(args.examples, seed=3)
        if args.snapshot_to:
            args.snapshot_to.write_text(json.dumps({"worker_pid": worker_pid, **snapshot(vllm_pid, worker_pid)}))
            return
        before = json.loads(args.snapshot_from.read_text()) if args.snapshot_from else snapshot(vllm_pid, worker_pid)
        job = client.train(examples, epochs=1, lr=1e-6, force=True, wait=True)
        time.sleep(1.0)
        after = snapshot(vllm_pid, worker_pid)
        result = {
            "optimizer": st["optimizer"],
            "vllm_pid": vllm_pid,
            "worker_pid": worker_pid,
            "before_training": before,
            "after_training": after,
            "train_job": {k: job.get(k) for k in ("state", "steps", "tokens")},
        }
        unit = "GPU" if after["kind"] == "gpu" else "RSS"
        rows = [
            f"| memory ({unit}), optimizer {st['optimizer']['name']} | vLLM alone {gib(after['vllm'])} GiB | "
            f"worker attached {gib(before['worker'])} GiB | worker after training {gib(after['worker'])} GiB | "
            f"vLLM + worker {gib((after['vllm'] or 0) + (after['worker'] or 0))} GiB |"
        ]
        if args.breakdown:
            result["breakdown"] = breakdown(st["model"], examples, args.max_tokens_per_step)
            for r in result["breakdown"]:
                rows.append(
                    f"| worker memory, {r['optimizer']} (unshared copy) | peak above weights "
                    f"{gib(r.get('peak_above_weights_bytes'))} GiB | grads {gib(r['grad_bytes'])} GiB | "
                    f"optimizer state {fmt(r['state_bytes'] / 2**20, 1)} MiB |"
                )
        emit(args, "memory", result, rows)


if __name__ == "__main__":
    main()
