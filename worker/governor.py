"""Serving first: while vLLM has requests in flight, training takes at most a set share of the GPU's time.

Two processes on one GPU time-slice it: when both have work queued, each gets about half, so training
that runs back to back halves serving (docs/performance.md: `benchmarks/gpu_sharing_bench.py` measured
0.38 of a decode loop's speed left beside continuous matrix products on an H200; MPS did no better for
serving unless the trainer's SMs were capped, which also caps it when the server is idle). So the
worker yields instead: at every yield point (each decoder layer in the forward pass, in its
recomputation and after its parameters are stepped in the backward pass) it reads vLLM's load
(shared/serving_load.py) and, while requests are in flight, waits for its own queued GPU work and
then sleeps `(1 - share) / share` times as long as that work took. vLLM then has the GPU to itself
for most of the time. With no request in flight it never waits: an idle server trains at full speed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

SLICE_S = 0.005  # a sleep re-reads the load this often, so training resumes soon after serving ends


class Governor:
    def __init__(self, load: Callable[[], int], share: float, device: torch.device | str = "cpu",
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep):
        """`load()`: requests in flight now; `share`: the share of time training may take while there are
        any (1: no limit)."""
        self.load, self.device, self.clock, self.sleep = load, torch.device(device), clock, sleep
        self.share = share
        self.unit_start: float | None = None  # when the work measured at the next yield point began
        self.yielded_s = 0.0  # slept for serving, in all
        self.suspended = False  # generation is paused for a step (the step barrier): nothing to yield to

    @property
    def share(self) -> float:
        return self._share

    @share.setter
    def share(self, value: float) -> None:
        if not 0 < value <= 1:
            raise ValueError(f"the training share while serving must be in (0, 1], got {value}")
        self._share = value

    def yield_point(self) -> None:
        """Called between units of training work; sleeps while serving needs the GPU (see the module)."""
        if self._share >= 1 or self.suspended or not self.load():
            self.unit_start = None
            return
        if self.unit_start is None:  # serving just began: measure from here
            self.unit_start = self.clock()
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the unit's GPU work is done: its time is measured, none is queued
        now = self.clock()
        pause = (now - self.unit_start) * (1 - self._share) / self._share
        end = now + pause
        while self.load() and (left := end - self.clock()) > 0:
            self.sleep(min(SLICE_S, left))
        after = self.clock()
        self.yielded_s += after - now
        self.unit_start = after

    @contextlib.contextmanager
    def suspend(self) -> Iterator[None]:
        """No yielding inside: vLLM's generation is paused, so sleeping would only lengthen the pause."""
        self.suspended = True
        try:
            yield
        finally:
            self.suspended = False

    def install(self, model: nn.Module) -> list:
        """A yield point before each decoder layer's forward pass (and its recomputation in the backward
        pass); returns the hooks' handles."""
        return [layer.register_forward_pre_hook(lambda *_: self.yield_point()) for layer in decoder_layers(model)]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, by the class names transformers marks as not to be split
    (`_no_split_modules`: Qwen3DecoderLayer, LlamaDecoderLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]
