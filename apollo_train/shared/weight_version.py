"""How many times the served weights have changed: one counter in the run dir, in shared memory.

The training worker bumps it after every optimizer step; every API-server process reads it for
each generation request (api/cache_salt.py), so a request admitted after a step never reuses keys
and values that earlier weights computed. A memory-mapped word costs a read per request and works
however many API-server processes vLLM runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from apollo_train.shared.mapped_word import MappedWord

FILE = "weights.version"


class WeightVersion:
    def __init__(self, run_dir: str | os.PathLike, create: bool = False):
        """`create`: the writer (the training worker) makes the file; without it, no worker has started
        and the version is 0 (the weights as loaded)."""
        self.word = MappedWord(Path(run_dir) / FILE, create=create)

    def read(self) -> int:
        return self.word.read()

    def bump(self) -> int:
        """Only the training worker writes."""
        value = self.word.read() + 1
        self.word.write(value)
        return value
