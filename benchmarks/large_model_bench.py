"""Large models on one GPU: a random-weight model of a real shape served and trained in place, measured.

The model directory holds only a config and a tokenizer (a 32B checkpoint would not fit the disk);
`--load-format dummy` makes apollo-train's loader draw random weights through vLLM's own weight
loaders, so they are shared and trained like a checkpoint's. One server, measured in phases, each
setting changed live (POST /train/settings):

  alone      training with no serving load: the step inside the backward pass, then the whole-model
             step (training tok/s, step time, model-FLOPs utilization);
  idle       serving with no training (the reference);
  share X    serving while training runs back to back with --train-busy-share X;
  barrier X  the same with the step barrier on.

Serving is a closed loop of `--concurrency` clients streaming `--max-tokens`-token completions; tokens
are counted as they stream in, `--rounds` rounds of `--round-s` seconds per phase (median and range),
and the latency of every request that ended in the phase (p50, p99). Training tok/s counts every token
the steps computed on (prompts, answers and replayed examples, no padding; apollo_train:tokens_computed);
MFU is 6 x parameters x that over the GPU's bf16 peak (activation checkpointing's recomputation not
counted). Jobs that fail are reported with their reason.

    python benchmarks/large_model_bench.py --shape q32b --json out.json -- --gpu-memory-utilization 0.75
    python benchmarks/large_model_bench.py --shape tiny --round-s 3 -- --enforce-eager   # a dry run on the CPU
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
    Running,
    Server,
    chat_examples,
    device_name,
    emit,
    fmt,
    gpus_memory_used,
    percentile,
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
    # Qwen3-30B-A3B: a mixture of 128 experts of 768, 8 per token, in every layer
    "q30a3b": {"hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
               "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
               "num_experts_per_tok": 8, "tie_word_embeddings": False},
}
MIXTURES = ("q30a3b",)  # shapes built on the tiny Qwen3-MoE (the others on the tiny Qwen3)
VOCAB = 151936
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "B200": 2250e12}


def config_only_model(out: Path, shape: str) -> Path:
    """A model directory with the shape's config and a tokenizer padded to its vocabulary, no weights."""
    from transformers import AutoConfig

    from apollo_train.tiny_models import build_tiny_model

    vocab = VOCAB if shape != "tiny" else None
    family = "qwen3_moe" if shape in MIXTURES else "qwen3"
    small = build_tiny_model(out.parent / f"{out.name}-tokenizer", family, num_hidden_layers=1,
                             **({"vocab_size": vocab} if vocab else {}))
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(small, out, ignore=shutil.ignore_patterns("*.safetensors*", "apollo_tiny.json"))
    config = AutoConfig.from_pretrained(small)
    for k, v in SHAPES[shape].items():
        setattr(config, k, v)
    config.layer_types = [config.layer_types[0]] * config.num_hidden_layers
    config.save_pretrained(out)
    return out


def parameters(config: dict, active: bool = False) -> int:
    """The model's parameters; `active`: those one token computes with (a mixture of experts: its routed
    experts only), which is what MFU counts."""
    h, n, i, heads, kv, hd = (config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                   "num_attention_heads", "num_key_value_heads", "head_dim"))
    mlp = 3 * h * i
    if config.get("num_experts"):
        per_token = config["num_experts_per_tok"] if active else config["num_experts"]
        mlp = 3 * h * config["moe_intermediate_size"] * per_token + h * config["num_experts"]
    layer = h * hd * (2 * heads + 2 * kv) + mlp + 2 * h + 2 * hd
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


def metric_sum(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics") as resp:
        return sum(float(line.rpartition(" ")[2]) for line in resp.read().decode().splitlines()
                   if line.split("{")[0].split(" ")[0] == name)


class Phase:
    """Counters of the server at the start of a phase, and what they became by its end."""

    METRICS = ("apollo_train:step_duration_seconds_sum", "apollo_train:step_duration_seconds_count",
               "apollo_train:tokens_computed_total")

    def __init__(self, c: Client):
        self.c, self.t0 = c, time.perf_counter()
        self.yielded = c.status().get("yielded_s", 0)
        self.metrics = [metric_sum(c.base_url, m) for m in self.METRICS]

    def end(self) -> dict:
        seconds = time.perf_counter() - self.t0
        yielded = self.c.status().get("yielded_s", 0) - self.yielded
        step_s, steps, tokens = (metric_sum(self.c.base_url, m) - s for m, s in zip(self.METRICS, self.metrics))
        return {"seconds": seconds, "tok_s": tokens / seconds, "yielded_share": yielded / seconds, "steps": steps,
                "step_s": step_s / steps if steps else None}


def serve_phase(c: Client, load: ClosedLoop, rounds: int, round_s: float) -> dict:
    """Serving measured over `rounds` rounds: streamed tokens/s per round, latency of requests that ended."""
    t0 = time.perf_counter()
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        time.sleep(round_s)
        per_round.append(load.tokens_between(start, time.perf_counter()) / (time.perf_counter() - start))
    t1 = time.perf_counter()
    latency = [r["latency"] for r in load.snapshot() if t0 <= r["end"] < t1 and r["tokens"] == load.max_tokens]
    return {"tok_s": per_round, "tok_s_median": statistics.median(per_round), "requests": len(latency),
            "p50_s": percentile(latency, 50), "p99_s": percentile(latency, 99)}


def run_phase(c: Client, load: ClosedLoop | None, examples, args, settings: dict | None) -> dict:
    """One phase: the settings, training back to back unless `settings` is None, serving unless `load` is None."""
    out = {"settings": settings}
    if settings is not None:
        c.settings(**settings)
    if load is not None:
        load.paused.clear()
        time.sleep(2.0)  # the clients are streaming again
    if settings is None:
        out["serving"] = serve_phase(c, load, args.rounds, args.round_s)
        return out
    with ContinuousTraining(c, examples, epochs=4) as training:
        phase = Phase(c)
        if load is not None:
            out["serving"] = serve_phase(c, load, args.rounds, args.round_s)
        else:
            time.sleep(args.rounds * args.round_s)
        out["training"] = phase.end()
    out["failed_jobs"] = training.failed
    return out


def main(argv=None) -> None:
    own, extra = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="start a server of this shape (else --url)")
    parser.add_argument("--url", help="measure this running server instead")
    parser.add_argument("--work", type=Path, default=Path("/tmp/apollo-train-large"))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--round-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--shares", default="1,0.5,0.25,0.1", help="busy shares to measure while serving")
    parser.add_argument("--barrier-shares", default="0.25", help="busy shares to measure with the step barrier")
    parser.add_argument("--alone", default="in-backward,whole-model",
                        help="training-alone phases: in-backward, whole-model (empty: none)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--label", default="")
    args = parser.parse_args(own)
    if not (args.shape or args.url):
        raise SystemExit("give --shape (start a server) or --url (a running one)")
    args.label = args.label or args.shape or args.url

    if args.url:
        server = Running(args.url, None)
    else:
        model = config_only_model(args.work / args.shape, args.shape)
        server = Server(str(model), ["--load-format", "dummy", "--max-model-len", "4096", *extra], port=args.port,
                        log=args.work / f"server-{args.label.replace(' ', '-')}.log", run_dir=args.work / "run")
    with server:
        c = Client(server.url)
        name = c.model()
        wait_idle(c)
        status = c.status()
        if status["state"] == "error":
            raise SystemExit(f"training is unavailable: {status['error']}")
        config = json.loads((Path(status["model"]) / "config.json").read_text())
        # jobs of 8 examples of ~500 tokens, a new set each job, so that replay has earlier ones to draw: full
        # 4,096-token steps (half new, half replayed, at the default replay ratio)
        examples = [chat_examples(8, seed=k, answer_words=300, prompt_words=150) for k in range(16)]
        phases: dict[str, dict] = {}
        n_params, active = parameters(config), parameters(config, active=True)
        peak_flops = next((v for k, v in BF16_PEAK.items() if k in device_name()), None)

        def phase(key: str, load, settings) -> None:
            print(f"# {args.label}: {key}", flush=True)
            phases[key] = run_phase(c, load, examples, args, settings)
            phases[key]["gpu_memory"] = c.status().get("gpu_memory")  # the worker's peak so far
            print(f"#   {json.dumps(phases[key], default=str)}", flush=True)
            print(phase_row(args.label, key, phases, active, peak_flops), flush=True)
            if args.json:  # what was measured so far survives a run cut short
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"partial": True, "phases": phases}, indent=1, default=str) + "\n")

        for how in [x for x in args.alone.split(",") if x]:
            phase(f"alone {how}", None, {"busy_share": 1.0, "barrier": False, "step_in_backward": how == "in-backward"})
        with ClosedLoop(server.url, name, args.concurrency, args.max_tokens) as load:
            time.sleep(3.0)  # warm-up; the staggered first requests spread the clients out
            phase("idle", load, None)
            for share in [float(x) for x in args.shares.split(",") if x]:
                phase(f"share {share:g}", load, {"busy_share": share, "barrier": False, "step_in_backward": True})
            for share in [float(x) for x in args.barrier_shares.split(",") if x]:
                phase(f"barrier {share:g}", load, {"busy_share": share, "barrier": True})
            load.paused.set()
        c.settings(busy_share=status["busy_share"], barrier=status["mode"] == "barrier",
                   step_in_backward=status["step_in_backward"])
        status = c.status()
        per_gpu = [b / 2**30 for b in gpus_memory_used() or []]  # while vLLM and the worker still hold it
    gpu = status.get("gpu_memory") or {}
    result = {
        "shape": args.shape, "parameters": n_params, "active_parameters": active,
        "vllm": from_log(server.log) if args.shape else {},
        "worker_peak_bytes": gpu.get("peak_bytes"), "estimate_bytes": gpu.get("estimate_bytes"),
        "optimizer_state_bytes": status["optimizer"]["state_bytes"], "phases": phases,
        "gpus_memory_gib": per_gpu or None, "tensor_parallel_size": status.get("tensor_parallel_size", 1),
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "round_s": args.round_s, "rounds": args.rounds,
    }
    gib = 2**30
    rows = [f"| {args.label} | {n_params / 1e9:.2f}B | weights {fmt(result['vllm'].get('weights_gib'))} GiB, KV "
            f"{fmt(result['vllm'].get('kv_cache_gib'))} GiB | worker peak {fmt((gpu.get('peak_bytes') or 0) / gib)} "
            f"GiB above the weights (state {fmt(result['optimizer_state_bytes'] / gib, 2)} GiB) | GPUs in use "
            f"{', '.join(fmt(g) for g in per_gpu) if per_gpu else 'n/a'} GiB |"]
    emit(args, "large_model", result, rows)


def phase_row(label: str, key: str, phases: dict, n_params: int, peak_flops: float | None) -> str:
    """A phase's table row; serving as a ratio of the idle phase's (once measured). `n_params`: the parameters
    a token computes with (MFU)."""
    ph, idle = phases[key], (phases.get("idle") or {}).get("serving")
    tr, sv = ph.get("training") or {}, ph.get("serving")
    mfu = 6 * n_params * tr["tok_s"] / peak_flops if tr and peak_flops else None
    serving = ""
    if sv:
        serving = (f"{fmt(sv['tok_s_median'], 0)} ({fmt(min(sv['tok_s']), 0)}-{fmt(max(sv['tok_s']), 0)}) tok/s, "
                   f"p50 {fmt(sv['p50_s'], 2)} s, p99 {fmt(sv['p99_s'], 2)} s")
        if idle:
            serving += (f"; {sv['tok_s_median'] / idle['tok_s_median']:.2f} of idle, p99 "
                        f"{sv['p99_s'] / idle['p99_s']:.2f}x")
    training = (f"train {fmt(tr['tok_s'], 0)} tok/s ({fmt(tr['steps'], 0)} steps), step {fmt(tr['step_s'], 3)} s, "
                f"MFU {fmt(100 * mfu if mfu else None)} %, yielded {fmt(100 * tr['yielded_share'], 0)} %" if tr else "")
    failed = ph.get("failed_jobs")
    if failed:
        training += f"; {len(failed)} failed: {next(iter(failed.values()))}"
    return f"| {label} | {key} | {serving} | {training} |"


if __name__ == "__main__":
    main()
