"""A HuggingFace model whose weights are one rank's shards, made to compute what the whole model does.

Megatron-style, with the layouts vLLM chose: a linear layer holding a range of output rows
(column-parallel: q/k/v, gate/up) reads the full input and writes this rank's heads or channels; one
holding a range of input columns (row-parallel: o_proj, down_proj) reads this rank's part and its outputs
are summed over the ranks. The vocabulary is split by rows: the embedding looks up the rank's own tokens,
the output layer gives the rank's logits, and the loss combines them across ranks. Two collectives carry
all of it: "copy" (identity forward, all-reduce of the gradient backward) where a rank's region starts,
and "reduce" (all-reduce forward, identity backward) where it ends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from worker.tensor_parallel.shards import Box


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity forward; the gradient summed over the ranks backward (the input of column-parallel layers)."""
    return _Copy.apply(x, group)


def reduce_from_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Summed over the ranks forward; identity backward (the output of row-parallel layers)."""
    return _Reduce.apply(x, group)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, plus the bias once."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group=None):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_ranks(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding: each rank looks up its own tokens, zeros elsewhere, summed."""

    def __init__(self, weight: nn.Parameter, start: int, group=None):
        super().__init__()
        self.weight, self.start, self.group = weight, start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine.unsqueeze(-1)
        return reduce_from_ranks(out, self.group)


class VocabParallelHead(nn.Module):
    """The output layer's rows [start, start + n): this rank's logits, and a cross-entropy over all ranks'."""

    def __init__(self, weight: nn.Parameter, start: int, group=None):
        super().__init__()
        self.weight, self.start, self.group = weight, start, group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_ranks(hidden, self.group), self.weight)

    def cross_entropy_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed float32 cross-entropy of the whole vocabulary's logits, from each rank's part of them."""
        logits = self(hidden).float()
        top = logits.detach().max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        shifted = logits - top.unsqueeze(-1)
        total = reduce_from_ranks(shifted.exp().sum(-1), self.group)
        local = targets - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        picked = shifted.gather(-1, local.clamp(0, self.weight.shape[0] - 1).unsqueeze(-1)).squeeze(-1) * mine
        return (total.log() - reduce_from_ranks(picked, self.group)).sum()


def parallelize(model: nn.Module, boxes: dict[str, Box], group=None) -> set[str]:
    """Make `model`, whose parameters are this rank's boxes (by name), compute the whole model's function.

    A block holding a row-parallel layer (attention, MLP) is a region: its activations are this rank's
    heads or channels, so every other linear layer in it reads its input through `copy_to_ranks` (also k
    and v held whole when there are fewer KV heads than ranks). Returns the names of the parameters inside
    regions, whose gradients cover this rank's heads only (see shards.Shards)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}

    def split(module: nn.Module) -> int | None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) not in names:
            return None
        return boxes[names[id(weight)]].split_dim()

    def replace(name: str, new: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)

    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    row_parallel = {name for name, m in modules.items() if isinstance(m, nn.Linear) and split(m) == 1}
    regions = {name.rpartition(".")[0] for name in row_parallel}
    for name, module in modules.items():
        dim, in_region = split(module), name.rpartition(".")[0] in regions
        start = boxes[names[id(module.weight)]].start[0] if dim == 0 else 0
        if isinstance(module, nn.Embedding) and dim == 0:
            replace(name, VocabParallelEmbedding(module.weight, start, group))
        elif module is head and isinstance(module, nn.Linear) and dim == 0:
            replace(name, VocabParallelHead(module.weight, start, group))
        elif isinstance(module, nn.Linear) and dim == 1:
            replace(name, RowParallelLinear(module.weight, module.bias, group))
        elif isinstance(module, nn.Linear) and (dim == 0 or in_region):
            module.register_forward_pre_hook(lambda m, args: (copy_to_ranks(args[0], group), *args[1:]))
        elif dim is not None:
            raise ValueError(f"{name} ({type(module).__name__}) is split across tensor-parallel ranks in a way "
                             f"in-place training does not support")
        if hasattr(module, "num_key_value_groups") and hasattr(module, "k_proj"):
            module.num_key_value_groups = module.q_proj.weight.shape[0] // module.k_proj.weight.shape[0]
    row_biases = {f"{name}.bias" for name in row_parallel}  # added after the sum: complete on every rank
    return {n for n in names.values() if any(n.startswith(r + ".") for r in regions) and n not in row_biases}
