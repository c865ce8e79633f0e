"""Inside vLLM's worker: share the loaded weights with the training worker.

Runs once, right after the model's weights load and are processed (see loader.py). On CPU the parameters move
into /dev/shm files (same Parameter objects, new storage) so another process can map them; on
GPU each parameter gets a CUDA IPC handle. Either way vLLM keeps computing with the very
memory the training worker writes. Whatever cannot be shared safely is written into the
handles file as an error for the training worker to report; vLLM itself keeps serving.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from apollo_train.shared import handles, vllm_version
from apollo_train.shared.files import sweep_unlocked
from apollo_train.vllm_worker import plain_weights
from apollo_train.vllm_worker.weight_tracking import LoadRecorder, Placement

log = logging.getLogger("apollo_train")
SHM_ROOT = Path("/dev/shm")
SHM_PREFIX = "apollo-train-"
OWNER_LOCK = "owner.lock"
_held_locks: list[int] = []
_exported: dict = {}  # what this process shared: {"model", "placements"}, for checksums()


class SharingRefused(Exception):
    """The model cannot be trained in place; the message says why and what to do."""


def layout_of(module: torch.nn.Module) -> dict:
    """Fused-layer metadata worth recording for people reading the handles file."""
    out = {"module": type(module).__name__}
    for attr in ("output_sizes", "num_heads", "num_kv_heads", "head_size", "org_vocab_size"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, list, tuple)):
            out[attr] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def check_shareable(model_config, parallel_config) -> None:
    """Refuse, with the fix, a server whose weights in-place training cannot share (vLLM's ModelConfig and
    ParallelConfig)."""
    refusal, _ = vllm_version.check(vllm_version.installed())
    if refusal:
        raise SharingRefused(refusal)
    if model_config.quantization is not None:
        raise SharingRefused(
            f"model uses {model_config.quantization} weights; in-place training needs unquantized "
            f"weights (serve a bf16/fp16 checkpoint without --quantization)"
        )
    if getattr(model_config, "enable_sleep_mode", False):
        raise SharingRefused(
            "vLLM was started with --enable-sleep-mode, whose cuMem allocator memory cannot be shared "
            "through CUDA IPC; start it without sleep mode to train in place"
        )
    parallel = parallel_config
    text_config = model_config.hf_config.get_text_config()
    if parallel.tensor_parallel_size > 1 and "linear_attention" in (getattr(text_config, "layer_types", None) or ()):
        raise SharingRefused(
            f"the model has Gated DeltaNet (linear attention) layers, which in-place training shares at tensor "
            f"parallel size 1 only; serve it with --tensor-parallel-size 1 (vLLM runs it at "
            f"{parallel.tensor_parallel_size})"
        )
    if parallel.tensor_parallel_size > 1 and any(getattr(text_config, k, 0) for k in
                                                 ("num_experts", "n_routed_experts", "num_local_experts")):
        raise SharingRefused(
            f"the model is a mixture of experts, which in-place training shares at tensor parallel size 1 only; "
            f"serve it with --tensor-parallel-size 1 (vLLM runs it at {parallel.tensor_parallel_size})"
        )
    if parallel.pipeline_parallel_size > 1:
        raise SharingRefused(
            "pipeline parallelism is not supported for in-place training; serve with --pipeline-parallel-size 1"
        )
    if parallel.data_parallel_size > 1:
        raise SharingRefused(
            "data parallelism (replicas of the model) is not supported for in-place training; serve with "
            "--data-parallel-size 1 (tensor parallelism is)"
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


def move_to_shm(params: dict[str, torch.nn.Parameter]) -> dict[str, dict]:
    """Give every parameter storage a /dev/shm file; keep the Parameter objects, swap their data.

    The files live in a directory of this process's own, created exclusively with mode 0700 (another
    local user cannot create it first or look inside), each file created with O_EXCL | O_NOFOLLOW.
    The process holds a lock on the directory while it lives; a later server removes directories whose
    lock nobody holds (their server died without cleaning up; /dev/shm is RAM)."""
    sweep_dead_shm(SHM_ROOT)
    shm_dir = Path(tempfile.mkdtemp(prefix=SHM_PREFIX, dir=SHM_ROOT))
    lock = os.open(shm_dir / OWNER_LOCK, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    _held_locks.append(lock)  # held until this process exits
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
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR, 0o600)
                os.close(fd)
                buf = torch.from_file(str(path), shared=True, size=storage.nbytes(), dtype=torch.uint8)
                buf.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
                files[key] = {"path": str(path), "nbytes": buf.numel(), "buf": buf}
            f = files[key]
            p.data = f["buf"].view(p.dtype).as_strided(p.shape, p.stride(), p.storage_offset())
            done[id(p)] = {"shm": {"path": f["path"], "nbytes": f["nbytes"]}}
        out[name] = done[id(p)]
    return out


def sweep_dead_shm(root: Path) -> None:
    """Remove our shared-memory weight directories whose server died (nobody holds their lock). A lock,
    unlike a PID, is right across PID namespaces (containers sharing /dev/shm)."""
    sweep_unlocked(root.glob(f"{SHM_PREFIX}*"), OWNER_LOCK)


def cuda_handles(params: dict[str, torch.nn.Parameter]) -> dict[str, dict]:
    from torch.multiprocessing.reductions import reduce_tensor

    out = {}
    for name, p in params.items():
        try:
            _, args = reduce_tensor(p.data)
        except RuntimeError as exc:
            raise SharingRefused(
                f"cannot take a CUDA IPC handle for {name} ({exc}); memory from vLLM's cuMem allocator "
                f"(sleep mode, --enable-cumem-allocator, expandable_segments) cannot be shared"
            ) from None
        out[name] = {"cuda_ipc": args}
    return out


def export(model: torch.nn.Module, vllm_config, loaded: dict, run_dir: str):
    """Write this rank's handles file; a refusal is written into it instead of raised. ``loaded`` is
    record_loaded's account of the load."""
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
        "vllm_version": vllm_version.installed(),
        "device": "cpu",
        "pid": os.getpid(),
        "error": None,
    }
    content = {"__metadata__": meta, "params": {}, "checkpoint": {}, "problems": {}}
    path = handles.handles_path(run_dir, rank)
    try:
        check_shareable(vllm_config.model_config, vllm_config.parallel_config)
        params = dict(model.named_parameters(remove_duplicate=False))
        placements, problems, sums, ptrs = loaded["placements"], loaded["problems"], loaded["sums"], loaded["ptrs"]
        problems.update(verify_after_processing(params, placements, sums, ptrs))
        placed = {id(params[pl.param]) for pl in placements.values()}
        for pname, p in params.items():
            if id(p) not in placed:
                problems[f"<vllm:{pname}>"] = "vLLM parameter holds no checkpoint tensor"
        device = next(iter(params.values())).device
        meta["device"] = str(device)
        shared = cuda_handles(params) if device.type == "cuda" else move_to_shm(params)
        try:
            plain_weights.check_writes_reach_compute(model)
        except plain_weights.ComputeMismatch as exc:
            raise SharingRefused(str(exc)) from None
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
                "shape": list(pl.shape),  # this rank's box of the checkpoint tensor
                "start": list(pl.start),
                "full_shape": list(loaded["shapes"][name]),
                "checksum": sums[name],
            }
        content["problems"] = problems
        _exported.update(model=model, placements={n: pl for n, pl in placements.items() if n not in problems})
    except SharingRefused as exc:
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
    return {"placements": placements, "problems": problems, "sums": sums, "ptrs": ptrs,
            "shapes": dict(recorder.shapes)}


def _checksums(params: dict, placements: dict[str, Placement]) -> dict[str, tuple[float, float, float]]:
    return {name: handles.checksum(handles.region(params[pl.param], pl.offset, pl.shape))
            for name, pl in placements.items()}
