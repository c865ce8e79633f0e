"""The training loop: batches of encoded examples -> loss -> one optimizer step per batch.

The same code trains the served model inside the worker and a model loaded from disk offline.
The loss is the mean cross-entropy over the answer tokens of the batch, computed explicitly in
float32 (the model's own `labels=` path shifts and averages in ways we want to see written out).
Vocabulary-wide logits are the largest activation of a step (4,096 tokens x 152k vocabulary are
2.3 GiB in float32, and as much again for their gradient), so only the answer tokens' logits are
formed, LOSS_CHUNK_TOKENS at a time, and recomputed in the backward pass instead of kept.

Memory beyond the weights and the optimizer state, for a large model: by default each decoder layer's
parameters are stepped inside the backward pass as soon as their gradients are complete, and those
gradients freed at once, so no full set of gradients ever exists; and the decoder layers' activations
are recomputed in the backward pass (activation checkpointing) instead of kept. Stepping a layer's
parameters together (not one by one) lets same-shape matrices share the optimizer's kernel launches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from worker.chat_tokens import Encoded

log = logging.getLogger("apollo_train.worker")
IGNORE = -100  # label of positions outside the answer
LOSS_CHUNK_TOKENS = 1024  # answer tokens whose logits exist at once
# Config fields with which logits are more than lm_head(hidden states): such models keep their own forward.
BARRIER_REASON = "the step barrier pauses generation only while the step writes the weights"
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class StepHooks:
    """What the worker does around each optimizer step; the default does nothing."""

    pauses_generation = False  # True: before_step pauses vLLM, so the step should write all weights at once

    def before_step(self) -> None:
        """Called before the first weight of a step is written: right before the optimizer step, or,
        when parameters are stepped inside the backward pass, before backward starts. The worker
        pauses vLLM's generation here when the step barrier is on, so no forward pass sees half a
        step. If it raises, nothing is written and the error propagates (after_step is not called)."""

    def after_step(self) -> None:
        """Called after the last weight of a step was written: after the optimizer step, or after
        the last parameter stepped in the backward pass; also when the step or backward raised. The
        worker moves vLLM on to the new weights here and resumes generation if it was paused."""


@dataclasses.dataclass
class JobResult:
    steps: int = 0  # batches processed, skipped ones included
    losses: list[float] = dataclasses.field(default_factory=list)  # one per step; nan if non-finite
    tokens: int = 0  # answer tokens of the steps that changed the weights
    input_tokens: int = 0  # every token the steps computed on (prompts, answers and replayed examples; no padding)
    skipped_steps: int = 0  # steps that changed no weight: a non-finite loss, or every update non-finite
    skipped_params: int = 0  # parameter updates left out as not finite (in every step, skipped ones too)
    whole_model_reason: str | None = None  # why the step came after backward; None: stepped in backward
    replayed: int = 0  # examples drawn from the replay buffer and trained again (not in `tokens`)


class Replay(Protocol):
    def sample(self, n: int, exclude: Sequence[str] = ()) -> list[Encoded]: ...


def fit(batch: Sequence[Encoded], extra: list[Encoded], max_tokens: int) -> list[Encoded]:
    """`extra` without its longest examples until batch + extra, padded, fits in max_tokens."""
    extra = sorted(extra, key=lambda e: len(e.input_ids))
    while extra and (len(batch) + len(extra)) * max(len(e.input_ids) for e in (*batch, *extra)) > max_tokens:
        extra.pop()
    return extra


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
    """Trains ``model`` with ``optimizer``, one step per batch of at most ``max_tokens_per_step`` padded
    tokens. ``step_in_backward``: each parameter is stepped as soon as its gradient is complete (the
    optimizer's ``step_param``) and its gradient freed, where the optimizer and parameters allow it,
    else the whole model after backward with a logged reason. ``activation_checkpointing``: the
    decoder layers' activations are recomputed in the backward pass (the model's own switch)."""

    def __init__(self, model, optimizer, *, max_tokens_per_step: int, hooks: StepHooks | None = None,
                 step_in_backward: bool = True, activation_checkpointing: bool = True, governor=None):
        self.model = model
        self.optimizer = optimizer
        self.max_tokens_per_step = max_tokens_per_step
        self.hooks = hooks
        self.step_in_backward = step_in_backward
        self.governor = governor  # worker/governor.py: yields the GPU to serving between layers
        if governor is not None:
            governor.install(model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._split = body_and_head(model)
        set_activation_checkpointing(model, activation_checkpointing)

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
        on_step: Callable[[int, float, int], None] | None = None,
        replay: Replay | None = None,
        replay_ratio: float = 0.0,
        step: Callable[[list[torch.Tensor], list[float]], tuple[float, bool, int]] | None = None,
    ) -> JobResult:
        """Train `epochs` passes over `encoded`, one optimizer step per batch. `lr` overrides
        every param group's learning rate for this call only. `on_step(step_index, loss, tokens)` is
        called after every step, with the tokens it computed on. With `replay`, each step also trains
        `replay_ratio` examples drawn from it per new example (packed so that a step stays within
        max_tokens_per_step); they do not count in `tokens`. `step(tensors, lrs)` takes each step
        (default `step_batch`; under tensor parallelism, every rank's `step_batch`)."""
        result = JobResult()
        replaying = replay is not None and replay_ratio > 0
        budget = max(1, int(self.max_tokens_per_step / (1 + replay_ratio))) if replaying else self.max_tokens_per_step
        plan = batches(encoded, budget)
        own_keys = [e.key for e in encoded]
        saved_lrs = [g["lr"] for g in self.optimizer.param_groups]
        was_training = self.model.training
        step = step or self.step_batch
        result.whole_model_reason = self._whole_model_reason()
        if result.whole_model_reason not in (None, BARRIER_REASON) and self.step_in_backward:
            log.warning("stepping the whole model after backward: %s", result.whole_model_reason)
        try:
            if lr is not None:
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            for _ in range(epochs):
                for batch in plan:
                    extra = (fit(batch, replay.sample(math.ceil(replay_ratio * len(batch)), own_keys),
                                 self.max_tokens_per_step) if replaying else [])
                    result.replayed += len(extra)
                    computed = sum(len(e.input_ids) for e in batch + extra)
                    result.input_tokens += computed
                    loss, applied, skipped_params = step(list(collate(batch + extra)), lrs)
                    result.losses.append(loss)
                    result.skipped_params += skipped_params
                    if applied:
                        result.tokens += sum(e.num_target_tokens for e in batch)
                    else:
                        result.skipped_steps += 1
                    if on_step is not None:
                        on_step(result.steps, loss, computed)
                    result.steps += 1
        finally:
            for g, saved in zip(self.optimizer.param_groups, saved_lrs):
                g["lr"] = saved
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train(was_training)
        return result

    def step_batch(self, tensors: list[torch.Tensor], lrs: list[float]) -> tuple[float, bool, int]:
        """One optimizer step on a collated batch (input ids, attention mask, labels; on any device) with
        these param-group learning rates: (loss, whether the weights changed, parameter updates skipped).
        Under tensor parallelism every rank runs it on the same batch, for its part of the model."""
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.model.train()
        device = _device_of(self.model)
        in_backward = self._whole_model_reason() is None
        with self._steps_in_backward() if in_backward else contextlib.nullcontext() as layer_steps:
            return self._step(*(t.to(device) for t in tensors), layer_steps=layer_steps)

    @torch.no_grad()
    def batch_loss(self, input_ids, attention_mask, labels) -> float:
        """The loss of one collated batch in eval mode, without a step (the drift guard's eval loss)."""
        device = _device_of(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            return self.loss(*(t.to(device) for t in (input_ids, attention_mask, labels))).item()
        finally:
            self.model.train(was_training)

    def _whole_model_reason(self) -> str | None:
        """Why this job's parameters cannot be stepped inside the backward pass (None: they can)."""
        if not self.step_in_backward:
            return "step_in_backward=False"
        if (self.hooks is not None and self.hooks.pauses_generation
                and getattr(self.optimizer, "whole_model_step", True)):
            return BARRIER_REASON
        if not hasattr(self.optimizer, "step_param"):
            return f"{type(self.optimizer).__name__} cannot step one parameter at a time"
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and not p.is_leaf:
                    return f"parameter {names.get(id(p), '?')} is not a leaf tensor, so no hook sees its gradient"
        return None

    def _step(self, input_ids, attention_mask, labels, layer_steps: LayerSteps | None) -> tuple[float, bool, int]:
        """One optimizer step, inside the backward pass with `layer_steps`; returns (loss, whether the
        weights changed, parameter updates skipped)."""
        loss = self.loss(input_ids, attention_mask, labels)
        value = loss.item()
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            return value, False, 0
        if layer_steps is not None:
            with self.writing_weights():  # the weights change during backward
                try:
                    loss.backward()
                    layer_steps.flush()
                finally:
                    layer_steps.drop()
                    skipped = self.optimizer.finish_param_steps()
            return value, not self.optimizer.last_step_skipped, skipped
        loss.backward()
        if self.governor is not None:
            self.governor.yield_point()
        with self.writing_weights():
            self.optimizer.step()
        stepped = sum(p.grad is not None for g in self.optimizer.param_groups for p in g["params"])
        self.optimizer.zero_grad(set_to_none=True)
        skipped = bool(getattr(self.optimizer, "last_step_skipped", False))
        return value, not skipped, stepped if skipped else 0

    @contextlib.contextmanager
    def _steps_in_backward(self) -> Iterator[LayerSteps]:
        """While inside, the optimizer's trainable parameters are stepped in the backward pass (LayerSteps)."""
        steps = LayerSteps(self.optimizer, layer_groups(self.model, self.optimizer),
                           self.governor.yield_point if self.governor is not None else None)
        handles = [p.register_post_accumulate_grad_hook(steps.ready)
                   for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        try:
            yield steps
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def writing_weights(self) -> Iterator[None]:
        """The step hooks around a block that writes the weights (after_step also when it raises)."""
        if self.hooks is None:
            yield
            return
        self.hooks.before_step()
        paused = self.governor is not None and self.hooks.pauses_generation
        try:
            with self.governor.suspend() if paused else contextlib.nullcontext():
                yield
        finally:
            self.hooks.after_step()


class LayerSteps:
    """Steps parameters inside the backward pass, a decoder layer at a time: autograd calls `ready(p)` once
    per backward when p's gradient is complete (also for a parameter used twice); once every parameter of
    p's layer is ready, they are stepped together (``optimizer.step_params``) and their gradients freed.
    A parameter outside the decoder layers (embeddings, final norm, output head) is stepped alone."""

    def __init__(self, optimizer, layers: list[list[torch.Tensor]], after_layer: Callable[[], None] | None):
        self.optimizer, self.after_layer = optimizer, after_layer
        self.layer_of = {p: i for i, layer in enumerate(layers) for p in layer}
        self.sizes = [len(layer) for layer in layers]
        self.waiting: dict[int, list[torch.Tensor]] = {}

    def ready(self, p: torch.Tensor) -> None:
        i = self.layer_of.get(p)
        if i is None:
            self._step([p])
            return
        waiting = self.waiting.setdefault(i, [])
        waiting.append(p)
        if len(waiting) == self.sizes[i]:
            del self.waiting[i]
            self._step(waiting)

    def flush(self) -> None:
        """After backward: step the layers whose parameters did not all get a gradient (frozen inputs)."""
        while self.waiting:
            self._step(self.waiting.pop(next(iter(self.waiting))))

    def drop(self) -> None:
        """After a backward pass that raised: forget gradients not yet stepped."""
        for params in self.waiting.values():
            for p in params:
                p.grad = None
        self.waiting.clear()

    def _step(self, params: list[torch.Tensor]) -> None:
        self.optimizer.step_params(params)
        for p in params:
            p.grad = None
        if self.after_layer is not None:
            self.after_layer()


def layer_groups(model, optimizer) -> list[list[torch.Tensor]]:
    """The optimizer's parameters of each decoder layer (worker.governor.decoder_layers)."""
    from worker.governor import decoder_layers

    trained = {p for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
    groups = [[p for p in layer.parameters() if p in trained] for layer in decoder_layers(model)]
    return [g for g in groups if g]


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant checkpointing,
    which keeps one backward pass, so each parameter's gradient is complete once) or keep them."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        if enabled:
            raise ValueError(f"{type(model).__name__} does not support activation checkpointing; "
                             "pass activation_checkpointing=False")
        return
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


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
    if hasattr(head, "cross_entropy_sum"):  # a tensor-parallel rank's part of the vocabulary
        return head.cross_entropy_sum(hidden, targets)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _device_of(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
