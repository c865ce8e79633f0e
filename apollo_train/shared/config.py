"""Settings shared by the router and the training worker, read once from the environment.

Each field is one server option with one name: `apollo-train serve --train-<field>` sets the
environment variable `APOLLO_TRAIN_<FIELD>`, so a plain `vllm serve` with VLLM_PLUGINS set is
configured the same way. The router resolves the settings (the state dir and checkpoint root
depend on the served model) and hands the worker the result as JSON, so both processes agree.
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
# The load formats our model loader is registered under (`--load-format`), and vLLM's names for
# what they replace: the checkpoint on disk, or random weights of the checkpoint's shapes.
LOAD_FORMAT = "apollo_train"
LOAD_FORMAT_RANDOM = "apollo_train_dummy"
WORKER_EXTENSION = "apollo_train.vllm_worker.extension.TrainingWorkerExtension"

# Where one server's sockets and weight handles live; set by the plugin in the API server
# process before vLLM starts its engine, so every vLLM process and the worker inherit it.
RUN_DIR_ENV = "APOLLO_TRAIN_RUN_DIR"
ENV_PREFIX = "APOLLO_TRAIN_"

# The best of a sweep teaching facts one job at a time (docs/learning-quality.md); lower them
# for large models or long jobs.
OPTIMIZERS = ("apollo", "apollo-mini", "adamw")
DEFAULT_LR = {"apollo": 3e-4, "apollo-mini": 3e-4, "adamw": 1e-4}
MiB = 1 << 20


def _option(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Settings:
    optimizer: str = _option("apollo", f"optimizer: {', '.join(OPTIMIZERS)}")
    lr: float | None = _option(None, "learning rate (default: the optimizer's, see docs/api.md)")
    max_lr: float = _option(1e-2, "largest learning rate a request may ask for")
    max_tokens_per_step: int = _option(4096, "padded tokens per optimizer step")
    queue_size: int = _option(16, "training and checkpoint jobs waiting at most")
    max_request_bytes: int = _option(16 * MiB, "largest request body on the training routes")
    max_examples_per_request: int = _option(1024, "examples one /train request may hold")
    max_job_tokens: int = _option(2_000_000, "tokens x epochs one /train job may train")
    busy_share: float = _option(0.25, "share of the GPU's time training may take while vLLM has requests in "
                                "flight (1: no limit; an idle server always trains at full speed)")
    barrier: bool = _option(False, "pause generation while each optimizer step writes the weights, instead of "
                            "HOGWILD (the step then comes after the backward pass, gradients kept)")
    freeze_embeddings: bool = _option(False, "train neither the input embeddings nor the output head")
    step_in_backward: bool = _option(True, "step each parameter as soon as its gradient is complete")
    activation_checkpointing: bool = _option(True, "recompute decoder layers in the backward pass")
    replay_size: int = _option(1024, "trained examples the replay buffer keeps (0: none)")
    replay_ratio: float = _option(1.0, "replayed examples per new example in each step (0: no replay)")
    eval_file: str | None = _option(None, "held-out text or chats (JSONL) whose loss is measured after each job")
    max_eval_loss_rise: float | None = _option(None, "undo a job that raises the eval loss by more than this (nats)")
    allow_remote: bool = _option(False, "accept training requests from other hosts without an API key")
    state_dir: str | None = _option(None, "optimizer state and registry (default: per model, see docs)")
    checkpoint_root: str | None = _option(None, "where /checkpoint copies go (default: STATE_DIR/checkpoints)")
    keep_checkpoints: int = _option(3, "copies the checkpoint root keeps (oldest removed first)")

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not 0 < self.max_lr < float("inf"):
            raise ValueError(f"max_lr must be a positive number, got {self.max_lr}")
        if self.lr is not None and not 0 < self.lr <= self.max_lr:
            raise ValueError(f"lr must be positive and at most max_lr ({self.max_lr:g}), got {self.lr}")
        for name in ("max_tokens_per_step", "queue_size", "max_request_bytes", "max_examples_per_request",
                     "max_job_tokens", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.busy_share <= 1:
            raise ValueError(f"busy_share must be in (0, 1], got {self.busy_share}")
        if self.replay_size < 0 or not 0 <= self.replay_ratio < float("inf"):
            raise ValueError(f"replay_size and replay_ratio must be at least 0, got {self.replay_size} and "
                             f"{self.replay_ratio}")
        if self.max_eval_loss_rise is not None and not (self.eval_file and self.max_eval_loss_rise > 0):
            raise ValueError("max_eval_loss_rise needs an eval_file and must be positive")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @staticmethod
    def env_name(field: str) -> str:
        return ENV_PREFIX + field.upper()

    @staticmethod
    def flag(field: str) -> str:
        return "--train-" + field.replace("_", "-")

    @classmethod
    def from_env(cls, environ=os.environ) -> "Settings":
        kwargs = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(cls.env_name(field.name))
            if raw is None or raw == "":
                continue
            try:
                kwargs[field.name] = parse(field, raw)
            except ValueError:
                raise ValueError(f"{cls.env_name(field.name)}={raw!r} is not a valid {field.name}") from None
        return cls(**kwargs)

    def resolved(self, model_dir: str | os.PathLike) -> "Settings":
        """These settings with the per-model defaults (state dir, checkpoint root) filled in."""
        state = Path(self.state_dir or default_state_dir(model_dir)).expanduser().resolve()
        root = Path(self.checkpoint_root).expanduser().resolve() if self.checkpoint_root else state / "checkpoints"
        return dataclasses.replace(self, state_dir=str(state), checkpoint_root=str(root))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        return cls(**json.loads(text))


def parse(field: dataclasses.Field, raw: str):
    """A field's value from its environment-variable text."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "bool":
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(raw)
        return raw.lower() in ("1", "true", "yes", "on")
    if kind.startswith("float"):
        return float(raw)
    if kind == "int":
        return int(raw)
    return raw


def default_state_dir(model_dir: str | os.PathLike) -> Path:
    """Per-model state (optimizer, dedupe registry, checkpoint copies) outside the model dir,
    which may be read-only."""
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "apollo-train"
    resolved = str(Path(model_dir).expanduser().resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:10]
    return base / f"{Path(resolved).name}-{digest}"


def resolve_model_dir(model: str) -> Path:
    """The local directory of a served model: a path, or a model id's snapshot in the Hugging Face
    cache (no download: the server has loaded it already)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True)).resolve()
    except Exception as exc:
        raise ValueError(
            f"model {model!r} is neither a directory nor a model in the local Hugging Face cache ({exc}); "
            f"serve a local model directory to train it"
        ) from None
