"""Large models on one GPU: a random-weight model of a real shape served and trained in place, measured.

The model directory holds only a config and a tokenizer (a 32B checkpoint would not fit the disk);
`--load-format dummy` makes apollo-train's loader draw random weights through vLLM's own weight
loaders, so they are shared and trained like a checkpoint's. One table row:

  vLLM's weights and KV cache (from its log), the worker's peak GPU memory above the shared weights
  with its parts (optimizer state measured; gradients and activations as estimated), serving tok/s
  idle vs during continuous training (rounds of `--round-s` seconds while the worker trains full
  steps back to back), training tok/s meanwhile and alone, the step time, and model-FLOPs
  utilization (6 x parameters x training tok/s over the GPU's bf16 peak).

    python benchmarks/large_model_bench.py --shape q32b --json out.json -- --gpu-memory-utilization 0.72
    python benchmarks/large_model_bench.py --shape tiny -- --enforce-eager   # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Client,
    ClosedLoop,
    ContinuousTraining,
    Server,
    chat_examples,
    device_name,
    emit,
    fmt,
    gpus_memory_used,
    split_argv,
    wait_idle,
)

# Shapes of the real models (random weights); "tiny" checks the flow on a CPU.
SHAPES = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 64, "intermediate_size": 256},
    "q06": {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 3072, "tie_word_embeddings": True},
    "q8b": {"hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 12288, "tie_word_embeddings": False},
    "q32b": {"hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
             "head_dim": 128, "intermediate_size": 25600, "tie_word_embeddings": False},
}
VOCAB = 151936
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "B200": 2250e12}


def config_only_model(out: Path, shape: str) -> Path:
    """A model directory with the shape's config and a tokenizer padded to its vocabulary, no weights."""
    from transformers import AutoConfig

    from apollo_train.tiny_models import build_tiny_model

    vocab = VOCAB if shape != "tiny" else None
    small = build_tiny_model(out.parent / f"{out.name}-tokenizer", "qwen3", num_hidden_layers=1,
                             **({"vocab_size": vocab} if vocab else {}))
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(small, out, ignore=shutil.ignore_patterns("*.safetensors*", "apollo_tiny.json"))
    config = AutoConfig.from_pretrained(small)
    for k, v in SHAPES[shape].items():
        setattr(config, k, v)
    config.layer_types = [config.layer_types[0]] * config.num_hidden_layers
    config.save_pretrained(out)
    return out


def parameters(config: dict) -> int:
    h, n, i, heads, kv, hd = (config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                   "num_attention_heads", "num_key_value_heads", "head_dim"))
    layer = h * hd * (2 * heads + 2 * kv) + 3 * h * i + 2 * h + 2 * hd
    return n * layer + h + config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)


def from_log(log: Path) -> dict:
    """vLLM's own account of its memory, from its log."""
    text = log.read_text(errors="replace")
    out = {}
    for key, pattern in (("weights_gib", r"Model loading took ([\d.]+) GiB"),
                         ("kv_cache_gib", r"Available KV cache memory: ([\d.]+) GiB"),
                         ("kv_cache_tokens", r"KV cache size: ([\d,]+) tokens")):
        found = re.findall(pattern, text)
        if found:
            out[key] = float(found[-1].replace(",", ""))
    return out


def serving_round(url: str, model: str, concurrency: int, max_tokens: int, seconds: float) -> float:
    """Output tokens/s of a closed loop of `concurrency` clients over `seconds`."""
    with ClosedLoop(url, model, concurrency, max_tokens) as load:
        time.sleep(2.0)  # warm-up
        start, t0 = len(load.snapshot()), time.perf_counter()
        time.sleep(seconds)
        done, t1 = load.snapshot()[start:], time.perf_counter()
    return sum(r["tokens"] for r in done) / (t1 - t0)


def metric_sum(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics") as resp:
        return sum(float(line.rpartition(" ")[2]) for line in resp.read().decode().splitlines()
                   if line.split("{")[0].split(" ")[0] == name)


def trained(c: Client, seconds: float, examples: list[dict], serve=None) -> dict:
    """Training tok/s (answer tokens) and step time over `seconds` of continuous training, with `serve()`
    (a serving round) running meanwhile if given."""
    tokens0 = c.status()["tokens_trained"]
    steps0 = (metric_sum(c.base_url, "apollo_train:step_duration_seconds_sum"),
              metric_sum(c.base_url, "apollo_train:step_duration_seconds_count"))
    with ContinuousTraining(c, examples, epochs=4) as training:
        serving = serve() if serve else time.sleep(seconds)
    wait_idle(c)
    s, n = (metric_sum(c.base_url, "apollo_train:step_duration_seconds_sum") - steps0[0],
            metric_sum(c.base_url, "apollo_train:step_duration_seconds_count") - steps0[1])
    return {"serving_tok_s": serving, "train_tok_s": (c.status()["tokens_trained"] - tokens0) / training.seconds,
            "steps": training.steps, "step_s": s / n if n else None}


def main(argv=None) -> None:
    own, extra = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/apollo-train-large"))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--round-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--whole-model", action="store_true", help="the whole-model step (for the comparison)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--label", default="")
    args = parser.parse_args(own)
    args.label = args.label or args.shape + (" whole-model" if args.whole_model else "")

    model = config_only_model(args.work / args.shape, args.shape)
    flags = ["--load-format", "dummy", "--max-model-len", "4096", *extra]
    if args.whole_model:
        flags.append("--no-train-step-in-backward")
    log = args.work / f"server-{args.label.replace(' ', '-')}.log"
    with Server(str(model), flags, port=args.port, log=log, run_dir=args.work / "run") as server:
        c = Client(server.url)
        name = c.model()
        wait_idle(c)
        status = c.status()
        if status["state"] == "error":
            raise SystemExit(f"training is unavailable: {status['error']}")
        examples = chat_examples(8, answer_words=300, prompt_words=150)  # ~8 x 500 tokens: full 4,096-token steps
        idle = [serving_round(server.url, name, args.concurrency, args.max_tokens, args.round_s)
                for _ in range(args.rounds)]
        busy = [trained(c, args.round_s, examples, serve=lambda: serving_round(
            server.url, name, args.concurrency, args.max_tokens, args.round_s)) for _ in range(args.rounds)]
        alone = trained(c, args.round_s, examples)
        status = c.status()
        per_gpu = [b / 2**30 for b in gpus_memory_used() or []]  # while vLLM and the worker still hold it
    config = json.loads((model / "config.json").read_text())
    n_params = parameters(config)
    gpu = status.get("gpu_memory") or {}
    peak_flops = next((v for k, v in BF16_PEAK.items() if k in device_name()), None)
    result = {
        "shape": args.shape, "parameters": n_params, "whole_model_step": args.whole_model, "vllm": from_log(log),
        "worker_peak_bytes": gpu.get("peak_bytes"), "estimate_bytes": gpu.get("estimate_bytes"),
        "optimizer_state_bytes": status["optimizer"]["state_bytes"],
        "serving_idle_tok_s": idle, "serving_training_tok_s": [b["serving_tok_s"] for b in busy],
        "train_tok_s_while_serving": [b["train_tok_s"] for b in busy], "train_tok_s_alone": alone["train_tok_s"],
        "step_s": alone["step_s"], "mfu": 6 * n_params * alone["train_tok_s"] / peak_flops if peak_flops else None,
        "gpus_memory_gib": per_gpu or None, "tensor_parallel_size": status.get("tensor_parallel_size", 1),
    }
    ratio = statistics.median(result["serving_training_tok_s"]) / statistics.median(idle)
    gib = 2**30
    row = (f"| {args.label} | {n_params / 1e9:.2f}B | weights {fmt(result['vllm'].get('weights_gib'))} GiB, KV "
           f"{fmt(result['vllm'].get('kv_cache_gib'))} GiB | worker peak {fmt((gpu.get('peak_bytes') or 0) / gib)} GiB "
           f"(state {fmt(result['optimizer_state_bytes'] / gib, 2)}) | serving {fmt(statistics.median(idle), 0)} → "
           f"{fmt(statistics.median(result['serving_training_tok_s']), 0)} tok/s ({ratio:.2f}) | train "
           f"{fmt(statistics.median(result['train_tok_s_while_serving']), 0)} tok/s serving, "
           f"{fmt(alone['train_tok_s'], 0)} alone | step {fmt(alone['step_s'], 3)} s | MFU "
           f"{fmt(100 * result['mfu'] if result['mfu'] is not None else None)} % | GPUs in use "
           f"{', '.join(fmt(g) for g in per_gpu) if per_gpu else 'n/a'} GiB |")
    emit(args, "large_model", result, [row])


if __name__ == "__main__":
    main()
