"""Where a checkpoint may be written: a request can only create or replace what this server owns.

`POST /checkpoint` without a path syncs the served model's own directory (the seed's in-place
sync); with a path, it writes a copy under the checkpoint root (`--train-checkpoint-root`). A path
is relative to the root, or absolute inside it; `..`, `~`, NUL, a symlink in any component below
the root, or anything outside it is refused before anything is created. An existing directory is
replaced only if it is empty or a checkpoint of ours (its stamp says so). The root keeps the newest
`--train-keep-checkpoints` copies. The first in-place sync over weights this software did not write
first keeps them, once, under the root: the original model is never lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path, PurePosixPath

from apollo_train.shared.protocol import BadRequest, Conflict, Forbidden, NotFound
from worker.model_dir import SKIP_DIRS, mirror_tree, read_weight_map

log = logging.getLogger("apollo_train.worker")
STAMP = "apollo_train_checkpoint.json"  # in every model directory we wrote: which training state is its
ORIGINAL_STAMP = "apollo_train_original.json"  # in the copy of the weights the first in-place sync replaced


@dataclasses.dataclass(frozen=True)
class Target:
    path: Path
    in_place: bool  # the served model's own directory


def read_stamp(model_dir: Path) -> dict | None:
    try:
        stamp = json.loads((model_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and isinstance(stamp.get("id"), str) else None


def resolve(path: str | None, root: Path, model_dir: Path) -> Target:
    """The directory a checkpoint request writes, or the 4xx refusing it."""
    if path is None:
        if _in_hub_cache(model_dir):
            raise BadRequest(f"the served model is a snapshot in the Hugging Face cache ({model_dir}), which is not "
                             f"written in place; pass a path to write a copy under the checkpoint root {root}")
        return Target(model_dir, in_place=True)
    if "\x00" in path:
        raise BadRequest("'path' contains a NUL character")
    if path.startswith("~"):
        raise BadRequest(f"'path' {path!r}: '~' is not expanded; give a path relative to the checkpoint root {root}")
    pure = PurePosixPath(path)
    if ".." in pure.parts:
        raise BadRequest(f"'path' {path!r} contains '..'; give a path relative to the checkpoint root {root}")
    if pure.is_absolute():
        try:
            pure = pure.relative_to(root)
        except ValueError:
            raise Forbidden(f"'path' {path} is outside the checkpoint root {root}; checkpoints are written only "
                            f"under it (give a relative path, or start the server with --train-checkpoint-root)"
                            ) from None
    if not pure.parts or pure == PurePosixPath("."):
        raise BadRequest(f"'path' {path!r} names the checkpoint root itself; name a directory under it")
    current = root
    for part in pure.parts:
        current = current / part
        if current.is_symlink():
            raise Forbidden(f"'path' {path}: {current} is a symlink; checkpoints are not written through symlinks")
        if not current.exists():
            break
    target = root / pure
    if target.exists():
        if not target.is_dir():
            raise Conflict(f"'path' {path}: {target} exists and is not a directory")
        if any(target.iterdir()) and read_stamp(target) is None:
            raise Conflict(f"'path' {path}: {target} exists and is not a checkpoint this server wrote; it is left "
                           f"untouched (choose another path)")
    if target == model_dir or model_dir in target.parents or target in model_dir.parents:
        raise Conflict(f"'path' {path}: {target} and the served model's directory must not contain each other")
    return Target(target, in_place=False)


def checkpoints_under(root: Path) -> list[tuple[Path, dict]]:
    """Every checkpoint copy under the root with its stamp, oldest first."""
    found = []
    if root.is_dir():
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            stamp = read_stamp(here) if here != root else None
            if stamp is not None:
                found.append((here, stamp))
                dirnames.clear()  # a checkpoint's own subfolders are not checkpoints
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=lambda item: item[1].get("time", 0))


def listing(root: Path, model_dir: Path) -> list[dict]:
    """The checkpoints a server can restore: the copies under the root and the served directory's own
    (named "served"), oldest first."""
    found = checkpoints_under(root)
    served = read_stamp(model_dir)
    if served is not None:
        found.append((model_dir, served))
    out = []
    for path, stamp in sorted(found, key=lambda item: item[1].get("time", 0)):
        name = "served" if path == model_dir else str(path.relative_to(root))
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        out.append({"id": stamp["id"], "name": name, "path": str(path), "step": stamp.get("step"),
                    "time": stamp.get("time"), "bytes": size})
    return out


def find(checkpoint: str, root: Path, model_dir: Path) -> Path:
    """A checkpoint's directory by id or by name (as `listing` gives them); NotFound otherwise."""
    for entry in listing(root, model_dir):
        if checkpoint in (entry["id"], entry["name"]):
            return Path(entry["path"])
    raise NotFound(f"no checkpoint {checkpoint!r} under {root} or in the served directory "
                   f"(GET /checkpoints lists them)")


def prune(root: Path, keep: int) -> list[dict]:
    """Remove the oldest copies beyond `keep`; returns their stamps (their training states go too)."""
    copies = checkpoints_under(root)
    removed = copies[: max(0, len(copies) - keep)]
    for path, _ in removed:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed checkpoint %s (--train-keep-checkpoints %d)", path, keep)
    return [stamp for _, stamp in removed]


def keep_original(model_dir: Path, root: Path) -> Path | None:
    """Before the first in-place sync over weights we did not write: hard-link (or copy) the model
    directory under the root, once. Returns where, or None when nothing needed keeping."""
    if read_stamp(model_dir) is not None:
        return None  # the weights there are ours already
    keep = root / f"original-{model_dir.name}"
    if (keep / ORIGINAL_STAMP).exists():
        return None
    weight_map, index = read_weight_map(model_dir)
    if not weight_map:
        return None
    partial = root / f".{keep.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, mode=0o700)
    mirror_tree(model_dir, partial, skip=lambda rel, is_dir: is_dir and Path(rel).name in SKIP_DIRS)
    (partial / ORIGINAL_STAMP).write_text(json.dumps({"source": str(model_dir)}) + "\n")
    os.rename(partial, keep)
    log.info("kept the original weights of %s in %s before the first in-place checkpoint", model_dir, keep)
    return keep


def _in_hub_cache(path: Path) -> bool:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return False
    cache = Path(HF_HUB_CACHE).resolve()
    return cache in path.resolve().parents
