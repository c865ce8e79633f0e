"""Learn where vLLM puts each checkpoint tensor by watching it load the weights.

Every model in vLLM has its own weight loaders (fused q/k/v, gate/up, Gated-DeltaNet
projections, padded vocabularies, TP sharding...). Rather than keep a second, hand-written
copy of those layouts, we let vLLM load the checkpoint as usual with each tensor wrapped in
`TrackedTensor`. When a loader copies (a view of) a checkpoint tensor into a parameter, the
wrapper records which elements of the checkpoint tensor landed where in which parameter. A
checkpoint tensor that landed, element for element and in order, in one contiguous block of
one parameter can be trained through a view of that block; anything else (transposed,
converted, quantized, split across parameters) cannot and is reported as such. Under tensor
parallelism each rank receives a box of the checkpoint tensor (a range of rows, or of columns for
row-parallel layers): vLLM narrows the tensor, then copies it; the box is recorded with the placement.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import torch

# Ops that copy values without changing their layout; their result still maps 1:1 to the source.
_VALUE_COPIES = frozenset({"to", "cuda", "cpu", "contiguous", "clone", "float", "half", "bfloat16", "type", "type_as"})


@dataclasses.dataclass
class _Origin:
    """Where a tracked tensor's elements come from: checkpoint tensor `name`, whose element 0
    sits at storage offset `base_offset` of the storage at `base_ptr` (None: values derived
    by some other computation, so the mapping is lost)."""

    name: str
    base_ptr: int | None
    base_offset: int | None

    def offset_of(self, t: torch.Tensor) -> int | None:
        if self.base_ptr is None or t.untyped_storage().data_ptr() != self.base_ptr:
            return None
        return t.storage_offset() - self.base_offset


@dataclasses.dataclass(frozen=True)
class Copy:
    """One loader write: `numel` elements of checkpoint tensor `name`, read from the view of shape
    `src_shape` and strides `src_stride` starting at element `src_offset` (None: not a plain copy),
    written to the storage at `dst_ptr` from storage offset `dst_offset` (`dst_contiguous`: as one block)."""

    name: str
    src_offset: int | None
    src_shape: tuple[int, ...]
    src_stride: tuple[int, ...]
    dst_ptr: int
    dst_offset: int
    numel: int
    dst_contiguous: bool


class TrackedTensor(torch.Tensor):
    """A checkpoint tensor that reports where vLLM's weight loaders copy it."""

    _origin: _Origin | None = None
    _recorder: "LoadRecorder | None" = None

    @staticmethod
    def wrap(t: torch.Tensor, name: str, recorder: "LoadRecorder") -> "TrackedTensor":
        out = torch.Tensor._make_subclass(TrackedTensor, t)
        out._origin = _Origin(name, t.untyped_storage().data_ptr(), t.storage_offset())
        out._recorder = recorder
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("copy_", "__setitem__") and len(args) >= 2:
            src = args[1] if name == "copy_" else args[2]
            if isinstance(src, TrackedTensor) and not isinstance(args[0], TrackedTensor):
                dst = args[0] if name == "copy_" else args[0][args[1]]
                src._recorder.record(src, dst)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        return _retrack(result, args, name)


def _retrack(result, args, func_name):
    """Carry the origin of the first tracked argument over to the tensors an op returned."""
    source = next((a for a in args if isinstance(a, TrackedTensor) and a._origin), None)
    if source is None:
        return result
    if isinstance(result, (tuple, list)):
        return type(result)(_retrack(r, args, func_name) for r in result)
    if not isinstance(result, torch.Tensor) or isinstance(result, torch.nn.Parameter):
        return result
    origin = source._origin
    shares = origin.base_ptr is not None and result.untyped_storage().data_ptr() == origin.base_ptr
    if shares:
        new_origin = origin
    else:
        src_offset = origin.offset_of(source)
        same_layout = (
            func_name in _VALUE_COPIES
            and src_offset is not None
            and source.is_contiguous()
            and result.is_contiguous()
            and result.shape == source.shape
        )
        if same_layout:
            new_origin = _Origin(origin.name, result.untyped_storage().data_ptr(), result.storage_offset() - src_offset)
        else:
            new_origin = _Origin(origin.name, None, None)
    tracked = result if isinstance(result, TrackedTensor) else torch.Tensor._make_subclass(TrackedTensor, result)
    tracked._origin = new_origin
    tracked._recorder = source._recorder
    return tracked


@dataclasses.dataclass(frozen=True)
class Placement:
    """`param.view(-1)[offset : offset + numel].view(shape)` holds the box of the checkpoint tensor that
    starts at index `start` and has `shape`: the whole tensor (start all zeros) unless vLLM shards it."""

    param: str
    offset: int
    shape: tuple[int, ...]
    start: tuple[int, ...]


class LoadRecorder:
    """Collects the copies made while one model loads, and resolves them to placements."""

    def __init__(self):
        self.copies: list[Copy] = []
        self.shapes: dict[str, tuple[int, ...]] = {}

    def wrap(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.shapes[name] = tuple(tensor.shape)
        return TrackedTensor.wrap(tensor, name, self)

    def wrap_iterator(self, weights):
        for name, tensor in weights:
            yield name, self.wrap(name, tensor)

    def record(self, src: TrackedTensor, dst: torch.Tensor) -> None:
        self.copies.append(
            Copy(
                name=src._origin.name,
                src_offset=src._origin.offset_of(src) if src.shape == dst.shape else None,
                src_shape=tuple(src.shape),
                src_stride=tuple(src.stride()),
                dst_ptr=dst.untyped_storage().data_ptr(),
                dst_offset=dst.storage_offset(),
                numel=dst.numel(),
                dst_contiguous=dst.is_contiguous(),
            )
        )

    def placements(self, params: dict[str, torch.Tensor]) -> tuple[dict[str, Placement], dict[str, str]]:
        """Resolve the recorded copies against the model's parameters (as they are right after
        loading). Returns (placements by checkpoint name, reasons by checkpoint name for the
        tensors that are not a plain block of one parameter)."""
        by_storage: dict[int, list[tuple[str, torch.Tensor]]] = defaultdict(list)
        for pname, p in params.items():
            by_storage[p.untyped_storage().data_ptr()].append((pname, p))
        copies_by_name: dict[str, list[Copy]] = defaultdict(list)
        for c in self.copies:
            copies_by_name[c.name].append(c)

        placements, problems = {}, {}
        for name, shape in self.shapes.items():
            copies = copies_by_name.get(name)
            if not copies:
                continue  # skipped by the loader (e.g. a tied lm_head, rotary caches)
            if len(copies) == 1:
                found = _box_copy(copies[0], shape)
            else:
                found = _block_copies(copies, shape)
            if isinstance(found, str):
                problems[name] = found
                continue
            ptr, dst_offset, box_start, box_shape = found
            numel = math.prod(box_shape)
            owner = _owner(by_storage.get(ptr, ()), dst_offset, numel)
            if owner is None:
                problems[name] = "vLLM copies this tensor outside the model's parameters"
                continue
            pname, p = owner
            placements[name] = Placement(pname, dst_offset - p.storage_offset(), box_shape, box_start)
        return placements, problems


_RELAID = "vLLM converts or re-lays this tensor while loading it"


def _box_copy(c: Copy, shape: tuple[int, ...]):
    """(dst_ptr, dst_offset, box start, box shape) for one copy of a box of the checkpoint tensor
    (all of it, or the rows or columns vLLM gives one tensor-parallel rank) into one block; else why not."""
    strides = _contiguous_strides(shape)
    if c.src_offset is None or not c.dst_contiguous or len(c.src_shape) != len(shape) or any(
            n > 1 and st != want for n, st, want in zip(c.src_shape, c.src_stride, strides)):
        return _RELAID
    start, rest = [], c.src_offset
    for stride in strides:
        start.append(rest // stride)
        rest %= stride
    if rest or any(s < 0 or s + n > full for s, n, full in zip(start, c.src_shape, shape)):
        return _RELAID
    return c.dst_ptr, c.dst_offset, tuple(start), c.src_shape


def _block_copies(copies: list[Copy], shape: tuple[int, ...]):
    """(dst_ptr, dst_offset, start, shape) when several copies write the whole tensor, in order, into one
    block (a loader that copies in pieces); else why not."""
    if any(c.src_offset is None or not c.dst_contiguous
           or c.src_stride != _contiguous_strides(c.src_shape) for c in copies):
        return _RELAID
    deltas = {(c.dst_ptr, c.dst_offset - c.src_offset) for c in copies}
    if len(deltas) != 1 or sum(c.numel for c in copies) != math.prod(shape):
        return "vLLM splits this tensor across places or loads it partially"
    ptr, delta = deltas.pop()
    return ptr, delta, (0,) * len(shape), shape


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _owner(candidates, storage_offset: int, numel: int):
    """The parameter whose elements contain [storage_offset, storage_offset + numel)."""
    for pname, p in candidates:
        start = p.storage_offset()
        if p.is_contiguous() and start <= storage_offset and storage_offset + numel <= start + p.numel():
            return pname, p
    return None
