"""An append-only file of text lines that survives a crash of the worker.

`append` writes and fsyncs before it returns, so a restarted worker reads back everything that was
recorded; a line torn by a crash is dropped when the file is opened. `rewrite` replaces the whole file
atomically (a restore, or compaction). The dedupe registry and the replay buffer keep theirs in the
server's run dir.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from apollo_train.shared.files import write_atomically


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            os.truncate(self.path, len(complete))  # the next append starts clean
        self.lines = [line for line in complete.decode("utf-8").splitlines() if line.strip()]
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, lines: Iterable[str]) -> None:
        text = "".join(f"{line}\n" for line in lines)
        if text:
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())

    def rewrite(self, lines: Iterable[str]) -> None:
        self._file.close()
        write_atomically(self.path, "".join(f"{line}\n" for line in lines).encode())
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()
