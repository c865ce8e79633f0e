"""Checkpoints of the served model and of the training state, and restoring them at start-up.

A checkpoint has two parts written by one call:
- the weights, as a complete HF model directory (the served model's own directory, keeping its file
  names and shard split, or a copy under the checkpoint root; see checkpoint_target.py), stamped
  with `apollo_train_checkpoint.json`;
- the training state in `<state dir>/<checkpoint id>/`: `optimizer.pt` (plain tensors, keyed
  by parameter name, each matrix's state as one rank holds it), `registry.txt` (dedupe keys),
  `replay.jsonl` (the replay buffer) and `meta.json` (counters).
The state is written first, the weights last: the stamp in the weights names the state that
belongs to them, so a crash between the two leaves the previous pair in use. Once the new weights
are in place, the states of earlier checkpoints into the same directory are removed; those of
copies written elsewhere (`path`) stay, since those copies still name them.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors import safe_open

from apollo_train.shared.expert_stacks import as_checkpoint_tensors
from apollo_train.shared.protocol import Conflict
from worker import checkpoint_target
from worker.checkpoint import snapshot, write_files_atomically, write_model_dir
from worker.checkpoint_target import STAMP, Target, read_stamp
from worker.model_dir import read_weight_map
from worker.registry import format_keys

log = logging.getLogger("apollo_train.worker")


class StateMismatch(ValueError):
    """Saved optimizer state that does not belong to this model."""


def _layout(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[str], list[list[int]]]:
    """The names of the optimizer's parameters, in its order, and the shapes of the matrices their state
    describes (whole matrices also for tensor-parallel shards: the state restores at any TP size)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    shape = getattr(optimizer, "state_shape", lambda p: p.shape)  # Apollo's; any torch optimizer's: p's own
    return [names[id(p)] for p in params], [list(shape(p)) for p in params]


def optimizer_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bytes:
    """Serialize now (the live tensors keep changing), keyed by parameter name."""
    order, shapes = _layout(model, optimizer)
    buf = io.BytesIO()
    torch.save({"names": order, "shapes": shapes, "state": optimizer.state_dict()}, buf)
    return buf.getvalue()


def load_optimizer(model, optimizer, path: Path) -> None:
    optimizer.load_state_dict(read_optimizer(model, optimizer, path))


def read_optimizer(model, optimizer, path: Path) -> dict:
    """A saved optimizer state, checked to belong to this model and optimizer (StateMismatch otherwise)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    order, shapes = _layout(model, optimizer)
    if saved["names"] != order or saved["shapes"] != shapes:
        missing = sorted(set(order) - set(saved["names"]))[:5]
        raise StateMismatch(
            f"optimizer state {path} was saved for other parameters or another optimizer "
            f"({len(saved['names'])} saved, {len(order)} here"
            + (f", missing e.g. {missing}" if missing else ", shapes or order differ")
            + "), so it is not used; delete it or set APOLLO_TRAIN_STATE_DIR to another directory"
        )
    groups = saved["state"]["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            set(g) != set(h) for g, h in zip(groups, optimizer.param_groups)):
        raise StateMismatch(f"optimizer state {path} was saved by another optimizer (its options differ), so it is "
                            f"not used; training starts with fresh moments")
    return saved["state"]


def save(
    *,
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer,
    registry_keys: list[str],
    replay: bytes,
    counters: dict,
    model_path: str,
    state_dir: Path,
    target: Target,
    root: Path,
    keep: int,
    progress=None,
    should_stop=None,
):
    """Snapshot now (call between steps), then return a function that writes everything;
    the caller runs it in the background while training goes on. `weights`: the whole model's state dict
    already in host memory (tensor parallelism), or None to snapshot `model`'s. `should_stop()` True
    abandons the write (checkpoint.Abandoned), leaving the previous checkpoint as it was."""
    ckpt_id = uuid.uuid4().hex[:12]
    if weights is None:
        weights = snapshot(model.state_dict())
    opt_bytes = optimizer_payload(model, optimizer)
    target_dir = str(target.path)
    meta = {"id": ckpt_id, "time": time.time(), "model_path": model_path, "target": target_dir, **counters}

    def write() -> dict:
        if target.in_place:
            checkpoint_target.keep_original(target.path, root)
        state = write_files_atomically(
            state_dir / ckpt_id,
            {
                "optimizer.pt": opt_bytes,
                "registry.txt": format_keys(registry_keys).encode(),
                "replay.jsonl": replay,
                "meta.json": json.dumps(meta, indent=1).encode(),
            },
        )
        stamp = {"id": ckpt_id, "state_dir": str(state_dir.resolve()), **{k: meta[k] for k in ("time", "step")}}
        try:
            info = write_model_dir(
                weights,
                source_dir=model_path,
                target_dir=target_dir,
                extra_files={STAMP: json.dumps(stamp, indent=1).encode()},
                progress=progress,
                should_stop=should_stop,
            )
        except BaseException:
            shutil.rmtree(state_dir / ckpt_id, ignore_errors=True)  # no weights name it
            raise
        _prune(state_dir, keep=ckpt_id, target=target_dir)
        if not target.in_place:
            for stamp in checkpoint_target.prune(root, keep):
                shutil.rmtree(state_dir / stamp["id"], ignore_errors=True)
        return {**meta, "path": info["path"], "bytes": info["bytes"] + state["bytes"]}

    return ckpt_id, write


def _prune(state_dir: Path, keep: str, target: str) -> None:
    """Remove the states of earlier checkpoints into ``target``: its stamp now names ``keep``."""
    for gen in state_dir.iterdir():
        if gen.name == keep or gen.name.startswith(".") or not gen.is_dir():
            continue
        try:
            written_to = json.loads((gen / "meta.json").read_text()).get("target")
        except (OSError, ValueError):
            continue
        if written_to == target:
            shutil.rmtree(gen, ignore_errors=True)


def restore(model, optimizer, registry, replay, model_path: str, state_dir: Path) -> tuple[dict, str | None]:
    """At start: load the training state that belongs to the served weights, if any (the run dir's
    journals, which a restarted worker finds, come on top). Returns (counters, warning)."""
    stamp = read_stamp(Path(model_path))
    if stamp is None:
        return {}, None
    gen = _state_of(stamp, state_dir)
    if not gen.is_dir():
        return {}, f"training state {gen} named by {Path(model_path) / STAMP} is missing; starting fresh"
    try:
        load_optimizer(model, optimizer, gen / "optimizer.pt")
    except StateMismatch as exc:
        return {}, str(exc)
    registry.load(gen / "registry.txt")
    if len(replay) == 0 and (gen / "replay.jsonl").exists():
        replay.replace((gen / "replay.jsonl").read_bytes())
    meta = json.loads((gen / "meta.json").read_text())
    log.info("restored training state %s (step %s)", gen, meta.get("step"))
    return _counters(meta), None


def restore_live(*, model, optimizer, registry, replay, checkpoint_dir: Path, state_dir: Path, writing,
                 boxes=None) -> dict:
    """Make a checkpoint the served model again, without a restart: its weights written into the served
    tensors in place (inside `writing()`, the step hooks), its optimizer state, registry, replay buffer
    and counters. Everything is checked first: a checkpoint of another model or layout, or one whose
    training state is gone, is refused (Conflict) with nothing changed. With `boxes` (a tensor-parallel
    rank's, by name) each parameter gets its box of the checkpoint's tensor. Returns its counters."""
    stamp = read_stamp(checkpoint_dir)
    if stamp is None:
        raise Conflict(f"{checkpoint_dir} is not a checkpoint written by apollo-train")
    gen = _state_of(stamp, state_dir)
    if not gen.is_dir():
        raise Conflict(f"the training state {gen} of checkpoint {stamp['id']} is missing, so it cannot be restored")
    weight_map, _ = read_weight_map(checkpoint_dir)
    # by the checkpoint's names: a mixture of experts' stacks as views of each expert's part
    params = as_checkpoint_tensors({n: p.detach() for n, p in model.named_parameters()}, weight_map)
    problems = [f"{n} (not in the checkpoint)" for n in params if n not in weight_map]
    if problems:
        raise Conflict(f"checkpoint {checkpoint_dir} is of another model or layout: {'; '.join(problems[:5])}")
    served = {n: list(boxes[n].full_shape if boxes else p.shape) for n, p in params.items()}
    for file, names in _by_file(weight_map, params).items():
        with safe_open(checkpoint_dir / file, framework="pt") as f:
            problems += [f"{n} (shape {f.get_slice(n).get_shape()}, served {served[n]})"
                         for n in names if list(f.get_slice(n).get_shape()) != served[n]]
    if problems:
        raise Conflict(f"checkpoint {checkpoint_dir} is of another model or layout: {'; '.join(problems[:5])}")
    try:
        state = read_optimizer(model, optimizer, gen / "optimizer.pt")
    except StateMismatch as exc:
        raise Conflict(str(exc)) from None
    with writing(), torch.no_grad():
        for file, names in _by_file(weight_map, params).items():
            with safe_open(checkpoint_dir / file, framework="pt") as f:
                for n in names:
                    params[n].copy_(f.get_slice(n)[boxes[n].index()] if boxes else f.get_tensor(n))
    optimizer.load_state_dict(state)
    registry.replace(gen / "registry.txt")
    replay.replace((gen / "replay.jsonl").read_bytes() if (gen / "replay.jsonl").exists() else b"")
    meta = json.loads((gen / "meta.json").read_text())
    log.info("restored checkpoint %s (step %s) into the served weights", checkpoint_dir, meta.get("step"))
    return _counters(meta)


def _state_of(stamp: dict, state_dir: Path) -> Path:
    return Path(stamp.get("state_dir") or state_dir) / stamp["id"]


def _counters(meta: dict) -> dict:
    return {k: meta[k] for k in ("step", "examples_trained", "tokens_trained", "input_tokens") if k in meta}


def _by_file(weight_map: dict[str, str], params: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in params:
        out.setdefault(weight_map[name], []).append(name)
    return out
