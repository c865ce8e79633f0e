"""APOLLO optimizer (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270).

Adam moments are kept for a random low-rank projection R of each weight matrix's gradient; their ratio
gives one scale per channel (or per tensor, APOLLO-Mini), and the full gradient, scaled, is the update.
Optimizer state is O(rank * max(m, n)) per matrix instead of AdamW's 2 m n.

The optimizer updates weights that vLLM is serving, in place, so it never rebinds ``.data`` and it
refuses (skips) a step whose gradient or update is not finite. See docs/optimizer.md.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from apollo_train.shared.config import OPTIMIZERS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the plain torch path
    triton = None

DEFAULT_RANK = 64
APOLLO_MINI = {"rank": 1, "scale_type": "tensor", "scale": 128.0}
"""APOLLO-Mini preset: ``Apollo(params, lr=lr, **APOLLO_MINI)``."""


def projection(seed: int, param_index: int, refresh: int, rank: int, dim: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random projection Q (dim x rank), N(0, 1/rank) entries, drawn on the CPU from (seed, index, refresh).

    Drawing on the CPU gives every device the same Q; hashing the parameter index gives same-shape
    matrices different Qs. For a weight of shape (m, n) the reference's P is Q.T (rank x n) when m >= n
    and Q (m x rank) when m < n; both scale by 1/sqrt(rank).
    """
    digest = hashlib.blake2b(f"{seed}:{param_index}:{refresh}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    return (torch.randn(dim, rank, generator=gen) / math.sqrt(rank)).to(dtype)


def _oriented(x: torch.Tensor) -> torch.Tensor:
    """View a matrix as (max side, min side): the projection acts on the right, channels are rows."""
    return x.T if x.shape[0] < x.shape[1] else x


def _project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """grad @ proj as fp32, without an fp32 copy of grad: a 16-bit product is rounded to 16 bits first (the
    reference does the same; the CUDA kernels below keep it fp32)."""
    return (grad @ proj).float()


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack equal-shape tensors; free when they are consecutive slices of one tensor (state after a step)."""
    base = tensors[0]._base
    if base is None or not base.is_contiguous() or base.shape[0] != len(tensors):
        return torch.stack(tensors)
    start, size = base.data_ptr(), base[0].numel() * base.element_size()
    if all(t._base is base and t.shape == base.shape[1:] and t.data_ptr() == start + i * size
           for i, t in enumerate(tensors)):
        return base
    return torch.stack(tensors)


if triton is not None:

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
    def _update_kernel(w_ptr, w_offsets, g_ptr, g_offsets, slots, c_ptr, m, n, w_s0, w_s1, g_s0, g_s1,
                       c_slot_stride, c_stride, alpha, PER_ROW: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, ALIGNED: tl.constexpr):
        """w <- w + alpha * w + c * g on a BM x BN tile in fp32, rounded once, for the matrices at
        w_ptr + w_offsets[k], g_ptr + g_offsets[k]; c (one per row or column) from bucket slot slots[k]."""
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


def _by_layout(tensors: list[tuple[torch.Tensor, ...]]) -> dict[tuple, list[int]]:
    """Bucket slots grouped by the shapes and strides of their tensors: one kernel launch per group, with
    the strides as launch arguments (a stride of 1 is then known to the compiler)."""
    groups: dict[tuple, list[int]] = {}
    for slot, ts in enumerate(tensors):
        groups.setdefault(tuple((t.shape, t.stride()) for t in ts), []).append(slot)
    return groups


def _table(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 table on ``device``, copied from pinned memory without a host synchronisation."""
    table = torch.tensor(values, dtype=torch.int64)
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def _offsets(tensors: list[torch.Tensor]) -> tuple[list[int], bool]:
    """Element offsets of the tensors from the first one's address, and whether all are multiples of 16."""
    base, size = tensors[0].data_ptr(), tensors[0].element_size()
    offsets = [(t.data_ptr() - base) // size for t in tensors]
    return offsets, all(o % 16 == 0 for o in offsets)


def _fused_project(grads: list[torch.Tensor], proj: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None,
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
    for slots in _by_layout([(g,) for g in grads]).values():
        first = grads[slots[0]]
        offsets, aligned = _offsets([grads[s] for s in slots])
        _project_kernel[(triton.cdiv(rows, 64), len(slots))](
            first, _table(offsets, proj.device), _table(slots, proj.device), proj, old_m, old_v, m, v, norms,
            k * rows, rows, inner, first.stride(0), first.stride(1), b1, b2, eps, HAS_STATE=moments is not None,
            RANK=rank, RANK_P=max(16, triton.next_power_of_2(rank)), BM=64, BK=256 if small else 128,
            ALIGNED=aligned, num_warps=4, num_stages=3 if small or first.stride(0) == 1 else 4)
    return m, v, norms


def _fused_update(params: list[torch.Tensor], grads: list[torch.Tensor], coef: torch.Tensor,
                  alpha: float) -> None:
    """p <- p + alpha * p + coef[k] * grad in place for each matrix k of a bucket; coef[k] has one value
    per row (m >= n) or column (m < n), or one for the matrix; one launch per memory layout."""
    coef = coef.contiguous()
    c_stride = 1 if coef.shape[1] > 1 else 0
    for slots in _by_layout(list(zip(params, grads))).values():
        p, g = params[slots[0]], grads[slots[0]]
        (m, n), device = p.shape, p.device
        w_offsets, w_aligned = _offsets([params[s] for s in slots])
        g_offsets, g_aligned = _offsets([grads[s] for s in slots])
        grid = (triton.cdiv(m, 16), triton.cdiv(n, 256), len(slots))
        _update_kernel[grid](p, _table(w_offsets, device), g, _table(g_offsets, device), _table(slots, device),
                             coef, m, n, *p.stride(), *g.stride(), coef.shape[1], c_stride, alpha,
                             PER_ROW=m >= n, BM=16, BN=256, ALIGNED=w_aligned and g_aligned)


@dataclass
class _Plan:
    """A low-rank bucket's step, computed but not yet applied."""

    group: dict
    items: list  # (param, grad, state, index)
    step: int
    new_state: dict[str, torch.Tensor]  # (K, ...) tensors, slice i is item i's state
    coef: torch.Tensor  # (K, channels): update = coef * grad per row of the oriented grad
    finite: torch.Tensor  # 0-d bool
    fused: bool


class Apollo(torch.optim.Optimizer):
    """APOLLO / APOLLO-Mini for 2-D weights of linear layers, AdamW for every other parameter.

    Group options (all overridable per group): ``lr, betas, eps, weight_decay`` as in AdamW;
    ``rank``, ``scale_type`` ("channel": one scale per row of the larger side, "tensor": one per matrix),
    ``scale`` (the update is multiplied by sqrt(scale)), ``update_proj_gap`` (steps between projection
    refreshes; moments are kept across refreshes), ``norm_growth_limit`` (gamma of the norm-growth
    limiter, None disables it; the limiter compares with the previous *limited* norm, so a sudden
    k-fold rise in gradient norm takes log(k)/log(gamma) steps to pass through, ~230 for 10x at 1.01),
    ``reference_eps``, ``low_rank`` (False: AdamW group) and ``seed``. Non-2-D parameters in a low-rank
    group are updated by AdamW. The AdamW rule is the reference's: bias-corrected, decoupled weight decay
    applied after the update, ``W <- (W - step) * (1 - lr * wd)``. ``projector`` draws P (replaceable,
    e.g. to give the reference the same P); ``fused=False`` turns off the Triton kernels that serve
    16-bit CUDA gradients.

    Deliberate differences from the reference (apollo-torch 1.0.3, ``apollo_torch.apollo.AdamW``):
    moments are fp32 whatever the parameter dtype; P comes from ``projector(seed, param_index, refresh,
    rank, dim)``, drawn on the CPU, so CPU and CUDA runs use the same P; eps is added to the
    bias-corrected sqrt(V) as in ``torch.optim.AdamW`` unless ``reference_eps=True``; the state is plain
    tensors (``exp_avg``/``exp_avg_sq`` of shape (max(m, n), rank), ``proj`` of shape (min(m, n), rank),
    ``prev_norm``, ``step``), which ``load_state_dict`` moves to each parameter's device without changing
    their dtype; there is no per-parameter host synchronisation: a step synchronises once, to decide
    whether to skip it. ``last_step_skipped`` is True when the last step found a non-finite gradient or
    update and left every parameter and every state tensor unchanged.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int = DEFAULT_RANK,
        scale_type: str = "channel",
        scale: float = 1.0,
        update_proj_gap: int = 200,
        norm_growth_limit: float | None = 1.01,
        reference_eps: bool = False,
        low_rank: bool = True,
        seed: int = 0,
        projector: Callable[..., torch.Tensor] = projection,
        fused: bool | None = None,
    ):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": rank,
                        "scale_type": scale_type, "scale": scale, "update_proj_gap": update_proj_gap,
                        "norm_growth_limit": norm_growth_limit, "reference_eps": reference_eps,
                        "low_rank": low_rank, "seed": seed}
        super().__init__(params, defaults)
        self.projector = projector
        self.fused = fused
        self.last_step_skipped = False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        b1, b2 = g["betas"]
        if g["lr"] < 0 or g["eps"] < 0 or g["weight_decay"] < 0 or not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"invalid lr, eps, weight_decay or betas in {g}")
        if g["low_rank"]:
            if g["rank"] < 1 or g["update_proj_gap"] < 1 or g["scale"] <= 0:
                raise ValueError("rank and update_proj_gap must be >= 1 and scale > 0")
            if g["scale_type"] not in ("channel", "tensor"):
                raise ValueError(f"scale_type must be 'channel' or 'tensor', not {g['scale_type']!r}")
            if g["norm_growth_limit"] is not None and g["norm_growth_limit"] < 1:
                raise ValueError("norm_growth_limit must be >= 1 or None")

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but keeps fp32 moments fp32 for bf16 parameters (torch would cast them)."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        for k, s in state_dict["state"].items():
            p = params[k]
            self.state[p] = {key: v.clone() if key == "step" else v.to(p.device, copy=True)
                             for key, v in s.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        low_rank, dense = self._buckets()
        plans = [self._plan(group, items) for group, items in low_rank]
        flags = [plan.finite for plan in plans]
        flags += [_grads_finite([g for _, g, _ in items]) for _, items in dense]
        if not flags:
            self.last_step_skipped = False
            return loss
        # the step's one host synchronisation (queueing the updates before it measured slower on an H200)
        self.last_step_skipped = not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
        if self.last_step_skipped:
            return loss
        for plan in plans:
            self._update(plan)
            step = torch.tensor(float(plan.step))  # shared: state is replaced, never changed in place
            for i, (_, _, state, _) in enumerate(plan.items):
                state.update({key: value[i] for key, value in plan.new_state.items()}, step=step)
        for group, items in dense:
            self._adamw(group, items)
        return loss

    def _buckets(self) -> tuple[list, list]:
        """Low-rank matrices bucketed by group, oriented shape, dtype, device and step (their small math is
        batched); AdamW parameters by group (foreach ops take mixed shapes)."""
        low_rank: dict[tuple, tuple[dict, list]] = {}
        dense: dict[int, tuple[dict, list]] = {}
        params = ((gi, group, p) for gi, group in enumerate(self.param_groups) for p in group["params"])
        for index, (gi, group, p) in enumerate(params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Apollo does not support sparse gradients")
            state = self.state[p]
            if group["low_rank"] and p.ndim == 2:
                key = (gi, tuple(_oriented(p).shape), p.grad.dtype, p.device,
                       int(state.get("step", 0)), "prev_norm" in state)
                low_rank.setdefault(key, (group, []))[1].append((p, p.grad, state, index))
            else:
                dense.setdefault(gi, (group, []))[1].append((p, p.grad, state))
        return list(low_rank.values()), list(dense.values())

    def _draw(self, group: dict, indices: list[int], refresh: int, dim: int) -> torch.Tensor:
        """(K, dim, rank) projections; drawn in threads, as CPU draws for a large model take ~1 s serially."""
        def draw(i: int) -> torch.Tensor:
            return self.projector(group["seed"], i, refresh, group["rank"], dim)

        with ThreadPoolExecutor(max_workers=min(len(indices), os.cpu_count() or 1)) as pool:
            return torch.stack(list(pool.map(draw, indices)))

    def _plan(self, group: dict, items: list) -> _Plan:
        """Compute a bucket's new state and update coefficients without touching parameters or state."""
        states = [s for _, _, s, _ in items]
        grads = [_oriented(g) for _, g, _, _ in items]
        b1, b2 = group["betas"]
        t = int(states[0].get("step", 0)) + 1
        gap = group["update_proj_gap"]
        if (t - 1) % gap == 0 or not all("proj" in s for s in states):
            proj = self._draw(group, [i for *_, i in items], (t - 1) // gap, grads[0].shape[1])
            proj = proj.to(grads[0].device, grads[0].dtype, non_blocking=True)  # no host sync
        else:
            proj = _stacked([s["proj"] for s in states])
        fused = self._use_kernels(grads[0])
        channel = group["scale_type"] == "channel"
        k = len(items)
        eps = group["eps"] if group["reference_eps"] else group["eps"] * math.sqrt(1 - b2**t)
        moments = None
        if "exp_avg" in states[0]:
            moments = _stacked([s["exp_avg"] for s in states]), _stacked([s["exp_avg_sq"] for s in states])
        if fused:
            m, v, norms = _fused_project(grads, proj, moments, b1, b2, eps)
            u_norm, r_norm, gnorm = (norms if channel else norms.sum(2, keepdim=True)).sqrt()
            finite = torch.isfinite(r_norm).all()  # R**2 finite => the new moments are finite
        else:
            r = torch.stack([_project(g, q) for g, q in zip(grads, proj)])
            m, v = moments or (torch.zeros_like(r), torch.zeros_like(r))
            m = torch.mul(m, b1).add_(r, alpha=1 - b1)
            v = torch.mul(v, b2).addcmul_(r, r, value=1 - b2)
            u = m / v.sqrt().add_(eps)
            dims = -1 if channel else (1, 2)
            u_norm, r_norm = (torch.linalg.vector_norm(x, dim=dims).view(k, -1) for x in (u, r))
            gnorm = None  # computed below if the limiter needs it
            finite = torch.isfinite(v).all()  # v finite => r and m finite
        s = u_norm / (r_norm + 1e-8)
        new_state = {"exp_avg": m, "exp_avg_sq": v, "proj": proj}

        gamma = group["norm_growth_limit"]
        if gamma is not None:
            # norms in the gradient's dtype (accumulated in fp32): fp32 outputs take a slow path on CPU
            if gnorm is None and channel:
                gnorm = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in grads]).float()
            elif gnorm is None:
                gnorm = torch.stack(torch._foreach_norm(grads)).float().view(k, 1)
            dnorm = torch.linalg.vector_norm(s * gnorm, dim=1)  # ||grad * s||
            if "prev_norm" in states[0]:
                prev = _stacked([st["prev_norm"] for st in states])
                limit = (dnorm / (prev + 1e-8)).clamp_(min=gamma) / gamma
                s = s / limit[:, None]
                dnorm = dnorm / limit
            new_state["prev_norm"] = dnorm

        step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
        decay = 1 - group["lr"] * group["weight_decay"]
        coef = s * (-step_size * math.sqrt(group["scale"]) * decay)
        if not fused:  # torch's mixed-dtype in-place update is much slower (over 10x on CPU)
            coef = coef.to(grads[0].dtype)
        finite &= torch.isfinite(coef).all()
        if "prev_norm" in new_state:
            finite &= torch.isfinite(new_state["prev_norm"]).all()
        return _Plan(group, items, t, new_state, coef, finite, fused)

    def _use_kernels(self, grad: torch.Tensor) -> bool:
        """The Triton kernels serve 16-bit CUDA gradients unless fused=False."""
        return (self.fused is not False and triton is not None and grad.is_cuda
                and grad.dtype in (torch.bfloat16, torch.float16))

    def _update(self, plan: _Plan) -> None:
        """Update a bucket's weights in place."""
        if plan.fused:
            alpha = -plan.group["lr"] * plan.group["weight_decay"]
            _fused_update([p for p, *_ in plan.items], [g for _, g, *_ in plan.items], plan.coef, alpha)
            return
        _decay([p for p, *_ in plan.items], plan.group)
        for (p, g, *_), c in zip(plan.items, plan.coef):
            _oriented(p).addcmul_(_oriented(g), c[:, None])

    def _adamw(self, group: dict, items: list) -> None:
        """In-place AdamW (the reference's variant) with fp32 moments."""
        params, grads, states = (list(x) for x in zip(*items))
        b1, b2 = group["betas"]
        for p, s in zip(params, states):
            if "exp_avg" not in s:
                s["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                s["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        steps = [int(s.get("step", 0)) + 1 for s in states]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        eps = group["eps"]
        torch._foreach_add_(denom, [eps if group["reference_eps"] else eps * math.sqrt(1 - b2**t)
                                    for t in steps])
        decay = 1 - group["lr"] * group["weight_decay"]
        _decay(params, group)
        torch._foreach_addcdiv_(params, m, denom,
                                [-decay * group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t) for t in steps])
        for s, t in zip(states, steps):
            s["step"] = torch.tensor(float(t))


def _decay(params: list[torch.Tensor], group: dict) -> None:
    """W <- W - lr * wd * W, before the update (the update's coefficient carries the same factor), so that
    together W <- (W - update) * (1 - lr * wd) as in the reference. W * (1 - lr * wd) would round the
    factor to fp32 and bias the decay."""
    if group["weight_decay"]:
        torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])


def _grads_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """True when every gradient is finite (max-norms are exact and cannot overflow)."""
    return torch.isfinite(torch.stack(torch._foreach_norm(grads, math.inf))).all()


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a module whose class name ends in Linear (vLLM's parallel linear layers)."""
    return isinstance(module, nn.Linear) or type(module).__name__.endswith("Linear")


def param_groups_for(model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]], *,
                     weight_decay: float = 0.0, **low_rank_options) -> list[dict]:
    """Split trainable parameters into an APOLLO group and AdamW groups.

    APOLLO: 2-D weights of linear layers (for a module: nn.Linear-like modules; for (name, param) pairs:
    2-D tensors named ``*weight``), except embeddings, ``lm_head`` / output embeddings and anything sharing
    storage with an embedding (tied weights). AdamW: everything else; weight decay only for tensors with
    ndim >= 2, none for biases, norms and other 1-D tensors. ``low_rank_options`` (rank, scale_type, ...)
    go into the APOLLO group.
    """
    if isinstance(model_or_named_params, nn.Module):
        model = model_or_named_params
        named = list(model.named_parameters())
        linear = {id(m.weight) for m in model.modules()
                  if _is_linear(m) and isinstance(m.weight, torch.Tensor)}
        embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
        for get in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, get, lambda: None)()
            if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
                embeddings.append(module.weight)
    else:
        named = list(model_or_named_params)
        linear = {id(p) for name, p in named if name.endswith("weight")}
        embeddings = [p for name, p in named if "embed" in name]
    embedding_storage = {e.untyped_storage().data_ptr() for e in embeddings}

    low, dense_decay, dense = [], [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if (p.ndim == 2 and id(p) in linear and "lm_head" not in name and "embed" not in name
                and p.untyped_storage().data_ptr() not in embedding_storage):
            low.append(p)
        elif p.ndim >= 2:
            dense_decay.append(p)
        else:
            dense.append(p)
    groups = [{"params": low, "low_rank": True, "weight_decay": weight_decay, **low_rank_options},
              {"params": dense_decay, "low_rank": False, "weight_decay": weight_decay},
              {"params": dense, "low_rank": False, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, name: str, lr: float, **kw) -> torch.optim.Optimizer:
    """Build one of OPTIMIZERS for ``model``'s trainable parameters.

    "apollo": rank DEFAULT_RANK, channel scaling; "apollo-mini": APOLLO_MINI; "adamw": torch.optim.AdamW
    with the same weight-decay split. Caveat: torch.optim.AdamW keeps its moments in the parameter dtype,
    so for bf16 weights V barely decays (0.999 * v rounds back to v); cast the model to fp32 or use Apollo,
    whose AdamW groups keep fp32 moments. ``kw`` goes to the optimizer; ``weight_decay`` also picks groups.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}, expected one of {OPTIMIZERS}")
    weight_decay = kw.pop("weight_decay", 0.0)
    groups = param_groups_for(model, weight_decay=weight_decay)
    if name == "adamw":
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]
        return torch.optim.AdamW(groups, lr=lr, **kw)
    preset = APOLLO_MINI if name == "apollo-mini" else {"rank": DEFAULT_RANK, "scale_type": "channel"}
    return Apollo(groups, lr=lr, **{**preset, **kw})


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of tensors in ``opt.state``, also those held by objects there (the reference's projector)."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)
        elif hasattr(value, "__dict__"):
            yield from (v for v in vars(value).values() if isinstance(v, torch.Tensor))

    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in tensors(s))
