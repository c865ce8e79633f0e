"""Inside vLLM's worker: share the loaded weights with the training worker.

Runs once, right after the model's weights load (see plugin.py). On CPU the parameters move
into /dev/shm files (same Parameter objects, new storage) so another process can map them; on
GPU each parameter gets a CUDA IPC handle. Either way vLLM keeps computing with the very
memory the training worker writes. Whatever cannot be shared safely is written into the
handles file as an error for the training worker to report; vLLM itself keeps serving.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
from pathlib import Path

import torch

from apollo_train.shared import handles
from apollo_train.engine.weight_tracking import LoadRecorder, Placement

log = logging.getLogger("apollo_train")
SHM_PREFIX = "apollo-train-"
OWNER = "owner.pid"
_exported: dict = {}  # what this process shared: {"model", "placements"}, for checksums()


class Refused(Exception):
    """The model cannot be trained in place; the message says why and what to do."""


def layout_of(module: torch.nn.Module) -> dict:
    """Fused-layer metadata worth recording for people reading the handles file."""
    out = {"module": type(module).__name__}
    for attr in ("output_sizes", "num_heads", "num_kv_heads", "head_size", "org_vocab_size"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, list, tuple)):
            out[attr] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def check_shareable(vllm_config) -> None:
    model_config = vllm_config.model_config
    if model_config.quantization is not None:
        raise Refused(
            f"model uses {model_config.quantization} weights; in-place training needs unquantized "
            f"weights (serve a bf16/fp16 checkpoint without --quantization)"
        )
    if getattr(model_config, "enable_sleep_mode", False):
        raise Refused(
            "vLLM was started with --enable-sleep-mode, whose cuMem allocator memory cannot be shared "
            "through CUDA IPC; start it without sleep mode to train in place"
        )
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1:
        raise Refused(
            f"vLLM runs with tensor parallel size {parallel.tensor_parallel_size}; in-place training supports "
            f"one rank (serve with --tensor-parallel-size 1)"
        )
    if parallel.pipeline_parallel_size > 1:
        raise Refused(
            "pipeline parallelism is not supported for in-place training; serve with --pipeline-parallel-size 1"
        )


def verify_after_processing(params, placements: dict[str, Placement], sums: dict, ptrs: dict) -> dict[str, str]:
    """Post-loading processing (repacking, quantization, MoE re-layout) must not have moved or
    changed a placed tensor: vLLM would then compute with something a view cannot reach."""
    problems = {}
    for name, pl in placements.items():
        p = params.get(pl.param)
        if p is None or p.untyped_storage().data_ptr() != ptrs[pl.param]:
            problems[name] = f"vLLM replaced parameter {pl.param} after loading (re-laid out for its kernels)"
        elif not handles.checksums_match(_checksums(params, {name: pl})[name], sums[name]):
            problems[name] = f"vLLM transformed parameter {pl.param} after loading (re-laid out for its kernels)"
    return problems


def move_to_shm(params: dict[str, torch.nn.Parameter], shm_dir: Path) -> dict[str, dict]:
    """Give every parameter storage a /dev/shm file; keep the Parameter objects, swap their data."""
    sweep_dead_shm(shm_dir.parent)
    shm_dir.mkdir(parents=True, exist_ok=True)
    (shm_dir / OWNER).write_text(str(os.getpid()))
    atexit.register(shutil.rmtree, shm_dir, True)
    files: dict[int, dict] = {}  # by storage address before the move
    done: dict[int, dict] = {}  # by Parameter identity: tied parameters move once
    out = {}
    for name, p in params.items():
        if id(p) not in done:
            storage = p.data.untyped_storage()
            key = storage.data_ptr()
            if key not in files:
                path = shm_dir / f"{len(files)}.bin"
                buf = torch.from_file(str(path), shared=True, size=storage.nbytes(), dtype=torch.uint8)
                buf.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
                files[key] = {"path": str(path), "nbytes": buf.numel(), "buf": buf}
            f = files[key]
            p.data = f["buf"].view(p.dtype).as_strided(p.shape, p.stride(), p.storage_offset())
            done[id(p)] = {"shm": {"path": f["path"], "nbytes": f["nbytes"]}}
        out[name] = done[id(p)]
    return out


def sweep_dead_shm(root: Path) -> None:
    """Remove the shared-memory weights of servers that died without cleaning up (a killed
    vLLM worker runs no exit handler): /dev/shm is RAM."""
    for d in root.glob(f"{SHM_PREFIX}*"):
        try:
            os.kill(int((d / OWNER).read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            pass  # no owner file yet, or not ours to judge


def cuda_handles(params: dict[str, torch.nn.Parameter]) -> dict[str, dict]:
    from torch.multiprocessing.reductions import reduce_tensor

    out = {}
    for name, p in params.items():
        try:
            _, args = reduce_tensor(p.data)
        except RuntimeError as exc:
            raise Refused(
                f"cannot take a CUDA IPC handle for {name} ({exc}); memory from vLLM's cuMem allocator "
                f"(sleep mode, --enable-cumem-allocator, expandable_segments) cannot be shared"
            ) from None
        out[name] = {"cuda_ipc": args}
    return out


def export(model: torch.nn.Module, vllm_config, loaded: dict | None, run_dir: str):
    """Write this rank's handles file; a refusal is written into it instead of raised. ``loaded`` is
    record_loaded's account of the load, None when vLLM's default loader did not load the weights."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    model_config = vllm_config.model_config
    rank, tp = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    meta = {
        "format": handles.FORMAT,
        "model_path": str(model_config.model),
        "hf_config": model_config.hf_config.to_dict(),
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "max_model_len": model_config.max_model_len,
        "tp_rank": rank,
        "tp_size": tp,
        "vllm_version": _vllm_version(),
        "device": "cpu",
        "pid": os.getpid(),
        "error": None,
    }
    content = {"__metadata__": meta, "params": {}, "checkpoint": {}, "problems": {}}
    path = handles.handles_path(run_dir, rank)
    try:
        check_shareable(vllm_config)
        if loaded is None:
            raise Refused(
                f"weights were loaded with load format {vllm_config.load_config.load_format!r}; in-place "
                f"training follows vLLM's default safetensors loader (use --load-format auto or safetensors)"
            )
        params = dict(model.named_parameters(remove_duplicate=False))
        placements, problems, sums, ptrs = loaded["placements"], loaded["problems"], loaded["sums"], loaded["ptrs"]
        problems.update(verify_after_processing(params, placements, sums, ptrs))
        placed = {id(params[pl.param]) for pl in placements.values()}
        for pname, p in params.items():
            if id(p) not in placed:
                problems[f"<vllm:{pname}>"] = "vLLM parameter holds no checkpoint tensor"
        device = next(iter(params.values())).device
        meta["device"] = str(device)
        shared = cuda_handles(params) if device.type == "cuda" else move_to_shm(params, _shm_dir(run_dir, rank))
        modules = dict(model.named_modules())
        for pname, p in params.items():
            owner = modules.get(pname.rpartition(".")[0])
            content["params"][pname] = {
                "shape": list(p.shape),
                "stride": list(p.stride()),
                "storage_offset": p.storage_offset(),
                "dtype": str(p.dtype).removeprefix("torch."),
                "layout": layout_of(owner) if owner is not None else {},
                **shared[pname],
            }
        for name, pl in placements.items():
            if name in problems:
                continue
            content["checkpoint"][name] = {
                "param": pl.param,
                "offset": pl.offset,
                "shape": list(pl.shape),
                "checksum": sums[name],
            }
        content["problems"] = problems
        _exported.update(model=model, placements={n: pl for n, pl in placements.items() if n not in problems})
    except Refused as exc:
        meta["error"] = str(exc)
        log.warning("apollo-train: in-place training disabled: %s", exc)
    handles.write(path, content)
    log.info("apollo-train: weight handles for rank %d written to %s", rank, path)


def checksums() -> dict[str, tuple[float, float, float]]:
    """Checksums of every shared checkpoint tensor as vLLM holds it now. A training worker that
    attaches after training has changed the weights compares its views against these (through
    a collective RPC between forward steps), since the handles file's sums are from load time."""
    if not _exported:
        return {}
    return _checksums(dict(_exported["model"].named_parameters(remove_duplicate=False)), _exported["placements"])


def record_loaded(model: torch.nn.Module, recorder: LoadRecorder) -> dict:
    """Right after vLLM copied the checkpoint in (before post-processing): where everything is."""
    params = dict(model.named_parameters(remove_duplicate=False))
    placements, problems = recorder.placements(params)
    sums = _checksums(params, placements)
    ptrs = {pname: p.untyped_storage().data_ptr() for pname, p in params.items()}
    return {"placements": placements, "problems": problems, "sums": sums, "ptrs": ptrs}


def _checksums(params: dict, placements: dict[str, Placement]) -> dict[str, tuple[float, float, float]]:
    return {name: handles.checksum(handles.region(params[pl.param], pl.offset, pl.shape))
            for name, pl in placements.items()}


def _shm_dir(run_dir: str, rank: int) -> Path:
    return Path("/dev/shm") / f"{SHM_PREFIX}{Path(run_dir).name}-rank{rank}"


def _vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception:
        return "unknown"
