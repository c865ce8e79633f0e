"""Files both processes write: a small file no reader or crash meets half of, and the sweep of
directories whose owner died.

`write_atomically`: the data goes to a temp file beside the target (same directory, so the rename
cannot cross filesystems), is fsynced, and replaces the target with one rename; the directory is
fsynced too, so the rename itself survives a crash. Used for the handles file, the supervisor's
status file and the journals' compaction; whole directories (checkpoints) have their own
(worker/checkpoint.py).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_unlocked(dirs: Iterable[Path], lock_name: str) -> None:
    """Remove the directories among `dirs` whose lock file `lock_name` nobody holds: the process that
    made them (and held the lock while it lived) is gone. A lock, unlike a PID, is right across PID
    namespaces. A directory without that lock file, a symlink or another user's is left alone."""
    for d in dirs:
        try:
            if d.is_symlink() or d.lstat().st_uid != os.getuid():
                continue  # not ours to judge
            fd = os.open(d / lock_name, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # being created (or swapped in), or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its owner is alive
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
