"""APOLLO and APOLLO-Mini (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270).

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
from typing import NamedTuple

import torch

try:
    from worker.optim import kernels
except ModuleNotFoundError as exc:  # no Triton: the plain torch implementation only
    if exc.name != "triton":
        raise
    kernels = None

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


class Apollo(torch.optim.Optimizer):
    r"""APOLLO / APOLLO-Mini for the 2-D weights of ``low_rank`` groups, AdamW for every other parameter.

    For a matrix W viewed as m x n with m >= n (the transpose otherwise), gradient G, step t = 1, 2, ...,
    rank r, betas (b1, b2), refresh gap T, limiter gamma::

        Q      = projection(seed, index, (t - 1) // T, r, n)      n x r, redrawn when (t - 1) % T == 0
        R      = G Q                                               m x r
        M      = b1 M + (1 - b1) R
        V      = b2 V + (1 - b2) R**2
        U      = M / (sqrt(V) + eps sqrt(1 - b2**t))               eps unscaled with reference_eps
        s      = ||U_i|| / (||R_i|| + 1e-8) for each row i         "channel"; "tensor": ||U|| / (||R|| + 1e-8)
        D      = s G
        if gamma and t > 1 and ||D|| > gamma N:  D = D gamma N / ||D||    (norm-growth limiter)
        N      = ||D||
        W      = (W - lr sqrt(1 - b2**t) / (1 - b1**t) sqrt(scale) D) (1 - lr weight_decay)

    and for every other parameter (AdamW, the reference's variant: decay applied after the update)::

        M      = b1 M + (1 - b1) G
        V      = b2 V + (1 - b2) G**2
        W      = (W - lr sqrt(1 - b2**t) / (1 - b1**t) M / (sqrt(V) + eps sqrt(1 - b2**t))) (1 - lr weight_decay)

    Two ways to step. ``step()`` updates every parameter that has a gradient, or, when any gradient,
    V, scale or limiter norm is not finite, nothing at all (no weight, no state): ``last_step_skipped``
    is then True. ``step_param(p)`` updates one parameter as soon as its gradient is complete (from a
    ``register_post_accumulate_grad_hook`` hook, so that the caller can free the gradient at once), and
    ``finish_param_steps()`` ends such a step; a parameter whose own update is not finite keeps its
    weights and state. Both give the same result for a finite step (see docs/optimizer.md).

    Args:
        params: parameters or param groups; every option below can be set per group.
        lr, betas, eps, weight_decay: as in AdamW (eps is added to the bias-corrected sqrt(V)).
        rank: r, the projection's rank.
        scale_type: "channel" (one scale per row of the larger side) or "tensor" (one per matrix).
        scale: the update is multiplied by sqrt(scale) (APOLLO-Mini: 128).
        update_proj_gap: T, steps between projection refreshes; the moments are kept across refreshes.
        norm_growth_limit: gamma, or None for no limiter. It compares with the previous *limited* norm,
            so a sudden k-fold rise in gradient norm takes log(k) / log(gamma) steps to pass (~230 for
            10x at 1.01).
        reference_eps: add eps to the uncorrected sqrt(V), as apollo-torch does.
        low_rank: False makes the group AdamW; non-2-D parameters of a low-rank group use AdamW too.
        experts: the group's 3-D parameters are stacks of expert matrices ([experts, m, n], a mixture of
            experts' fused weights): each expert is a matrix of its own (its projection, moments and step
            count), and an expert whose gradient is all zero (no token was routed to it) is not stepped.
        seed: seeds the projections.
        projector: draws Q as ``projector(seed, param_index, refresh, rank, dim)`` (e.g. to give the
            reference the same Q).
        fused: the Triton kernels for the low-rank matrices (16-bit CUDA gradients); None uses them
            where they can run, True raises where they cannot, False never uses them.
    """

    whole_model_step = True  # step() is available (a tensor-parallel shard's optimizer has only step_params)

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
        experts: bool = False,
        seed: int = 0,
        projector: Callable[..., torch.Tensor] = projection,
        fused: bool | None = None,
    ):
        self.fused = fused
        self.projector = projector
        self.last_step_skipped = False
        self._places: dict[torch.Tensor, tuple[int, int]] = {}  # param -> (group index, param index)
        self._pending: dict[object, _Pending] = {}  # matrices stepped by step_param(s), not yet finished
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "scale_type": scale_type, "scale": scale, "update_proj_gap": update_proj_gap,
                    "norm_growth_limit": norm_growth_limit, "reference_eps": reference_eps,
                    "low_rank": low_rank, "experts": experts, "seed": seed}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """torch's, after checking the group's options (and, with fused=True, its matrices)."""
        index = len(self.param_groups)
        _check_options({**self.defaults, **param_group}, index)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        first = len(self._places)
        self._places.update((p, (index, first + i)) for i, p in enumerate(group["params"]))
        if self.fused and group["low_rank"]:
            for i, p in enumerate(group["params"]):
                reason = _kernels_cannot_run(p) if p.ndim == 2 else None
                if reason:
                    raise ValueError(f"fused=True, but parameter {i} of param group {index} {reason}; "
                                     "pass fused=None to update such matrices with plain torch ops")

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but keeps fp32 moments fp32 for bf16 parameters (torch would cast them)."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        for k, s in state_dict["state"].items():
            self.state[params[k]] = _state_to(s, params[k].device)

    def state_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        """The shape of the matrix whose update ``p``'s state describes: ``p``'s own here (a tensor-parallel
        shard's is its whole matrix's, see worker.tensor_parallel.optimizer)."""
        return tuple(p.shape)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Update every parameter that has a gradient, or none if any update is not finite."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        low_rank, dense = self._buckets(self._matrices(
            [(p, p, p.grad) for group in self.param_groups for p in group["params"]]))
        plans = [self._plan(group, items) for group, items, _ in low_rank]
        flags = [plan.finite for plan in plans]
        flags += [_adamw_finite([g for _, g, _ in items]) for _, items, _ in dense]
        if not flags:
            self.last_step_skipped = False
            return loss
        # the step's one host synchronisation (queueing the updates before it measured slower on an H200)
        self.last_step_skipped = not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
        if self.last_step_skipped:
            return loss
        for plan in plans:
            _apply(plan, ok=None)
        for group, items, _ in dense:
            _adamw(group, items, ok=None)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Update ``p`` from ``p.grad`` now, in place; the caller may free the gradient right after.

        Finiteness is decided on the device and the update applied only where it holds, so the host
        never waits: the weights and state of a parameter whose update is not finite stay as they were,
        and its step count is restored by ``finish_param_steps()``, which must end every such step.

        The weights are written through ``p.data``, an alias with a version counter of its own: views of
        one tensor (the q, k and v blocks of vLLM's fused qkv weight) share one counter, so writing one
        of them in the backward pass would make autograd reject the unchanged weights that it saved for
        the others. ``p`` itself is written only after every backward node that uses it has run.
        """
        if p.grad is not None:
            self._step_tensors([(p, p.data, p.grad)])

    @torch.no_grad()
    def step_params(self, params: Iterable[torch.Tensor]) -> None:
        """``step_param`` for several parameters at once (a decoder layer's, once all their gradients are
        complete): same-shape matrices share each kernel launch and the small math around it, as in
        ``step()``, which saves most of the host time a step takes per parameter. Finiteness is then decided
        per bucket: a bucket (same-shape matrices, or the AdamW parameters) with a non-finite update keeps
        its weights and state."""
        self._step_tensors([(p, p.data, p.grad) for p in params if p.grad is not None])

    def _step_tensors(self, items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """``step_params`` of (parameter, weight, gradient) triples: the parameter is the state's key, the
        weight what is written (the parameter's own tensor, or, for a tensor-parallel shard, the whole
        matrix assembled from every rank's) and the gradient the matching one."""
        matrices = self._matrices(items)
        for key, _, _ in matrices:
            if key in self._pending:
                raise RuntimeError("a parameter was stepped twice in one step: its gradient grew after its step "
                                   "(reentrant activation checkpointing, or a second backward before "
                                   "finish_param_steps()); use step() after backward instead")
        before = {key: (set(state := self._state_of(key)), state.get("step")) for key, _, _ in matrices}
        low_rank, dense = self._buckets(matrices)
        for group, bucket, keys in low_rank:
            plan = self._plan(group, bucket)
            _apply(plan, plan.finite)
            self._pending.update((key, _Pending(*before[key], plan.finite)) for key in keys)
        for group, bucket, keys in dense:
            ok = _adamw_finite([g for _, g, _ in bucket])
            _adamw(group, bucket, ok)
            self._pending.update((key, _Pending(*before[key], ok)) for key in keys)

    def finish_param_steps(self) -> int:
        """End a step made by ``step_param``: read the parameters' finiteness flags (the step's one host
        synchronisation), restore the step count of those that were skipped, and return their number.
        ``last_step_skipped`` is True when every parameter was skipped."""
        pending, self._pending = self._pending, {}
        if not pending:
            self.last_step_skipped = False
            return 0
        flags = [before.ok for before in pending.values()]
        applied = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
        skipped = 0
        for (matrix, before), ok in zip(pending.items(), applied):
            if ok:
                continue
            skipped += 1
            if not before.keys:
                self._drop_state(matrix)
                continue
            state = self._state_of(matrix)
            for key in set(state) - before.keys:
                del state[key]
            state["step"] = before.step
        self.last_step_skipped = skipped == len(pending)
        return skipped

    def _matrices(self, triples) -> list[tuple[object, torch.Tensor, torch.Tensor]]:
        """(key, weight, gradient) of every matrix to step, from (parameter, weight, gradient) triples: a
        parameter is its own key; an expert stack (a parameter of an ``experts`` group, [experts, m, n]) is
        one matrix per expert that received a gradient (an `Expert` key), so that an expert no token was
        routed to in this step keeps its weights and state. Finding those costs one host synchronisation per
        stack."""
        out = []
        for p, weight, grad in triples:
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("Apollo does not support sparse gradients")
            if self.param_groups[self._places[p][0]]["experts"] and grad.ndim == 3:
                routed = grad.flatten(1).ne(0).any(1).nonzero().flatten().tolist()
                out += [(Expert(p, e), weight[e], grad[e]) for e in routed]
            else:
                out.append((p, weight, grad))
        return out

    def _state_of(self, key) -> dict:
        """A matrix's state: its parameter's, or, for an expert of a stack, that expert's own."""
        if isinstance(key, Expert):
            return self.state[key.param].setdefault("experts", {}).setdefault(key.index, {})
        return self.state[key]

    def _drop_state(self, key) -> None:
        if isinstance(key, Expert):
            del self.state[key.param]["experts"][key.index]
        else:
            del self.state[key]

    def _buckets(self, matrices: list) -> tuple[list, list]:
        """(key, weight, gradient) of matrices (``_matrices``): low-rank matrices bucketed by group, oriented
        shape, dtype, device and step (their small math is batched), as (group, items, keys); AdamW
        parameters by group (foreach ops take mixed shapes)."""
        low_rank: dict[tuple, tuple[dict, list, list]] = {}
        dense: dict[int, tuple[dict, list, list]] = {}
        for key, weight, grad in matrices:
            gi, index = self._places[key.param if isinstance(key, Expert) else key]
            if isinstance(key, Expert):  # each expert its own projection
                index = index * MAX_EXPERTS + key.index
            group, state = self.param_groups[gi], self._state_of(key)
            if group["low_rank"] and grad.ndim == 2:
                bucket = (gi, tuple(_oriented(grad).shape), grad.dtype, grad.device,
                          int(state.get("step", 0)), "prev_norm" in state)
                entry = low_rank.setdefault(bucket, (group, [], []))
                entry[1].append((weight, grad, state, index))
            else:
                entry = dense.setdefault(gi, (group, [], []))
                entry[1].append((weight, grad, state))
            entry[2].append(key)
        return list(low_rank.values()), list(dense.values())

    def _draw(self, group: dict, indices: list[int], refresh: int, dim: int) -> torch.Tensor:
        """(K, dim, rank) projections; drawn in threads, as CPU draws for a large model take ~1 s serially."""
        def draw(i: int) -> torch.Tensor:
            return self.projector(group["seed"], i, refresh, group["rank"], dim)

        with ThreadPoolExecutor(max_workers=min(len(indices), os.cpu_count() or 1)) as pool:
            return torch.stack(list(pool.map(draw, indices)))

    def _plan(self, group: dict, items: list) -> _Plan:
        """A bucket's new state and update coefficients, computed without touching parameters or state."""
        states = [s for _, _, s, _ in items]
        grads = [_oriented(g) for _, g, _, _ in items]
        b1, b2 = group["betas"]
        t = int(states[0].get("step", 0)) + 1
        old = {key: _stacked([s[key] for s in states]) for key in _STATE if all(key in s for s in states)}
        gap = group["update_proj_gap"]
        if (t - 1) % gap == 0 or "proj" not in old:
            proj = self._draw(group, [i for *_, i in items], (t - 1) // gap, grads[0].shape[1])
            proj = proj.to(grads[0].device, grads[0].dtype, non_blocking=True)  # no host sync
        else:
            proj = old["proj"]
        moments = (old["exp_avg"], old["exp_avg_sq"]) if "exp_avg" in old else None
        fused = self._uses_kernels(grads[0])
        project = _fused_project if fused else _single_tensor_project
        eps = group["eps"] if group["reference_eps"] else group["eps"] * math.sqrt(1 - b2**t)
        new = project(grads, proj, moments, b1, b2, eps, channel=group["scale_type"] == "channel",
                      grad_norms=group["norm_growth_limit"] is not None)
        coef, new_prev_norm, finite = _coefficients(group, t, new, old.get("prev_norm"))
        new_state = {"exp_avg": new.exp_avg, "exp_avg_sq": new.exp_avg_sq, "proj": proj}
        if new_prev_norm is not None:
            new_state["prev_norm"] = new_prev_norm
        return _Plan(group, items, t, old, new_state, coef, finite, fused)

    def _uses_kernels(self, grad: torch.Tensor) -> bool:
        """Whether a bucket with this (oriented) gradient takes the Triton kernels; with fused=True, raises
        where they cannot run."""
        if self.fused is False:
            return False
        reason = _kernels_cannot_run(grad)
        if reason and self.fused:
            raise RuntimeError(f"fused=True, but a gradient {reason}; pass fused=None to update such matrices "
                               "with plain torch ops")
        return reason is None


MAX_EXPERTS = 1 << 16  # an expert's projection is drawn from (its stack's index) * MAX_EXPERTS + (its own index)


class Expert:
    """The key of one expert's matrix in a stack ([experts, m, n]): its state is the stack's state
    ``["experts"][index]``."""

    __slots__ = ("param", "index")

    def __init__(self, param: torch.Tensor, index: int):
        self.param, self.index = param, index

    def __hash__(self) -> int:
        return hash((id(self.param), self.index))

    def __eq__(self, other) -> bool:
        return isinstance(other, Expert) and other.param is self.param and other.index == self.index


def _state_to(state: dict, device: torch.device) -> dict:
    """A saved state on `device` (step counts stay on the CPU), experts' sub-states too."""
    return {key: _state_to(v, device) if isinstance(v, dict) else v.clone() if key == "step"
            else v.to(device, copy=True) for key, v in state.items()}


def _check_options(group: dict, index: int) -> None:
    """Raise ValueError naming the first bad option of param group ``index``."""
    def bad(option: str, expected: str) -> ValueError:
        return ValueError(f"param group {index}: {option} must be {expected}, got {group[option]!r}")

    for option in ("lr", "eps", "weight_decay"):
        if not group[option] >= 0:
            raise bad(option, ">= 0")
    if len(group["betas"]) != 2 or not all(0 <= b < 1 for b in group["betas"]):
        raise bad("betas", "two numbers in [0, 1)")
    if not group["low_rank"]:
        return
    for option in ("rank", "update_proj_gap"):
        if not (isinstance(group[option], int) and group[option] >= 1):
            raise bad(option, "an integer >= 1")
    if not group["scale"] > 0:
        raise bad("scale", "> 0")
    if group["scale_type"] not in ("channel", "tensor"):
        raise bad("scale_type", "'channel' or 'tensor'")
    if group["norm_growth_limit"] is not None and not group["norm_growth_limit"] >= 1:
        raise bad("norm_growth_limit", ">= 1 or None")


def _kernels_cannot_run(t: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot update a matrix with this dtype and device (None: they can)."""
    if kernels is None:
        return "needs the Triton kernels, and Triton is not installed"
    if not t.is_cuda:
        return f"is on {t.device}, and the Triton kernels run on CUDA"
    if t.dtype not in (torch.bfloat16, torch.float16):
        return f"is {t.dtype}, and the Triton kernels take bfloat16 or float16"
    return None


def _oriented(x: torch.Tensor) -> torch.Tensor:
    """View a matrix as (max side, min side): the projection acts on the right, channels are rows."""
    return x.T if x.shape[0] < x.shape[1] else x


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


class _Projected(NamedTuple):
    """A bucket's new moments (K, rows, rank) and the norms (K, channels) the scales come from; channels is
    rows for channel scaling, 1 for tensor scaling."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    u_norm: torch.Tensor
    r_norm: torch.Tensor
    g_norm: torch.Tensor | None  # asked for by the limiter
    finite: torch.Tensor  # 0-d bool: R, M and V are finite


_STATE = ("exp_avg", "exp_avg_sq", "proj", "prev_norm")  # a low-rank matrix's state tensors, besides step


@dataclass
class _Pending:
    """What a parameter stepped by step_param had before its step, and whether the step was finite."""

    keys: set[str]
    step: torch.Tensor | None
    ok: torch.Tensor  # 0-d bool on the parameter's device


@dataclass
class _Plan:
    """A low-rank bucket's step, computed but not yet applied."""

    group: dict
    items: list  # (param, grad, state, index)
    step: int
    old_state: dict[str, torch.Tensor]  # (K, ...) tensors stacked from the items' state
    new_state: dict[str, torch.Tensor]  # (K, ...) tensors, slice i is item i's state
    coef: torch.Tensor  # (K, channels): update = coef * grad per row of the oriented grad
    finite: torch.Tensor  # 0-d bool
    fused: bool


def _single_tensor_project(grads: list[torch.Tensor], proj: torch.Tensor,
                           moments: tuple[torch.Tensor, torch.Tensor] | None, b1: float, b2: float, eps: float,
                           *, channel: bool, grad_norms: bool) -> _Projected:
    """R, the new moments and the norms with plain torch ops. A 16-bit R is rounded to 16 bits before it
    enters the fp32 moments (as in the reference), which avoids an fp32 copy of each gradient."""
    k = len(grads)
    r = torch.stack([(g @ q).float() for g, q in zip(grads, proj)])
    m, v = moments or (torch.zeros_like(r), torch.zeros_like(r))
    m = torch.mul(m, b1).add_(r, alpha=1 - b1)
    v = torch.mul(v, b2).addcmul_(r, r, value=1 - b2)
    u = m / v.sqrt().add_(eps)
    dims = -1 if channel else (1, 2)
    u_norm, r_norm = (torch.linalg.vector_norm(x, dim=dims).view(k, -1) for x in (u, r))
    g_norm = None
    # in the gradient's dtype (accumulated in fp32): fp32 outputs take a slow path on the CPU
    if grad_norms and channel:
        g_norm = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in grads]).float()
    elif grad_norms:
        g_norm = torch.stack(torch._foreach_norm(grads)).float().view(k, 1)
    return _Projected(m, v, u_norm, r_norm, g_norm, torch.isfinite(v).all())  # v finite => r and m finite


def _fused_project(grads: list[torch.Tensor], proj: torch.Tensor,
                   moments: tuple[torch.Tensor, torch.Tensor] | None, b1: float, b2: float, eps: float,
                   *, channel: bool, grad_norms: bool) -> _Projected:
    """R, the new moments and the norms from one read of each gradient (Triton); R stays fp32. The
    gradient norms come for free, so they are returned whether asked for or not."""
    m, v, norms = kernels.project(grads, proj, moments, b1, b2, eps)
    u_norm, r_norm, g_norm = (norms if channel else norms.sum(2, keepdim=True)).sqrt()
    return _Projected(m, v, u_norm, r_norm, g_norm, torch.isfinite(r_norm).all())  # R**2 finite => M, V finite


def _coefficients(group: dict, t: int, new: _Projected,
                  prev_norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The update's coefficient per channel (K, channels), the limiter's new norms (None without the
    limiter) and whether all of the bucket's step is finite."""
    b1, b2 = group["betas"]
    s = new.u_norm / (new.r_norm + 1e-8)
    dnorm = None
    gamma = group["norm_growth_limit"]
    if gamma is not None:
        dnorm = torch.linalg.vector_norm(s * new.g_norm, dim=1)  # ||grad * s||
        if prev_norm is not None:
            limit = (dnorm / (prev_norm + 1e-8)).clamp_(min=gamma) / gamma
            s = s / limit[:, None]
            dnorm = dnorm / limit
    step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
    decay = 1 - group["lr"] * group["weight_decay"]
    coef = s * (-step_size * math.sqrt(group["scale"]) * decay)
    finite = new.finite & torch.isfinite(coef).all()
    if dnorm is not None:
        finite &= torch.isfinite(dnorm).all()
    return coef, dnorm, finite


def _apply(plan: _Plan, ok: torch.Tensor | None) -> None:
    """Write a bucket's planned step: the weights in place, the state rebound. ``ok`` None: known to be
    finite; a device flag: written only where it holds, without the host waiting for it."""
    update = _fused_update if plan.fused else _single_tensor_update
    update([p for p, *_ in plan.items], [g for _, g, *_ in plan.items], plan.coef, plan.group, ok)
    new = plan.new_state
    if ok is not None:
        new = {key: torch.where(ok, value, plan.old_state[key]) if key in plan.old_state else value
               for key, value in new.items()}
    step = torch.tensor(float(plan.step))  # shared: state is replaced, never changed in place
    for i, (_, _, state, _) in enumerate(plan.items):
        state.update({key: value[i] for key, value in new.items()}, step=step)


def _single_tensor_update(params: list[torch.Tensor], grads: list[torch.Tensor], coef: torch.Tensor,
                          group: dict, ok: torch.Tensor | None) -> None:
    """W <- W - lr wd W + coef G in place where ``ok``, with plain torch ops."""
    coef = coef.to(grads[0].dtype)  # torch's mixed-dtype in-place update is much slower (over 10x on CPU)

    def write(weights: list[torch.Tensor]) -> None:
        _decay(weights, group)
        for w, g, c in zip(weights, grads, coef):
            _oriented(w).addcmul_(_oriented(g), c[:, None])

    _write_if(ok, params, write)


def _fused_update(params: list[torch.Tensor], grads: list[torch.Tensor], coef: torch.Tensor,
                  group: dict, ok: torch.Tensor | None) -> None:
    """W <- W - lr wd W + coef G in place where ``ok``, in fp32 with one rounding (Triton; the kernel reads
    the flag)."""
    kernels.update(params, grads, coef, -group["lr"] * group["weight_decay"], ok)


def _adamw(group: dict, items: list, ok: torch.Tensor | None) -> None:
    """AdamW (the reference's variant) with fp32 moments, in place where ``ok`` (as in _apply)."""
    params, grads, states = (list(x) for x in zip(*items))
    b1, b2 = group["betas"]
    for p, s in zip(params, states):
        if "exp_avg" not in s:
            s["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            s["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    steps = [int(s.get("step", 0)) + 1 for s in states]
    eps = group["eps"]
    eps = [eps if group["reference_eps"] else eps * math.sqrt(1 - b2**t) for t in steps]
    decay = 1 - group["lr"] * group["weight_decay"]
    step_sizes = [-decay * group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t) for t in steps]
    n = len(params)

    def write(tensors: list[torch.Tensor]) -> None:
        weights, m, v = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps)
        _decay(weights, group)
        torch._foreach_addcdiv_(weights, m, denom, step_sizes)

    _write_if(ok, params + [s["exp_avg"] for s in states] + [s["exp_avg_sq"] for s in states], write)
    for s, t in zip(states, steps):
        s["step"] = torch.tensor(float(t))


def _write_if(ok: torch.Tensor | None, tensors: list[torch.Tensor],
              write: Callable[[list[torch.Tensor]], None]) -> None:
    """``write(tensors)`` in place. With a device flag ``ok``, ``write`` works on copies that are copied
    back where ok holds, so the host never waits for the flag (under step_param: copies of one parameter's
    weights and state at a time)."""
    if ok is None:
        write(tensors)
        return
    copies = [t.clone() for t in tensors]
    write(copies)
    for t, c in zip(tensors, copies):
        t.copy_(torch.where(ok, c, t, out=c))


def _decay(params: list[torch.Tensor], group: dict) -> None:
    """W <- W - lr * wd * W, before the update (the update's coefficient carries the same factor), so that
    together W <- (W - update) * (1 - lr * wd) as in the reference. W * (1 - lr * wd) would round the
    factor to fp32 and bias the decay."""
    if group["weight_decay"]:
        torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])


def _adamw_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """True when every gradient's square is finite in fp32, and so M, V and the AdamW update are (max-norms
    are exact and cannot overflow)."""
    return torch.isfinite(torch.stack(torch._foreach_norm(grads, math.inf)).float().square()).all()
