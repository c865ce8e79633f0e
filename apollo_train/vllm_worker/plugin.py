"""vLLM general plugin (`vllm.general_plugins` entry point): runs once in every vLLM process.

It reassigns nothing of vLLM's. It
- gives the server a private run dir (sockets, handles) that every vLLM process and the training
  worker inherit through the environment, and refuses one that another user could tamper with;
- on CPU, asks Linux for AMX permission (vLLM's CPU attention kernels use AMX);
- registers our model loader (loader.py) under its load formats, which `apollo-train serve` selects.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from apollo_train.shared.config import RUN_DIR_ENV
from apollo_train.shared.cpu import enable_amx

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    if RUN_DIR_ENV in os.environ:
        check_private_dir(Path(os.environ[RUN_DIR_ENV]), create=True)
    else:  # every vLLM process registers; the first one's dir is inherited by the others
        os.environ[RUN_DIR_ENV] = tempfile.mkdtemp(prefix="apollo-train-run-")
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        enable_amx()
    import apollo_train.vllm_worker.loader  # noqa: F401  (registers the load formats)


def check_private_dir(path: Path, create: bool = False) -> None:
    """A directory only this user can change: owned by us, not a symlink, not writable by others.
    Sockets and handles in it are trusted by both processes."""
    if create and not os.path.lexists(path):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"{RUN_DIR_ENV}={path} is not a directory (a symlink or a file); give a private directory")
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(
            f"{RUN_DIR_ENV}={path} is owned by another user or writable by others; the training worker trusts "
            f"the sockets and weight handles in it, so give a directory only you can write (chmod 700)"
        )
