"""What the worker's threads share: one object, one lock.

The front desk (control and intake threads) reads it to answer `/train/status` and to drop
duplicates; the recipe (training thread) and the checkpoint writer thread change it as jobs run.
Every read and write goes through the lock, so a status never shows half an update.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable

COUNTERS = ("step", "examples_trained", "tokens_trained", "input_tokens")


@dataclasses.dataclass
class WorkerState:
    phase: str = "starting"  # starting | idle | training | checkpointing | restoring | error
    error: str | None = None  # why training is unavailable (phase "error")
    warning: str | None = None
    counters: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    last_loss: float | None = None
    eval_loss: float | None = None
    last_checkpoint: dict | None = None
    checkpoint_progress: dict | None = None  # the checkpoint being written: job id, bytes written and in all
    pending_keys: set[str] = dataclasses.field(default_factory=set)  # examples queued or training now
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def update(self, **fields) -> None:
        with self.lock:
            for name, value in fields.items():
                setattr(self, name, value)

    def count(self, **added: int) -> None:
        with self.lock:
            for name, value in added.items():
                self.counters[name] += value

    def read(self) -> dict:
        """A consistent copy of every field."""
        with self.lock:
            return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "lock"}

    def hold_keys(self, keys: Iterable[str]) -> None:
        with self.lock:
            self.pending_keys.update(keys)

    def release_keys(self, keys: Iterable[str]) -> None:
        with self.lock:
            self.pending_keys.difference_update(keys)


def _copy(value):
    return type(value)(value) if isinstance(value, (dict, set)) else value
