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


