"""One 8-byte unsigned integer in a file of the run dir, memory-mapped: one process writes, others read.

A read is a memory load (no system call, no message), so it can sit on a hot path: every generation
request reads the weights' version, the training worker reads vLLM's load at every decoder layer.
Readers see the old or the new value, never a torn one.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path


class MappedWord:
    def __init__(self, path: str | os.PathLike, create: bool = False):
        """`create`: the writer makes the file (zero) if it does not exist; readers read 0 until it does."""
        self.path = Path(path)
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
                return None
            try:
                self._map = mmap.mmap(fd, 8)
            finally:
                os.close(fd)
        return self._map

    def read(self) -> int:
        m = self._mapped()
        return struct.unpack_from("<Q", m)[0] if m is not None else 0

    def write(self, value: int) -> None:
        struct.pack_into("<Q", self._mapped(), 0, value)
