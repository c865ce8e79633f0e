"""A Hugging Face model directory's files, read and mirrored without torch (the front desk lists and checks
checkpoints; worker/checkpoint.py writes them).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SKIP_DIRS = (".git", ".cache")  # version-control and cache folders: never copied with a model


EXPERT_STACKS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def as_checkpoint_tensors(tensors: dict, weight_map: dict[str, str]) -> dict:
    """`tensors` (a transformers state dict) named as the checkpoint names them: a mixture of experts' fused
    stacks (`...experts.gate_up_proj` [experts, 2 x intermediate, hidden], `...experts.down_proj`) become one
    tensor per expert and projection (`...experts.3.gate_proj.weight`), as checkpoints on the hub store
    them and vLLM loads them, wherever the checkpoint holds them so. The parts are views, not copies."""
    out = {}
    for name, t in tensors.items():
        prefix, _, stack = name.rpartition(".")
        parts = EXPERT_STACKS.get(stack) if prefix.endswith("experts") and t.ndim == 3 else None
        if parts is None or name in weight_map or f"{prefix}.0.{parts[0]}.weight" not in weight_map:
            out[name] = t
            continue
        for e in range(t.shape[0]):
            for part, piece in zip(parts, t[e].chunk(len(parts), dim=0)):
                out[f"{prefix}.{e}.{part}.weight"] = piece
    return out


def read_weight_map(source: Path) -> tuple[dict[str, str], dict | None]:
    """The safetensors file of every tensor of a model directory, and its index (None when the
    directory has a single file or no safetensors at all)."""
    if (source / INDEX_NAME).is_file():
        index = json.loads((source / INDEX_NAME).read_text())
        return dict(index["weight_map"]), index
    if (source / SINGLE_NAME).is_file():
        with open(source / SINGLE_NAME, "rb") as f:  # the format: an 8-byte header length, a JSON header
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        return {name: SINGLE_NAME for name in header if name != "__metadata__"}, None
    return {}, None


def mirror_tree(source: Path, dest: Path, skip: Callable[[str, bool], bool] = lambda rel, is_dir: False, *,
                link: bool = True, keep_symlinks: bool = False, rel: str = "") -> None:
    """Recreate directory `source` inside the existing `dest`: files hard-linked (`link`; copied where a
    link is refused) or copied, symlinks kept as symlinks (`keep_symlinks`) or followed;
    `skip(relative path, is_dir)` leaves an entry out."""
    for entry in sorted(source.iterdir()):
        name, target = f"{rel}{entry.name}", dest / entry.name
        is_dir = entry.is_dir()  # follows symlinks
        if skip(name, is_dir):
            continue
        if keep_symlinks and entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif is_dir:
            target.mkdir(exist_ok=True)
            mirror_tree(entry, target, skip, link=link, keep_symlinks=keep_symlinks, rel=name + "/")
        elif entry.is_file():
            try:
                if not link:
                    raise OSError("copy asked for")
                os.link(entry, target, follow_symlinks=True)
            except OSError:
                shutil.copy2(entry, target)  # follows symlinks: a real copy


