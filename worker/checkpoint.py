"""Checkpoints of the served weights: consistent, durable, atomic, and without stalling inference.

Two phases. `snapshot()` copies the weights to CPU memory between two optimizer steps, which
is quick and gives a consistent set; vLLM keeps serving from the live weights meanwhile.
`write_model_dir()` then writes that copy at leisure as a complete Hugging Face model directory.

Every directory is built next to its destination in a temp directory of ours (hidden, named
`.<target>.apollo-train-tmp-<random>`, holding a lock file while it is written), every file and
directory in it is fsynced, and only then is it swapped in with one atomic rename, or, when the
destination exists (e.g. syncing into the served model's own directory), with Linux's
`renameat2(RENAME_EXCHANGE)`, which swaps two directories in one step. A crash or an abandoned
write at any point leaves either the old directory or the new one, each complete. A later write
next to it removes temp directories whose lock nobody holds; nothing else near the target is ever
adopted or removed. Where renameat2 is unavailable (a filesystem without it) the swap falls back to
two renames with a short window without the destination; a crash inside it leaves the old copy as
`.<target>.apollo-train-old-<random>`, which is logged and left for the operator.

Writing into the served model's directory keeps every file that is not a weight file being
rewritten (README, .git, other weight formats...): they are hard-linked into the new directory.

The safetensors files are written here rather than with `safetensors.torch.save_file`, tensor
by tensor, so that progress is reported (and a write can be abandoned) while a large shard is
written; the format is an 8-byte header length, a JSON header, and the raw little-endian bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import glob
import json
import logging
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from apollo_train.shared.expert_stacks import as_checkpoint_tensors
from apollo_train.shared.files import fsync_dir, sweep_unlocked
from worker.model_dir import INDEX_NAME, SINGLE_NAME, SKIP_DIRS, mirror_tree, read_weight_map

log = logging.getLogger("apollo_train.worker")
TMP_MARK = ".apollo-train-tmp-"
OLD_MARK = ".apollo-train-old-"
WRITING_LOCK = ".apollo-train-writing"

# Files of a source directory that a copy elsewhere does not take: other serializations of the same
# (now stale) weights, and version-control or cache folders (SKIP_DIRS).
_WEIGHT_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "consolidated*.pth",
    "*.gguf",
)

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code

Progress = Callable[[int, int], None]


class Abandoned(RuntimeError):
    """The write was abandoned (the worker is shutting down); nothing was changed."""


# --------------------------------------------------------------------------- snapshot


def snapshot(named_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors to CPU memory (pinned when they are on a GPU, so the copies run at full
    speed), tensor by tensor. Call it between optimizer steps to get a consistent set.

    Names that are the same view of the same memory (tied weights) share one copy, so the
    writer can tell they are tied.
    """
    out: dict[str, torch.Tensor] = {}
    copies: dict[tuple, torch.Tensor] = {}
    devices = set()
    for name, t in named_tensors.items():
        t = t.detach()
        key = _view_key(t)
        if key is not None and key in copies:
            out[name] = copies[key]
            continue
        on_gpu = t.device.type == "cuda"
        dst = torch.empty(tuple(t.shape), dtype=t.dtype, device="cpu", pin_memory=on_gpu)
        dst.copy_(t, non_blocking=on_gpu)
        if on_gpu:
            devices.add(t.device)
        if key is not None:
            copies[key] = dst
        out[name] = dst
    for device in devices:
        torch.cuda.synchronize(device)
    return out


def _view_key(t: torch.Tensor) -> tuple | None:
    """Identifies a view of memory: equal for tied tensors, different for distinct slices."""
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


# --------------------------------------------------------------------------- model directories


def write_model_dir(
    snapshot: Mapping[str, torch.Tensor],
    *,
    source_dir: str | os.PathLike,
    target_dir: str | os.PathLike,
    extra_files: Mapping[str, bytes] | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Write a complete Hugging Face model directory with the weights in `snapshot`, atomically.

    Into `source_dir` itself, every file but the rewritten weight files is kept (hard links). Into
    another directory, everything but weights, `.git` and `.cache` is copied (config, tokenizer,
    generation config, processor configs, ...; symlinks become real files). The weights keep the source's
    safetensors file names, shard split and index: each tensor goes to the file it came from.
    A tensor the source does not have goes to the last shard, unless it is tied to one that is
    written (e.g. lm_head.weight with tie_word_embeddings), which the source saved only once.
    A source tensor missing from the snapshot is an error. `extra_files` (relative name ->
    bytes) are added last and win over copied files. `target_dir` may be `source_dir`.
    `should_stop()` is asked between tensors: True abandons the write (Abandoned), changing nothing.

    Returns {"path": target, "bytes": size of all files, "files": relative file names}.
    """
    source = Path(source_dir).resolve()
    target = Path(target_dir).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"source model directory {source} does not exist")
    if source != target and (source in target.parents or target in source.parents):
        raise ValueError(f"target {target} and source {source} must be the same directory or not nested")
    snapshot = as_checkpoint_tensors(dict(snapshot), read_weight_map(source)[0])
    shards, index = _plan_shards(snapshot, source)
    total = sum(_nbytes(snapshot[n]) for names in shards.values() for n in names)
    written = 0

    def tensor_written(nbytes: int) -> None:
        nonlocal written
        if should_stop is not None and should_stop():
            raise Abandoned(f"write of {target} abandoned; the previous copy is untouched")
        written += nbytes
        if progress is not None:
            progress(written, total)

    if progress is not None:
        progress(0, total)
    with _atomic_dir(target) as tmp:
        if source == target:
            rewritten = set(shards) | ({INDEX_NAME} if index is not None else set())
            mirror_tree(source, tmp, skip=lambda rel, _: rel in rewritten or rel in (extra_files or {}),
                        keep_symlinks=True)
        else:
            mirror_tree(source, tmp, skip=_stale_or_cache, link=False)
        for filename, names in shards.items():
            _write_safetensors(tmp / filename, {n: snapshot[n] for n in names}, tensor_written)
        if index is not None:
            index = dict(index)
            index["metadata"] = {**index.get("metadata", {}), "total_size": total}
            index["weight_map"] = dict(sorted((n, f) for f, names in shards.items() for n in names))
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            path = _inside(tmp, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        info = _describe(tmp)
    return {"path": str(target), **info}


def write_files_atomically(
    dir: str | os.PathLike, files: Mapping[str, bytes | Callable[[Path], None]]
) -> dict:
    """Replace directory `dir` with one holding exactly `files`, atomically (same mechanism as
    write_model_dir). Each value is the file's bytes or a function that writes the file at the
    path it is given, e.g. {"optimizer.pt": lambda p: torch.save(state, p), "registry.txt": b"..."}.

    Returns {"path", "bytes", "files"} like write_model_dir.
    """
    target = Path(dir).resolve()
    with _atomic_dir(target) as tmp:
        for name, content in files.items():
            path = _inside(tmp, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                content(path)
            else:
                path.write_bytes(content)
        info = _describe(tmp)
    return {"path": str(target), **info}


# --------------------------------------------------------------------------- shard layout


def _plan_shards(snapshot: Mapping[str, torch.Tensor], source: Path):
    """Map every file to write to the tensor names it holds; also return the source index
    (None when the source has a single file or no safetensors at all)."""
    weight_map, index = read_weight_map(source)
    missing = [n for n in weight_map if n not in snapshot]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"the snapshot lacks {len(missing)} tensor(s) of the source checkpoint {source}: "
            f"{', '.join(missing[:5])}{more}"
        )

    files = sorted(set(weight_map.values())) or [SINGLE_NAME]
    shards: dict[str, list[str]] = {f: [] for f in files}
    # Views already written, so a tied duplicate the source did not save is skipped.
    kept = {_view_key(snapshot[n]) for n in weight_map} - {None}
    for name, t in snapshot.items():
        if name in weight_map:
            shards[weight_map[name]].append(name)
            continue
        key = _view_key(t)
        if key is not None and key in kept:
            continue  # tied to a tensor that is written already
        if key is not None:
            kept.add(key)
        shards[files[-1]].append(name)
    return shards, index


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], on_tensor: Callable[[int], None]):
    # Largest alignment first, then by name, as safetensors itself lays files out.
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in names:
        t = tensors[n]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {n} has dtype {t.dtype}, which safetensors cannot store")
        end = offset + _nbytes(t)
        header[n] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for n in names:
            t = tensors[n].detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            on_tensor(_nbytes(t))


def _stale_or_cache(rel: str, is_dir: bool) -> bool:
    """What a copy of a model directory elsewhere leaves out: other serializations of the weights it
    rewrites, version-control and cache folders."""
    name = Path(rel).name
    return name in SKIP_DIRS if is_dir else any(fnmatch.fnmatch(name, p) for p in _WEIGHT_FILES)


def _inside(root: Path, name: str) -> Path:
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise ValueError(f"file name {name!r} must be a relative path inside the directory")
    return path


def _describe(root: Path) -> dict:
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != WRITING_LOCK)
    return {"bytes": sum((root / f).stat().st_size for f in files), "files": files}


# --------------------------------------------------------------------------- atomic directory swap


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp directory of ours next to `target`; when the block succeeds, fsync it and
    swap it in as `target`. On failure the temp directory is removed and `target` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise NotADirectoryError(f"{target} exists and is not a directory")
    sweep_abandoned(target.parent)
    for old in target.parent.glob(f".{glob.escape(target.name)}{OLD_MARK}*"):
        log.warning("%s holds the previous copy of %s from an interrupted write; remove it when done", old, target)
    tmp, lock = _make_tmp(target)
    try:
        yield tmp
        os.unlink(tmp / WRITING_LOCK)  # not part of the result; the held descriptor still guards tmp
        _fsync_tree(tmp)
        old = _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep_abandoned(parent: Path) -> None:
    """Remove temp directories of ours whose writer is gone (their lock is free). Only directories
    with our name and our lock file are considered: nothing else is adopted."""
    sweep_unlocked(parent.glob(f".*{TMP_MARK}*"), WRITING_LOCK)


def _make_tmp(target: Path) -> tuple[Path, int]:
    """A new temp directory for `target` and the descriptor of its held lock file."""
    while True:
        tmp = target.parent / f".{target.name}{TMP_MARK}{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o700)
        except FileExistsError:
            continue
        lock = os.open(tmp / WRITING_LOCK, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            shutil.copymode(target, tmp)
        else:
            os.chmod(tmp, 0o777 & ~_umask())
        return tmp, lock


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _swap_in(tmp: Path, target: Path) -> Path | None:
    """Make `tmp` the new `target`; return where the old target now is (None if there was none)."""
    parent = target.parent
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(parent)
        return None
    if rename_exchange(tmp, target):
        fsync_dir(parent)
        return tmp  # holds the old contents now
    # Not atomic: between the two renames `target` does not exist (see the module's docstring).
    old = parent / f".{target.name}{OLD_MARK}{secrets.token_hex(4)}"
    os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(parent)
    return old


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths with renameat2(RENAME_EXCHANGE). Returns False where
    the call is unavailable (no such libc function, old kernel, unsupported filesystem)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))
