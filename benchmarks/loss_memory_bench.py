"""Peak memory of one training step's loss and backward: answer-token logits in chunks vs whole.

worker/trainer.py forms the logits of answer tokens only, LOSS_CHUNK_TOKENS at a time, recomputed in
the backward pass ("chunked"); models whose logits are more than their output layer's use their own
forward, which forms every answer token's logits at once ("whole"). Here a random Qwen3 with
Qwen3-0.6B's vocabulary (151,936, tied embeddings) and a small body trains on one sequence of
--tokens tokens, all answer. Each variant runs in a child process and reports the peak memory above
the weights: CUDA memory allocated on a GPU, the growth of the peak resident set on the CPU.

    python benchmarks/loss_memory_bench.py [--tokens 4096] [--hidden 512] [--layers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("chunked", "whole")


def measure(variant: str, tokens: int, hidden: int, layers: int) -> dict:
    """One loss and backward in this process; returns its peak memory above the weights."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from worker.trainer import Trainer

    cuda = torch.cuda.is_available()
    config = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=hidden // 8, tie_word_embeddings=True)
    torch.manual_seed(0)
    device = "cuda" if cuda else "cpu"
    model = Qwen3ForCausalLM(config).to(device, torch.bfloat16 if cuda else torch.float32)
    # the loss alone: decoder layers keep their activations (no activation checkpointing)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_tokens_per_step=tokens,
                      activation_checkpointing=False)
    if variant == "whole":
        trainer._split = None  # the path of models whose logits are not plainly their output layer's
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[0, 0] = -100
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.loss(ids, mask, labels).backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "peak_above_weights_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.tokens, args.hidden, args.layers)))
        return
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
                              "--hidden", str(args.hidden), "--layers", str(args.layers)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    chunked, whole = (r["peak_above_weights_bytes"] / 2**30 for r in rows)
    print(f"| loss + backward, {args.tokens} answer tokens, vocabulary 151,936, hidden {args.hidden}, "
          f"{rows[0]['device']} | chunked {chunked:.2f} GiB | whole {whole:.2f} GiB | whole / chunked "
          f"{whole / chunked:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "loss_memory", "tokens": args.tokens, "hidden": args.hidden,
                                         "layers": args.layers, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
