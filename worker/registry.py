"""The dedupe registry: which examples the current weights have already been trained on.

Keys are `Encoded.key` (a hash of the tokenized context and answer). Two places hold them:

- The journal, an append-only file with one key per line in the server's run dir. `add()`
  appends and fsyncs before it returns, so a crash of the worker loses nothing: a restarted
  worker reads the journal back, and the weights it attaches to (vLLM's, which outlived the
  worker) do contain that training.
- The registry file written with each checkpoint (worker/persist.py, from the keys taken with
  the weights' snapshot), which matches the weights saved in that checkpoint. A new server
  starts from a checkpoint and `load()`s its registry; its run dir, and so its journal, is new.
  Examples trained after that checkpoint may then be trained again, which is right: that
  training was lost with the old server's weights.

The worker reads the checkpoint's registry and then the journal each time it starts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from worker.journal import Journal


class DedupeRegistry:
    def __init__(self, journal_path: str | os.PathLike | None):
        """Open (or create) the journal at `journal_path` and read the keys it holds.
        None keeps the registry in memory only (e.g. offline training)."""
        self._lock = threading.Lock()
        self._journal = Journal(journal_path) if journal_path is not None else None
        self._keys: set[str] = set(self._journal.lines) if self._journal is not None else set()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        """The keys in sorted order, as of the call (safe while another thread adds)."""
        with self._lock:
            return iter(sorted(self._keys))

    def add(self, keys: Iterable[str]) -> None:
        """Record keys as trained. With a journal they are on disk when this returns."""
        keys = list(dict.fromkeys(keys))
        for k in keys:
            _check_key(k)
        with self._lock:
            new = [k for k in keys if k not in self._keys]
            if self._journal is not None:
                self._journal.append(new)
            self._keys.update(new)

    def load(self, checkpointed_path: str | os.PathLike) -> int:
        """Merge the keys of a registry file (format_keys); returns how many were new."""
        keys = _parse(Path(checkpointed_path).read_text(encoding="utf-8"))
        with self._lock:
            before = len(self._keys)
            self._keys.update(keys)
            return len(self._keys) - before

    def replace(self, checkpointed_path: str | os.PathLike) -> None:
        """Hold exactly the keys of a registry file (a restored checkpoint's), journal included."""
        keys = set(_parse(Path(checkpointed_path).read_text(encoding="utf-8")))
        with self._lock:
            if self._journal is not None:
                self._journal.rewrite(sorted(keys))
            self._keys = keys

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def __enter__(self) -> "DedupeRegistry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_keys(keys: Iterable[str]) -> str:
    """The registry's file format (journal and checkpoint alike): one key per line."""
    return "".join(f"{k}\n" for k in keys)


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key or any(c.isspace() for c in key):
        raise ValueError(f"registry keys are non-empty strings without whitespace, got {key!r}")


def _parse(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
