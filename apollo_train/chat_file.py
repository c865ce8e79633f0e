"""Chat examples from a JSONL file, one POST /train example per line (the file `apollo-train train`
reads), checked with the server's own schema before anything is sent, and cut into requests well
inside the server's limits so that a large file never meets a 400 or a 413 halfway through.
"""

from __future__ import annotations

import json
from pathlib import Path

from apollo_train.shared.protocol import BadRequest
from apollo_train.shared.schema import Example, jsonl, parse

# Well under the server's defaults (1024 examples, 16 MiB per request): a server with lower limits
# takes --batch-size.
BATCH_EXAMPLES = 256
BATCH_BYTES = 4 * 2**20


class DataError(ValueError):
    """The data file is unusable; the message names the file and the line."""


def read_examples(path: Path, default_strip: list[int] | None = None) -> list[dict]:
    """Every example of the file as the JSON POST /train takes; `default_strip` goes to those that carry
    no `strip` of their own. DataError names the first bad line."""
    try:
        examples = [_example(value, default_strip, where) for where, value in jsonl(path)]
    except BadRequest as exc:
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if not examples:
        raise DataError(f"{path.name}: no examples (the file is empty)")
    return examples


def _example(value, default_strip: list[int] | None, where: str) -> dict:
    example = parse(Example, value, where)
    if default_strip and "strip" not in example.model_fields_set:
        try:
            example = parse(Example, {**example.model_dump(), "strip": default_strip}, where)
        except BadRequest as exc:
            raise DataError(f"{exc} (--strip applies to every example without a strip of its own; give this "
                            f"one its own \"strip\")") from None
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
