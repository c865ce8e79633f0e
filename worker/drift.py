"""The drift guard: a job that makes the model worse at held-out text is undone.

With `--train-eval-file FILE` the worker measures the mean loss of FILE's examples after each job
(and shows it in /train/status). With `--train-max-eval-loss-rise X` as well, it snapshots, in host
memory, the tensors a job changes (every trainable parameter, and the optimizer's state) before the
job, and a job that raised the eval loss by more than X nats is rolled back from that snapshot: the
weights vLLM serves and the optimizer are as before the job, its examples are not recorded as
trained, and the job ends `rolled_back` with the numbers. The snapshot costs host memory equal to
the trainable weights plus the optimizer state (docs/api.md).

FILE is JSONL: `{"text": "..."}` (the loss covers every token) or `{"messages": [...]}` (a chat as
/train takes; the loss covers the answer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from apollo_train.shared.protocol import BadRequest
from apollo_train.shared.schema import EvalText, Example, jsonl, parse
from worker.chat_tokens import Encoded, ExampleError, encode_example, example_key
from worker.param_groups import optimizer_state_bytes
from worker.trainer import batches, collate


class EvalFileError(ValueError):
    """The eval file is unusable; the message names the file and line."""


def read_eval_file(path: str | Path, tokenizer, max_len: int | None, eos_token_ids=None) -> list[Encoded]:
    path = Path(path)
    out = []
    try:
        for where, data in jsonl(path):
            if isinstance(data, dict) and "text" in data:
                ids = tokenizer(parse(EvalText, data, where).text, add_special_tokens=False)["input_ids"]
                ids = ids[:max_len] if max_len else ids
                out.append(Encoded(input_ids=ids, target_start=0, key=example_key([], ids)))
            else:
                out.append(encode_example(tokenizer, parse(Example, data, where), max_len,
                                          eos_token_ids=eos_token_ids, where=where))
    except OSError as exc:
        raise EvalFileError(f"cannot read the eval file {path}: {exc}") from None
    except (BadRequest, ExampleError) as exc:
        raise EvalFileError(str(exc)) from None
    if not any(e.num_target_tokens for e in out):
        raise EvalFileError(f"the eval file {path} has no tokens to measure")
    return out


def eval_loss(batch_loss: Callable[..., float], examples: list[Encoded], max_tokens_per_step: int) -> float:
    """Mean cross-entropy per target token over `examples`, `batch_loss(*collated batch)` a batch at a time
    (Trainer.batch_loss; under tensor parallelism, every rank's)."""
    total, count = 0.0, 0
    for batch in batches(examples, max_tokens_per_step):
        n = sum(e.num_target_tokens for e in batch)
        if n:
            total += batch_loss(*collate(batch)) * n
            count += n
    return total / count if count else math.nan


class Snapshot:
    """Copies, in host memory, of the trainable parameters and the optimizer's state."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.weights = {n: _to_host(p) for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = _tree(optimizer.state_dict(), _to_host)
        weights = sum(t.numel() * t.element_size() for t in self.weights.values())
        self.nbytes = weights + optimizer_state_bytes(optimizer)

    @torch.no_grad()
    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write the copies back in place (the served tensors stay the same memory)."""
        for n, p in model.named_parameters():
            if n in self.weights:
                p.copy_(self.weights[n], non_blocking=True)
        optimizer.load_state_dict(_tree(self.optimizer, lambda t: t.clone()))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    out.copy_(t.detach())
    return out


def _tree(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _tree(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tree(v, fn) for v in value)
    return value
