"""Build a HuggingFace model whose parameters are views of the weights vLLM is serving.

The handles file (written inside vLLM, see apollo_train/vllm_worker/export.py) says where each
checkpoint tensor lives inside vLLM's (often fused) parameters. We build the HF model from its config on
the meta device, so no weight memory is allocated, then bind every parameter to a view of
vLLM's memory: q/k/v and gate/up become row blocks of the fused tensors, padded vocabulary rows
are left out, tied embeddings stay one Parameter. Buffers (RoPE frequencies) are rebuilt by the
model's own code. Attaching always checks parity and refuses, naming the parameters, if any HF
parameter is unmapped or differs from what vLLM computes with. The one exception is a vision encoder
that vLLM did not load at all (it serves the language model only, e.g. with
``--limit-mm-per-prompt '{"image":0,"video":0}'``): its parameters are read from the checkpoint and
frozen, since text-only training never runs them, and checkpoints write them back unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig

from apollo_train.shared import handles
from apollo_train.shared.expert_stacks import EXPERT_STACKS
from apollo_train.shared.meta_model import meta_model
from worker.model_dir import read_weight_map
from worker.tensor_parallel.shards import Box

log = logging.getLogger("apollo_train.worker")


class AttachError(RuntimeError):
    """The served model cannot be trained in place; the message says why."""


@dataclasses.dataclass
class Attached:
    model: torch.nn.Module
    model_path: str
    metadata: dict
    vllm_tensors: dict[str, torch.Tensor]  # kept alive: the views point into them
    boxes: dict[str, Box]  # by parameter name: the box of the checkpoint tensor this rank holds


def read_handles(run_dir: str | os.PathLike, rank: int = 0, timeout: float = 0.0) -> dict:
    """A rank's handles file (waiting up to `timeout` s for vLLM to write it), or AttachError with the
    reason vLLM wrote in it."""
    content = handles.read(handles.handles_path(run_dir, rank), timeout=timeout)
    if content["__metadata__"]["error"]:
        raise AttachError(content["__metadata__"]["error"])
    return content


def attach(run_dir: str | os.PathLike, timeout: float = 0.0,
           checksums: Callable[[], dict | None] | None = None, rank: int = 0, content: dict | None = None) -> Attached:
    """Open tensor-parallel rank `rank`'s handles once (waiting up to `timeout` s for vLLM to write them;
    `content`: the file, read already) and build the view model; under tensor parallelism its parameters
    are that rank's shards. `checksums()` gives vLLM's current checksums by checkpoint name (the weights
    may have been trained since they loaded); without it, or if it gives None, those taken at load time
    are used."""
    content = content or read_handles(run_dir, rank, timeout)
    meta = content["__metadata__"]
    tensors = {name: handles.open_shared(entry) for name, entry in content["params"].items()}
    config = AutoConfig.from_pretrained(meta["model_path"])
    model = build_meta_model(config, getattr(torch, meta["dtype"]))
    device = next(iter(tensors.values())).device
    placements = content["checkpoint"]
    for name, value in ((checksums() if checksums else None) or {}).items():
        if name in placements:
            placements[name]["checksum"] = value
    unserved, boxes = bind_views(model, placements, tensors, content["problems"], sharded=meta["tp_size"] > 1)
    if unserved:
        if meta["tp_size"] > 1:
            raise AttachError(f"vLLM did not load the vision encoder ({unserved[0]}, ...); a model with one is "
                              f"trained in place at tensor parallel size 1 only")
        load_frozen(model, unserved, meta["model_path"], device)
        log.info("vLLM did not load the vision encoder (%d tensors, language model only): read from the "
                 "checkpoint and frozen", len(unserved))
    rebuild_buffers(model, device)
    return Attached(model, meta["model_path"], meta, tensors, boxes)


def build_meta_model(config, dtype: torch.dtype) -> torch.nn.Module:
    try:
        return meta_model(config, dtype)
    except ValueError as exc:
        raise AttachError(str(exc)) from None


def vision_encoders(model: torch.nn.Module) -> list[str]:
    """Name prefixes of the model's vision encoders: submodules built from ``config.vision_config``."""
    vision = getattr(model.config, "vision_config", None)
    return [name + "." for name, m in model.named_modules()
            if name and vision is not None and isinstance(m, transformers.PreTrainedModel)
            and type(m.config) is type(vision)]


def bind_views(model: torch.nn.Module, placements: dict, tensors: dict, problems: dict,
               sharded: bool = False) -> tuple[list[str], dict[str, Box]]:
    """Replace every meta parameter by a Parameter viewing vLLM's memory (tied ones share one),
    checking that each view holds exactly what vLLM computes with (checksums taken inside vLLM).
    With `sharded` (tensor parallelism) a view may be a box of its tensor, and has the box's shape.
    Returns the names of vision-encoder parameters vLLM did not load, left on the meta device, and the
    box of every bound parameter by name."""
    vision = tuple(vision_encoders(model))
    unserved: list[str] = []
    boxes: dict[str, Box] = {}
    aliases: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    unmapped, differ = [], []
    for key, names in aliases.items():
        found = next((n for n in names if n in placements), None)
        stack = None if found is not None or sharded else expert_stack(names[0], params[key].shape, placements)
        if stack is not None:
            view, parts = stack
            view = handles.region(tensors[view["param"]], view["offset"], view["shape"])
            differ += [n for n, (e, rows) in parts.items()
                       if not handles.checksums_match(handles.checksum(view[e, rows]), placements[n]["checksum"])]
            module_name, _, attr = names[0].rpartition(".")
            setattr(model.get_submodule(module_name), attr,
                    torch.nn.Parameter(view, requires_grad=params[key].requires_grad))
            continue
        if found is None:
            reason = next((problems[n] for n in names if n in problems), None)
            if reason is None and vision and names[0].startswith(vision):
                unserved.append(names[0])
                continue
            reason = reason or expert_stack_refusal(names[0], problems) or "no checkpoint tensor of this name"
            unmapped.append(f"{names[0]} ({reason})")
            continue
        entry = placements[found]
        view = handles.region(tensors[entry["param"]], entry["offset"], entry["shape"])
        box = Box(tuple(entry["start"]), tuple(entry["shape"]), tuple(entry["full_shape"]))
        if list(box.full_shape) != list(params[key].shape) or not (box.whole or sharded):
            unmapped.append(f"{names[0]} (HF shape {list(params[key].shape)}, vLLM holds {list(view.shape)})")
            continue
        boxes.update((n, box) for n in names)
        if not handles.checksums_match(handles.checksum(view), entry["checksum"]):
            differ.append(names[0])
        new = torch.nn.Parameter(view, requires_grad=params[key].requires_grad)
        for n in names:
            module_name, _, attr = n.rpartition(".")
            setattr(model.get_submodule(module_name), attr, new)
    if differ:
        raise AttachError(f"views differ from what vLLM computes with, for: {', '.join(differ[:12])}")
    vllm_only = sorted(k for k in problems if k.startswith("<vllm:"))
    if unmapped or vllm_only:
        lines = unmapped + [f"{k} ({problems[k]})" for k in vllm_only]
        raise AttachError(
            f"{len(lines)} parameter(s) cannot be shared with vLLM, so in-place training is refused: "
            + "; ".join(lines[:12])
            + (" ..." if len(lines) > 12 else "")
        )
    return unserved, boxes


def expert_stack(name: str, shape: torch.Size, placements: dict) -> tuple[dict, dict] | None:
    """A mixture of experts' fused stack (transformers' `...experts.gate_up_proj` [experts, 2 x intermediate,
    hidden]) as one view of vLLM's fused expert tensor, where vLLM holds the checkpoint's per-expert tensors
    (`...experts.3.gate_proj.weight`) in exactly that layout: (the view's placement, {checkpoint name:
    (expert, rows) of the view}); None otherwise."""
    prefix, _, stack = name.rpartition(".")
    parts = EXPERT_STACKS.get(stack) if prefix.endswith("experts") and len(shape) == 3 else None
    if parts is None:
        return None
    experts, rows, cols = shape
    part_rows = rows // len(parts)
    first = placements.get(f"{prefix}.0.{parts[0]}.weight")
    if first is None:
        return None
    out = {}
    for e in range(experts):
        for j, part in enumerate(parts):
            part_name = f"{prefix}.{e}.{part}.weight"
            entry = placements.get(part_name)
            expected = first["offset"] + (e * rows + j * part_rows) * cols
            if (entry is None or entry["param"] != first["param"] or entry["offset"] != expected
                    or list(entry["shape"]) != [part_rows, cols]):
                return None
            out[part_name] = (e, slice(j * part_rows, (j + 1) * part_rows))
    return {"param": first["param"], "offset": first["offset"], "shape": list(shape)}, out


def expert_stack_refusal(name: str, problems: dict) -> str | None:
    """Why a mixture of experts' fused stack (transformers' `...experts.gate_up_proj`) has no view, or None
    for any other parameter."""
    prefix, _, stack = name.rpartition(".")
    parts = EXPERT_STACKS.get(stack) if prefix.endswith("experts") else None
    if parts is None:
        return None
    loaded = problems.get(f"{prefix}.0.{parts[0]}.weight")
    if loaded:
        return (f"a mixture of experts' stack, and {loaded}: this vLLM keeps the experts in a layout of its kernel's "
                f"that a view cannot follow; the other layers would train, the experts cannot")
    return "a mixture of experts' stack: views of vLLM's fused expert tensors are not built yet"


def load_frozen(model: torch.nn.Module, names: list[str], model_path: str, device: torch.device) -> None:
    """Bind the named meta parameters to frozen copies of their checkpoint tensors on ``device``."""
    root = Path(model_path)
    weight_map, _ = read_weight_map(root)
    missing = [n for n in names if n not in weight_map]
    if missing:
        raise AttachError(f"vLLM did not load {missing[0]} and the safetensors checkpoint in {root} has no "
                          f"tensor of this name to read it from")
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(weight_map[name], []).append(name)
    for file, file_names in by_file.items():
        with safe_open(root / file, framework="pt") as f:
            for name in file_names:
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                value = f.get_tensor(name).to(device=device, dtype=getattr(module, attr).dtype)
                setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))


def rebuild_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Buffers built on the meta device hold no values: let each owning module's own
    constructor compute them again (RoPE frequencies, with the config's rope scaling)."""
    for module_name, module in model.named_modules():
        meta_buffers = {n: b for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta}
        if not meta_buffers:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise AttachError(f"cannot rebuild buffers {sorted(meta_buffers)} of {module_name or 'the model'}")
        with torch.device(device):
            fresh = type(module)(config)
        for n in meta_buffers:
            persistent = n not in module._non_persistent_buffers_set
            module.register_buffer(n, getattr(fresh, n).to(device), persistent=persistent)
