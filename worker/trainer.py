"""The training loop: batches of encoded examples -> loss -> one optimizer step per batch.

The same code trains the served model inside the worker and a model loaded from disk offline.
The loss is the mean cross-entropy over the answer tokens of the batch, computed explicitly in
float32 (the model's own `labels=` path shifts and averages in ways we want to see written out).
Vocabulary-wide logits are the largest activation of a step (4,096 tokens x 152k vocabulary are
2.3 GiB in float32, and as much again for their gradient), so only the answer tokens' logits are
formed, LOSS_CHUNK_TOKENS at a time, and recomputed in the backward pass instead of kept.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from worker.examples import Encoded

IGNORE = -100  # label of positions outside the answer
LOSS_CHUNK_TOKENS = 1024  # answer tokens whose logits exist at once
# Config fields with which logits are more than lm_head(hidden states): such models keep their own forward.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class StepHooks:
    """What the worker does around each optimizer step; the default does nothing."""

    def before_step(self) -> None:
        """Called right before the optimizer writes the weights. The worker pauses vLLM's
        generation here when the step barrier is on, so no forward pass sees half a step."""

    def after_step(self) -> None:
        """Called right after the weights changed (also when the step raised). The worker resets
        vLLM's prefix cache here, whose cached keys/values the old weights computed, and resumes
        generation if it was paused."""


@dataclasses.dataclass
class JobResult:
    steps: int = 0  # batches processed, skipped ones included
    losses: list[float] = dataclasses.field(default_factory=list)  # one per step; nan if non-finite
    tokens: int = 0  # answer tokens of the steps that changed the weights
    skipped_steps: int = 0  # steps with a non-finite loss or gradients: weights unchanged


def batches(encoded: Sequence[Encoded], max_tokens_per_step: int) -> list[list[Encoded]]:
    """Pack examples, in order, into batches whose padded size (examples x longest) fits in
    max_tokens_per_step. An example longer than that on its own gets a batch of its own."""
    out: list[list[Encoded]] = []
    batch: list[Encoded] = []
    longest = 0
    for e in encoded:
        n = len(e.input_ids)
        if batch and (len(batch) + 1) * max(longest, n) > max_tokens_per_step:
            out.append(batch)
            batch, longest = [], 0
        batch.append(e)
        longest = max(longest, n)
    if batch:
        out.append(batch)
    return out


def collate(batch: Sequence[Encoded], device: torch.device | str = "cpu"):
    """Right-padded input_ids, attention_mask and labels (IGNORE outside the answers)."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # pad id is masked out
    attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention_mask[i, :n] = 1
        labels[i, e.target_start:n] = input_ids[i, e.target_start:n]
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


class Trainer:
    def __init__(self, model, optimizer, *, max_tokens_per_step: int, hooks: StepHooks | None = None):
        self.model = model
        self.optimizer = optimizer
        self.max_tokens_per_step = max_tokens_per_step
        self.hooks = hooks
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._split = body_and_head(model)

    def loss(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens; position t predicts token t + 1.

        Logits are computed only for answer tokens (chunked, see the module's docstring), or, for a
        model whose logits are not plainly its output layer's, from the position before the earliest
        answer token on."""
        answer_rows = (labels != IGNORE).any(0).nonzero()
        first = max(int(answer_rows[0]) - 1, 0) if len(answer_rows) else 0
        targets = labels[:, first + 1 :]
        keep = targets != IGNORE
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._split is not None:
            body, head = self._split
            hidden = body(**inputs).last_hidden_state[:, first:-1][keep]
            return chunked_cross_entropy(hidden, head, targets[keep])
        kwargs = {"logits_to_keep": input_ids.shape[1] - first} if self._keeps_logits else {}
        logits = self.model(**inputs, **kwargs).logits[:, -(input_ids.shape[1] - first) :]
        return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep])

    def train(
        self,
        encoded: Sequence[Encoded],
        epochs: int = 1,
        lr: float | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> JobResult:
        """Train `epochs` passes over `encoded`, one optimizer step per batch. `lr` overrides
        every param group's learning rate for this call only. `on_step(step_index, loss)` is
        called after every step."""
        result = JobResult()
        plan = batches(encoded, self.max_tokens_per_step)
        device = _device_of(self.model)
        saved_lrs = [g["lr"] for g in self.optimizer.param_groups]
        was_training = self.model.training
        self.model.train()
        try:
            if lr is not None:
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
            for _ in range(epochs):
                for batch in plan:
                    loss, applied = self._step(*collate(batch, device))
                    result.losses.append(loss)
                    if applied:
                        result.tokens += sum(e.num_target_tokens for e in batch)
                    else:
                        result.skipped_steps += 1
                    if on_step is not None:
                        on_step(result.steps, loss)
                    result.steps += 1
        finally:
            for g, saved in zip(self.optimizer.param_groups, saved_lrs):
                g["lr"] = saved
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train(was_training)
        return result

    def _step(self, input_ids, attention_mask, labels) -> tuple[float, bool]:
        """One optimizer step; returns (loss, whether the weights changed)."""
        loss = self.loss(input_ids, attention_mask, labels)
        value = loss.item()
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            return value, False
        loss.backward()
        if self.hooks is not None:
            self.hooks.before_step()
        try:
            self.optimizer.step()
        finally:
            if self.hooks is not None:
                self.hooks.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        skipped = bool(getattr(self.optimizer, "last_step_skipped", False))
        return value, not skipped


def body_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(base model, output layer) when the logits are exactly head(base(...).last_hidden_state), as in
    the Qwen and Llama families; None otherwise (the model's own forward is used)."""
    body = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if body is model or head is None or config is None:
        return None
    configs = (config, config.get_text_config())
    if any(getattr(c, name, None) not in (None, 1, 1.0) for c in configs for name in LOGIT_TRANSFORMS):
        return None
    return body, head


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                          chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Mean float32 cross-entropy of head(hidden) against targets, `chunk` rows at a time; each chunk's
    logits are recomputed in the backward pass, so only one chunk's exist at any time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(targets), chunk):
        total = total + checkpoint(_cross_entropy_sum, head, hidden[i : i + chunk], targets[i : i + chunk],
                                   use_reentrant=False)
    return total / len(targets)


def _cross_entropy_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _device_of(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
