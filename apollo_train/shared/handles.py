"""The weight-handles file: how vLLM's worker tells the training worker where its weights are.

One file per tensor-parallel rank, written atomically by the vLLM worker right after its
weights load and read once by the training worker. It holds a `__metadata__` block (model
path, HF config, dtype, ranks, vLLM version, or the reason training cannot attach), one
entry per vLLM parameter (shape, stride, offset, dtype, fused layout, and a CUDA IPC handle or
a shared-memory file), and the placement of every checkpoint tensor (or, under tensor
parallelism, of this rank's box of it) inside those parameters with a checksum of what vLLM
computes with.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from apollo_train.shared.config import PLUGIN_NAMES
from apollo_train.shared.files import write_atomically

FORMAT = 2  # 2: each checkpoint tensor's box (start, full_shape), for tensor-parallel shards


def region(t: torch.Tensor, offset: int, shape) -> torch.Tensor:
    """The checkpoint tensor of ``shape`` stored at element ``offset`` of ``t`` (a view)."""
    return t.detach().reshape(-1)[offset : offset + math.prod(shape)].view(shape)


def handles_path(run_dir: str | os.PathLike, rank: int = 0) -> Path:
    return Path(run_dir) / f"handles-rank{rank}.pkl"


def checksum(t: torch.Tensor) -> tuple[float, float, float]:
    """Order-sensitive fingerprint of a tensor's values (sum, row- and column-weighted sums),
    cheap enough for every weight of a large model and without a full-size temporary."""
    t2 = t.detach().reshape(t.shape[0], -1) if t.dim() > 1 else t.detach().reshape(-1, 1)
    rows = t2.sum(dim=1, dtype=torch.float64)
    cols = t2.sum(dim=0, dtype=torch.float64)
    r = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)
    c = torch.arange(1, cols.numel() + 1, dtype=torch.float64, device=cols.device)
    return (rows.sum().item(), (rows @ r).item(), (cols @ c).item())


def checksums_match(a, b, rel: float = 1e-9) -> bool:
    return all(abs(x - y) <= rel * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))


def write(path: Path, content: dict[str, Any]) -> None:
    """Write atomically: a reader sees no file or the whole file, never a partial one."""
    write_atomically(path, pickle.dumps(content, protocol=pickle.HIGHEST_PROTOCOL))


def read(path: Path, timeout: float = 0.0) -> dict[str, Any]:
    """Read a handles file, waiting up to `timeout` seconds for vLLM to write it."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() >= deadline:
            raise FileNotFoundError(
                f"no weight handles at {path}: vLLM did not load the apollo_train plugin "
                f"(start it with `apollo-train serve` or set VLLM_PLUGINS={PLUGIN_NAMES})"
            )
        time.sleep(0.2)
    with open(path, "rb") as f:
        content = pickle.load(f)
    fmt = content.get("__metadata__", {}).get("format")
    if fmt != FORMAT:
        raise ValueError(f"{path} has handles format {fmt}, this apollo-train reads {FORMAT}")
    return content


def open_shared(entry: dict[str, Any]) -> torch.Tensor:
    """Map one exported parameter into this process without copying it."""
    dtype = getattr(torch, entry["dtype"])
    if "shm" in entry:
        shm = entry["shm"]
        storage = torch.from_file(shm["path"], shared=True, size=shm["nbytes"], dtype=torch.uint8)
        base = storage.view(dtype)
        return base.as_strided(entry["shape"], entry["stride"], entry["storage_offset"])
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(*entry["cuda_ipc"])
