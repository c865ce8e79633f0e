"""The replay buffer: examples trained before, trained again beside new ones so old lessons are not
overwritten by new ones (docs/learning-quality.md measures how much that matters).

It holds a uniform sample (reservoir sampling) of every example trained so far, at most
`--train-replay-size` of them, tokenized. Each optimizer step of a job adds `--train-replay-ratio`
replayed examples per new one. Replayed examples are not new: the dedupe registry and the counters
ignore them. Like the registry, the buffer is journaled in the run dir (a restarted worker keeps it)
and saved with every checkpoint (a server started on the checkpoint, or a restore, gets it back).
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterable, Sequence

from worker.chat_tokens import Encoded
from worker.journal import Journal

COMPACT_FACTOR = 4  # rewrite the journal once it holds this many times the buffer's lines


class ReplayBuffer:
    def __init__(self, size: int, journal_path=None, seed: int = 0):
        self.size = size
        self.items: list[Encoded] = []
        self.seen = 0  # examples offered so far; slot choice depends on it
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._journal = Journal(journal_path) if journal_path is not None else None
        self._journaled = 0  # lines in the journal
        if self._journal is not None:
            for line in self._journal.lines:
                self._apply(json.loads(line))
            self._journaled = len(self._journal.lines)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, encoded: Iterable[Encoded]) -> None:
        """Offer trained examples to the reservoir; on disk when this returns."""
        records = []
        with self._lock:
            for e in encoded:
                slot = self.seen if self.seen < self.size else self._rng.randrange(self.seen + 1)
                record = {"seen": self.seen + 1}
                if slot < self.size:
                    record.update(slot=slot, ids=e.input_ids, start=e.target_start, key=e.key)
                self._apply(record)
                records.append(record)
            if self._journal is not None:
                self._journal.append(json.dumps(r, separators=(",", ":")) for r in records)
                self._journaled += len(records)
                if self._journaled > COMPACT_FACTOR * max(self.size, 1):
                    self._rewrite()

    def sample(self, n: int, exclude: Sequence[str] = ()) -> list[Encoded]:
        """Up to `n` distinct examples, none of whose keys is in `exclude` (the job's own examples)."""
        with self._lock:
            skip = set(exclude)
            pool = [e for e in self.items if e.key not in skip]
            return self._rng.sample(pool, min(n, len(pool)))

    def dumps(self) -> bytes:
        """The buffer as a checkpoint stores it (the journal's format, compacted)."""
        with self._lock:
            return "".join(f"{line}\n" for line in self._lines()).encode()

    def replace(self, data: bytes) -> None:
        """Hold exactly what `dumps` wrote (a restored checkpoint's buffer), journal included."""
        with self._lock:
            self.items, self.seen = [], 0
            for line in data.decode().splitlines():
                if line.strip():
                    self._apply(json.loads(line))
            if self._journal is not None:
                self._rewrite()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

    def _rewrite(self) -> None:
        lines = self._lines()
        self._journal.rewrite(lines)
        self._journaled = len(lines)

    def _apply(self, record: dict) -> None:
        self.seen = record["seen"]
        if "slot" in record:
            e = Encoded(input_ids=record["ids"], target_start=record["start"], key=record["key"])
            if record["slot"] < len(self.items):
                self.items[record["slot"]] = e
            else:
                self.items.append(e)

    def _lines(self) -> list[str]:
        lines = [json.dumps({"seen": i + 1, "slot": i, "ids": e.input_ids, "start": e.target_start, "key": e.key},
                            separators=(",", ":")) for i, e in enumerate(self.items)]
        if self.seen > len(self.items):
            lines.append(json.dumps({"seen": self.seen}))
        return lines
