"""How many times the served weights have changed: one counter in the run dir, in shared memory.

The training worker bumps it after every optimizer step; every API-server process reads it for
each generation request (api/cache_salt.py), so a request admitted after a step never reuses keys
and values that earlier weights computed. A memory-mapped 8-byte file costs a read per request and
works however many API-server processes vLLM runs.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

FILE = "weights.version"


class WeightVersion:
    def __init__(self, run_dir: str | os.PathLike, create: bool = False):
        """`create`: the writer (the training worker) makes the file if it does not exist."""
        self.path = Path(run_dir) / FILE
        self._map: mmap.mmap | None = None
        if create and not self.path.exists():
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, 8)
            finally:
                os.close(fd)

    def _mapped(self) -> mmap.mmap | None:
        if self._map is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
            except FileNotFoundError:
                return None  # no worker has started: the weights are as loaded
            try:
                self._map = mmap.mmap(fd, 8)
            finally:
                os.close(fd)
        return self._map

    def read(self) -> int:
        m = self._mapped()
        return struct.unpack_from("<Q", m)[0] if m is not None else 0

    def bump(self) -> int:
        """Only the training worker writes; readers see the old or the new value, never a torn one."""
        m = self._mapped()
        value = struct.unpack_from("<Q", m)[0] + 1
        struct.pack_into("<Q", m, 0, value)
        return value
