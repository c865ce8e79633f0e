"""The training API's requests, defined once: the router validates HTTP bodies with these models,
the worker validates what reaches it over the wire with them again, and `apollo-train train`
reads its JSONL lines with `Example`. Strict: unknown keys, wrong types and out-of-range values
are refused with a message naming the field, never coerced or dropped.

Limits that depend on the server's settings (examples per request, the largest lr) are checked
by `TrainRequest.check_limits`; the body size is bounded before any of this runs (api/access.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from apollo_train.shared.protocol import BadRequest

MAX_MESSAGES = 1024  # per example
MAX_EPOCHS = 1000
MAX_PATH = 4096


def _unicode(text: str) -> str:
    """JSON may carry lone surrogates (\\ud800), which no tokenizer or wire can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode; it holds a lone surrogate") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text


class Example(_Strict):
    """An OpenAI-style chat; its last message, the assistant's, is the answer trained on."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    strip: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list,
        max_length=MAX_MESSAGES,
        description="indices of context messages to remove before tokenizing (context distillation)",
    )

    @model_validator(mode="after")
    def _answer_and_strip(self) -> "Example":
        last = self.messages[-1]
        if last.role != "assistant":
            raise ValueError(f"the last message must be from the assistant (it is {last.role!r}): "
                             f"it is the answer to train on")
        if not last.content.strip():
            raise ValueError("the last (assistant) message is empty; it is the answer to train on")
        context = len(self.messages) - 1
        for i in self.strip:
            if i >= context:
                allowed = f"0 to {context - 1}" if context else "none: this example has no context"
                raise ValueError(f"strip index {i} is out of range; it must name a message before the last "
                                 f"one ({allowed})")
        if len(set(self.strip)) != len(self.strip):
            raise ValueError("strip lists an index twice")
        return self

    def chat(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.messages]


class EvalText(_Strict):
    """A line of the drift guard's eval file that is plain text: its loss covers every token."""

    text: Text = Field(min_length=1)


class TrainRequest(_Strict):
    examples: list[Example] = Field(min_length=1)
    epochs: int = Field(1, ge=1, le=MAX_EPOCHS, description="passes over the examples")
    lr: float | None = Field(None, gt=0, allow_inf_nan=False,
                             description="learning rate for this job (default: the server's)")
    force: bool = Field(False, description="train examples already trained before")
    wait: bool = Field(False, description="answer when the job has finished")

    def check_limits(self, settings) -> None:
        if len(self.examples) > settings.max_examples_per_request:
            raise BadRequest(f"{len(self.examples)} examples in one request, more than the limit of "
                             f"{settings.max_examples_per_request} (--train-max-examples-per-request); "
                             f"send them in several requests")
        if self.lr is not None and self.lr > settings.max_lr:
            raise BadRequest(f"lr {self.lr:g} is above the server's limit of {settings.max_lr:g} "
                             f"(--train-max-lr)")


class CheckpointRequest(_Strict):
    path: Text | None = Field(
        None, min_length=1, max_length=MAX_PATH,
        description="directory for a complete model copy: relative to the checkpoint root, or an absolute path "
                    "inside it (default: the served model's own directory)",
    )
    wait: bool = Field(False, description="answer when the checkpoint is written")


class SettingsRequest(_Strict):
    """Settings an operator may change while the server runs (until it restarts): how training shares the
    GPU with serving, and how a step writes the weights. Each takes effect from the next step or job."""

    busy_share: float | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                     description="share of the GPU's time training may take while vLLM has "
                                                 "requests in flight (1: no limit)")
    barrier: bool | None = Field(None, description="pause generation while each step writes the weights")
    step_in_backward: bool | None = Field(None, description="step each layer inside the backward pass")


class CancelRequest(_Strict):
    job_id: Text = Field(min_length=1, max_length=64)


class RestoreRequest(_Strict):
    checkpoint: Text = Field(
        min_length=1, max_length=MAX_PATH,
        description="a checkpoint's id, or its name under the checkpoint root, as GET /checkpoints lists them "
                    "('served' for the served model's own directory)",
    )
    wait: bool = Field(False, description="answer when the weights are restored")


def jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, value) for each non-blank line of a JSONL file, `where` naming the file and line;
    BadRequest naming the line for one that is not UTF-8 JSON."""
    path = Path(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if raw.strip():
                where = f"{path.name} line {n}"
                try:
                    yield where, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise BadRequest(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
                except ValueError as exc:
                    raise BadRequest(f"{where}: not valid JSON ({exc})") from None


def parse(model: type[_Strict], data, where: str = "request"):
    """Validate `data` (a dict) with `model`; BadRequest naming each bad field otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(f"{where}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """Pydantic's errors as `examples[0].messages[1].role: Input should be ...`, one per error."""
    return describe_errors(exc.errors(include_url=False))


def describe_errors(errors: list[dict]) -> str:
    """`describe` for a list of pydantic error dicts (FastAPI's carry a leading "body" in `loc`)."""
    parts = []
    for err in errors[:5]:
        loc, message = list(err["loc"]), err["msg"].removeprefix("Value error, ")
        if loc[:1] == ["body"]:
            loc = loc[1:]
        if err["type"] == "extra_forbidden":
            message = f"unknown key {loc.pop()!r}"
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        parts.append(f"{where}: {message}" if where else message)
    more = len(errors) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
