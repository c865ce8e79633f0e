"""`apollo-train train`: train a model directory on a JSONL file of examples, without vLLM.

Runs the worker's own code path (encode_example, Trainer, make_optimizer, write_model_dir) on a
model loaded from disk, so what works here works on the served model and vice versa. Each line
of the data file is one example in the format POST /train takes:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "strip": [0]}

The result is a complete model directory (default `<MODEL_DIR>-trained`) that vLLM can serve.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_DATA = 2


class DataError(Exception):
    """A line of the data file is unusable; the message names the file and line."""


def parse_args(argv: Sequence[str] | None):
    from apollo_train.shared.config import OPTIMIZERS, Settings

    default = Settings()
    p = argparse.ArgumentParser(
        prog="apollo-train train",
        description="Train a Hugging Face model directory on chat examples (JSONL, one POST /train "
        "example per line) and write the trained model directory.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="Hugging Face model directory")
    p.add_argument("data", metavar="DATA.jsonl", type=Path,
                   help='one example per line: {"messages": [...], "strip": [...]}')
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=default.optimizer)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the optimizer's default, as for the server)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-tokens-per-step", type=int, default=default.max_tokens_per_step,
                   help="padded tokens per optimizer step (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="output model directory (default: MODEL_DIR-trained; MODEL_DIR itself is allowed)")
    args = p.parse_args(argv)
    if not args.model_dir.is_dir():
        p.error(f"MODEL_DIR {args.model_dir} is not a directory")
    if not args.data.is_file():
        p.error(f"DATA.jsonl {args.data} is not a file")
    if args.epochs < 1 or args.max_tokens_per_step < 1:
        p.error("--epochs and --max-tokens-per-step must be at least 1")
    if args.lr is not None and not args.lr > 0:
        p.error("--lr must be positive")
    if args.out is None:
        model_dir = args.model_dir.resolve()
        args.out = model_dir.with_name(model_dir.name + "-trained")
    return args


def encode_file(path: Path, tokenizer, *, eos_token_ids=None, max_len: int | None = None) -> list:
    """Encode every example of a JSONL file (the shared schema's `Example`, as POST /train takes);
    raise DataError naming the first bad line."""
    from apollo_train.shared.protocol import BadRequest
    from apollo_train.shared.schema import Example, jsonl, parse
    from worker.chat_tokens import ExampleError, encode_example

    try:
        encoded = [encode_example(tokenizer, parse(Example, data, where), max_len, eos_token_ids=eos_token_ids,
                                  where=where) for where, data in jsonl(path)]
    except (BadRequest, ExampleError) as exc:
        raise DataError(str(exc)) from None
    if not encoded:
        raise DataError(f"{path.name}: no examples (the file is empty)")
    return encoded


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; `argv` is what follows `apollo-train train` on the command line."""
    args = parse_args(argv)

    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from apollo_train.shared.config import DEFAULT_LR
    from apollo_train.shared.cpu import enable_amx

    enable_amx()
    from worker.chat_tokens import eos_token_ids
    from worker.checkpoint import snapshot, write_model_dir
    from worker.param_groups import make_optimizer
    from worker.trainer import Trainer, batches

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    config = AutoConfig.from_pretrained(args.model_dir)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        encoded = encode_file(
            args.data, tokenizer, eos_token_ids=eos_token_ids(args.model_dir, tokenizer),
            max_len=getattr(text_config, "max_position_embeddings", None),
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_DATA

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    optimizer = make_optimizer(model, args.optimizer, lr)
    trainer = Trainer(model, optimizer, max_tokens_per_step=args.max_tokens_per_step)

    n_steps = len(batches(encoded, args.max_tokens_per_step)) * args.epochs
    print(f"training {args.model_dir} on {len(encoded)} examples: {n_steps} steps of {args.optimizer}, "
          f"lr {lr:g}, {args.epochs} epoch(s), on {device} in {model.dtype}", file=sys.stderr)
    with tqdm(total=n_steps, unit="step", desc="train") as bar:
        def on_step(i: int, loss: float, tokens: int) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)

        result = trainer.train(encoded, epochs=args.epochs, on_step=on_step)

    weights = snapshot(model.state_dict())
    with tqdm(total=0, unit="B", unit_scale=True, desc="write") as bar:
        def on_write(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        info = write_model_dir(weights, source_dir=args.model_dir, target_dir=args.out, progress=on_write)

    first, last = (result.losses[0], result.losses[-1]) if result.losses else (float("nan"),) * 2
    skipped = f", {result.skipped_steps} skipped (non-finite)" if result.skipped_steps else ""
    print(f"{result.steps} steps, {result.tokens} answer tokens, loss {first:.4f} -> {last:.4f}{skipped}",
          file=sys.stderr)
    print(info["path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
