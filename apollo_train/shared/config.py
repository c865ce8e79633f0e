"""Settings shared by the router and the training worker, read once from the environment.

`apollo-train serve` turns its `--train-*` flags into these variables, so a plain
`vllm serve` with VLLM_PLUGINS set is configured the same way. The router resolves them and
hands the worker the result as JSON, so both processes agree on one set of values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

# Names vLLM knows our entry points by (pyproject.toml declares them); VLLM_PLUGINS lists both.
GENERAL_PLUGIN = "apollo_train"
ENDPOINT_PLUGIN = "apollo_train_router"
PLUGIN_NAMES = f"{GENERAL_PLUGIN},{ENDPOINT_PLUGIN}"

# Where one server's sockets and weight handles live; set by the plugin in the API server
# process before vLLM starts its engine, so every vLLM process and the worker inherit it.
RUN_DIR_ENV = "APOLLO_TRAIN_RUN_DIR"

# The best of a sweep teaching facts one job at a time (docs/learning-quality.md); lower them
# for large models or long jobs.
OPTIMIZERS = ("apollo", "apollo-mini", "adamw")
DEFAULT_LR = {"apollo": 3e-4, "apollo-mini": 3e-4, "adamw": 1e-4}


def default_state_dir(model_path: str) -> Path:
    """Per-model state (optimizer, dedupe registry) outside the model dir, which may be read-only."""
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "apollo-train"
    resolved = str(Path(model_path).expanduser().resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:10]
    return base / f"{Path(resolved).name}-{digest}"


@dataclasses.dataclass(frozen=True)
class Settings:
    optimizer: str = "apollo"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    max_tokens_per_step: int = 4096
    queue_size: int = 16
    barrier: bool = False  # pause generation around each optimizer step instead of HOGWILD
    freeze_embeddings: bool = False  # train neither the input embeddings nor the output head
    state_dir: str | None = None  # None: default_state_dir(model path)

    ENV = {
        "optimizer": "APOLLO_TRAIN_OPTIMIZER",
        "lr": "APOLLO_TRAIN_LR",
        "max_tokens_per_step": "APOLLO_TRAIN_MAX_TOKENS_PER_STEP",
        "queue_size": "APOLLO_TRAIN_QUEUE_SIZE",
        "barrier": "APOLLO_TRAIN_BARRIER",
        "freeze_embeddings": "APOLLO_TRAIN_FREEZE_EMBEDDINGS",
        "state_dir": "APOLLO_TRAIN_STATE_DIR",
    }

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_tokens_per_step < 1 or self.queue_size < 1:
            raise ValueError("max_tokens_per_step and queue_size must be at least 1")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @classmethod
    def from_env(cls, environ=os.environ) -> "Settings":
        kwargs = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(cls.ENV[field.name])
            if raw is None or raw == "":
                continue
            try:
                kwargs[field.name] = _parse(field.name, raw)
            except ValueError:
                raise ValueError(f"{cls.ENV[field.name]}={raw!r} is not a valid {field.name}") from None
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        return cls(**json.loads(text))


def _parse(name: str, raw: str):
    if name in ("barrier", "freeze_embeddings"):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(raw)
        return raw.lower() in ("1", "true", "yes", "on")
    if name == "lr":
        return float(raw)
    if name in ("max_tokens_per_step", "queue_size"):
        return int(raw)
    return raw
