"""How many generation requests vLLM has in flight now: one counter in the run dir, in shared memory.

The supervising router writes it (api/supervisor.py, from vLLM's own count, a few times per decode
step); the training worker reads it at every decoder layer (worker/governor.py) to yield the GPU
while requests are being served.
"""

from __future__ import annotations

import os
from pathlib import Path

from apollo_train.shared.mapped_word import MappedWord

FILE = "serving.load"


def serving_load(run_dir: str | os.PathLike, create: bool = False) -> MappedWord:
    """The router creates it (`create`); the worker reads 0 (idle) until it exists."""
    return MappedWord(Path(run_dir) / FILE, create=create)
