"""The optimizer's Triton kernels for 16-bit CUDA gradients, and their launch helpers.

Each kernel is launched once per bucket of equal-shape matrices and memory layout (not once per
matrix): the matrices of a launch are found through a table of element offsets from its first
tensor, their moments and scales through a table of bucket slots. Strides are launch arguments, so
a stride of 1 is known to the compiler and loads stay vectorised. See docs/optimizer.md.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _project_kernel(g_ptr, g_offsets, slots, q_ptr, m_ptr, v_ptr, m_out, v_out, norms_ptr, k_rows, rows_n,
                    inner_n, stride_row, stride_inner, b1, b2, eps, HAS_STATE: tl.constexpr, RANK: tl.constexpr,
                    RANK_P: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, ALIGNED: tl.constexpr):
    """For BM rows of the oriented gradient G at g_ptr + g_offsets[k], bucket slot s = slots[k]:
    R = G Q accumulated in fp32, the new moments M = b1 M + (1 - b1) R, V = b2 V + (1 - b2) R**2 and
    U = M / (sqrt(V) + eps), and the row sums of U**2, R**2 and G**2 into norms[0..2, s] (each k_rows
    long). R and U never reach memory. RANK_P >= 16 pads the rank for tl.dot (APOLLO-Mini has rank 1)."""
    k = tl.program_id(1)
    offset = tl.load(g_offsets + k)
    if ALIGNED:
        offset = tl.multiple_of(offset, 16)
    slot = tl.load(slots + k).to(tl.int64)
    g_ptr += offset
    q_ptr += slot * inner_n * RANK
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, RANK_P)
    acc = tl.zeros([BM, RANK_P], tl.float32)
    sq = tl.zeros([BM], tl.float32)
    for i in range(0, inner_n, BK):
        inner = i + tl.arange(0, BK)
        g = tl.load(g_ptr + rows[:, None] * stride_row + inner[None, :] * stride_inner,
                    mask=(rows[:, None] < rows_n) & (inner[None, :] < inner_n), other=0.0)
        q = tl.load(q_ptr + inner[:, None] * RANK + ranks[None, :],
                    mask=(inner[:, None] < inner_n) & (ranks[None, :] < RANK), other=0.0)
        acc = tl.dot(g, q, acc)
        g = g.to(tl.float32)
        sq += tl.sum(g * g, axis=1)
    state = slot * rows_n * RANK + rows[:, None] * RANK + ranks[None, :]
    mask = (rows[:, None] < rows_n) & (ranks[None, :] < RANK)
    m = (1 - b1) * acc
    v = (1 - b2) * acc * acc
    if HAS_STATE:
        m += b1 * tl.load(m_ptr + state, mask=mask, other=0.0)
        v += b2 * tl.load(v_ptr + state, mask=mask, other=0.0)
    tl.store(m_out + state, m, mask=mask)
    tl.store(v_out + state, v, mask=mask)
    u = tl.where(mask, tl.div_rn(m, tl.sqrt_rn(v) + eps), 0.0)
    row = slot * rows_n + rows
    tl.store(norms_ptr + row, tl.sum(u * u, axis=1), mask=rows < rows_n)
    tl.store(norms_ptr + k_rows + row, tl.sum(acc * acc, axis=1), mask=rows < rows_n)
    tl.store(norms_ptr + 2 * k_rows + row, sq, mask=rows < rows_n)


@triton.jit
def _update_kernel(w_ptr, w_offsets, g_ptr, g_offsets, slots, c_ptr, ok_ptr, m, n, w_s0, w_s1, g_s0, g_s1,
                   c_slot_stride, c_stride, alpha, PER_ROW: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, ALIGNED: tl.constexpr, CHECKED: tl.constexpr):
    """w <- w + alpha * w + c * g on a BM x BN tile in fp32, rounded once, for the matrices at
    w_ptr + w_offsets[k], g_ptr + g_offsets[k]; c (one per row or column) from bucket slot slots[k].
    CHECKED: nothing is written unless the flag at ok_ptr is set."""
    if CHECKED:
        if tl.load(ok_ptr) == 0:
            return
    k = tl.program_id(2)
    w_offset = tl.load(w_offsets + k)
    g_offset = tl.load(g_offsets + k)
    if ALIGNED:
        w_offset = tl.multiple_of(w_offset, 16)
        g_offset = tl.multiple_of(g_offset, 16)
    c_ptr += tl.load(slots + k).to(tl.int64) * c_slot_stride
    i = tl.program_id(0) * BM + tl.arange(0, BM)[:, None]
    j = tl.program_id(1) * BN + tl.arange(0, BN)[None, :]
    mask = (i < m) & (j < n)
    w_ptrs = w_ptr + w_offset + i * w_s0 + j * w_s1
    w = tl.load(w_ptrs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + g_offset + i * g_s0 + j * g_s1, mask=mask).to(tl.float32)
    if PER_ROW:
        c = tl.load(c_ptr + i * c_stride, mask=i < m)
    else:
        c = tl.load(c_ptr + j * c_stride, mask=j < n)
    tl.store(w_ptrs, (w + alpha * w + c * g).to(w_ptr.dtype.element_ty), mask=mask)


def _by_layout(tensors: list[tuple[torch.Tensor, ...]]) -> list[tuple[int, ...]]:
    """Bucket slots grouped by the shapes and strides of their tensors: one kernel launch per group, with
    the strides as launch arguments (a stride of 1 is then known to the compiler)."""
    groups: dict[tuple, list[int]] = {}
    for slot, ts in enumerate(tensors):
        groups.setdefault(tuple((t.shape, t.stride()) for t in ts), []).append(slot)
    return [tuple(slots) for slots in groups.values()]


@functools.lru_cache(maxsize=1024)
def _table(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int64 table on ``device``, copied from pinned memory without a host synchronisation. Cached (the
    kernels only read it): a parameter's offsets and slots are the same at every step, and making a
    table costs more host time than a launch, which matters when parameters are stepped one by one."""
    table = torch.tensor(values, dtype=torch.int64)
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def _offsets(tensors: list[torch.Tensor]) -> tuple[tuple[int, ...], bool]:
    """Element offsets of the tensors from the first one's address, and whether all are multiples of 16."""
    base, size = tensors[0].data_ptr(), tensors[0].element_size()
    offsets = tuple((t.data_ptr() - base) // size for t in tensors)
    return offsets, all(o % 16 == 0 for o in offsets)


def project(grads: list[torch.Tensor], proj: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None,
            b1: float, b2: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bucket's new moments (K, rows, rank) from equal-shape oriented gradients and the old ``moments``
    (None: zeros), and the squared row norms (3, K, rows) of U, R and G; each gradient is read once, one
    launch per memory layout.

    Tiles measured best on an H200 for Qwen3-8B's shapes (about 2.2 TB/s of gradient read)."""
    (rows, inner), rank, k = grads[0].shape, proj.shape[-1], len(grads)
    proj = proj.contiguous()
    m = torch.empty(k, rows, rank, device=proj.device, dtype=torch.float32)
    v = torch.empty_like(m)
    norms = torch.empty(3, k, rows, device=proj.device, dtype=torch.float32)
    old_m, old_v = (t.contiguous() for t in moments) if moments is not None else (m, v)  # (m, v): not read
    small = rank <= 16
    for slots in _by_layout([(g,) for g in grads]):
        first = grads[slots[0]]
        offsets, aligned = _offsets([grads[s] for s in slots])
        _project_kernel[(triton.cdiv(rows, 64), len(slots))](
            first, _table(offsets, proj.device), _table(slots, proj.device), proj, old_m, old_v, m, v, norms,
            k * rows, rows, inner, first.stride(0), first.stride(1), b1, b2, eps, HAS_STATE=moments is not None,
            RANK=rank, RANK_P=max(16, triton.next_power_of_2(rank)), BM=64, BK=256 if small else 128,
            ALIGNED=aligned, num_warps=4, num_stages=3 if small or first.stride(0) == 1 else 4)
    return m, v, norms


def update(params: list[torch.Tensor], grads: list[torch.Tensor], coef: torch.Tensor, alpha: float,
           ok: torch.Tensor | None = None) -> None:
    """p <- p + alpha * p + coef[k] * grad in place for each matrix k of a bucket; coef[k] has one value
    per row (m >= n) or column (m < n), or one for the matrix; one launch per memory layout. ``ok``, a
    0-d bool on the device, read by the kernel: where False, nothing is written."""
    coef = coef.contiguous()
    c_stride = 1 if coef.shape[1] > 1 else 0
    flag = coef if ok is None else ok.view(torch.uint8)  # coef: a pointer that is not read
    for slots in _by_layout(list(zip(params, grads))):
        p, g = params[slots[0]], grads[slots[0]]
        (m, n), device = p.shape, p.device
        w_offsets, w_aligned = _offsets([params[s] for s in slots])
        g_offsets, g_aligned = _offsets([grads[s] for s in slots])
        grid = (triton.cdiv(m, 16), triton.cdiv(n, 256), len(slots))
        _update_kernel[grid](p, _table(w_offsets, device), g, _table(g_offsets, device), _table(slots, device),
                             coef, flag, m, n, *p.stride(), *g.stride(), coef.shape[1], c_stride, alpha,
                             PER_ROW=m >= n, BM=16, BN=256, ALIGNED=w_aligned and g_aligned, CHECKED=ok is not None)
