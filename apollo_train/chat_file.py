"""Chat examples from a JSONL file, one POST /train example per line (the file `apollo-train train`
reads), checked with the server's own schema before anything is sent, and cut into requests well
inside the server's limits so that a large file never meets a 400 or a 413 halfway through.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from apollo_train.shared.schema import Example, describe

# Well under the server's defaults (1024 examples, 16 MiB per request): a server with lower limits
# takes --batch-size.
BATCH_EXAMPLES = 256
BATCH_BYTES = 4 * 2**20


class DataError(ValueError):
    """The data file is unusable; the message names the file and the line."""


def read_examples(path: Path, default_strip: list[int] | None = None) -> list[dict]:
    """Every example of the file as the JSON POST /train takes; `default_strip` goes to those that carry
    no `strip` of their own. DataError names the first bad line."""
    examples = []
    try:
        with open(path, "rb") as f:  # bytes: invalid UTF-8 is a bad line, not a crash
            for n, line in enumerate(f, start=1):
                if line.strip():
                    examples.append(_example(line, default_strip, where=f"{path.name} line {n}"))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if not examples:
        raise DataError(f"{path.name}: no examples (the file is empty)")
    return examples


def _example(line: bytes, default_strip: list[int] | None, where: str) -> dict:
    try:
        example = Example.model_validate_json(line)
    except ValidationError as exc:
        raise DataError(f"{where}: {describe(exc)}") from None
    if default_strip and "strip" not in example.model_fields_set:
        try:
            example = Example.model_validate({**example.model_dump(), "strip": default_strip})
        except ValidationError as exc:
            raise DataError(f"{where}: {describe(exc)} (--strip applies to every example without a strip "
                            f"of its own; give this one its own \"strip\")") from None
    return example.model_dump()


def batches(examples: list[dict], max_examples: int = BATCH_EXAMPLES, max_bytes: int = BATCH_BYTES) -> list[list[dict]]:
    """Consecutive runs of the examples, each at most `max_examples` long and `max_bytes` of JSON (an example
    larger than that alone is a batch of its own: the server says whether it takes it)."""
    out, batch, size = [], [], 0
    for example in examples:
        n = len(json.dumps(example).encode()) + 2  # and its separator
        if batch and (len(batch) == max_examples or size + n > max_bytes):
            out.append(batch)
            batch, size = [], 0
        batch.append(example)
        size += n
    if batch:
        out.append(batch)
    return out
