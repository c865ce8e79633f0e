"""vLLM must compute with the very tensors the training worker writes.

On CPU, vLLM's post-loading step repacks each linear weight for oneDNN/AMX into a private copy and
empties `layer.weight`; the logits layer keeps its weight but also computes with a packed copy. There
is no option to turn this off. vLLM does honour a per-layer flag, `_cpu_skip_gemm_dispatch`, that
makes a linear layer keep its plain `[out, in]` weight and compute with `F.linear` (it exists for
MLA's kv_b_proj): `keep_plain` sets it on every unquantized linear layer of the model our loader
builds, before post-processing, and `drop_packed_copies` points the logits layers back at their own
weight after it. This is the one place that relies on an attribute of vLLM's that is not a public
interface, so `check_writes_reach_compute` proves at every start that a write into the shared
weights changes what vLLM computes, and training is refused with the reason otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ComputeMismatch(RuntimeError):
    """vLLM computes with something other than the shared weights."""


def _linear_method():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    return UnquantizedLinearMethod


def _embedding_method():
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    return UnquantizedEmbeddingMethod


def keep_plain(model: torch.nn.Module) -> None:
    """Before post-processing, on CPU: linear layers keep their weight and compute with F.linear."""
    linear = _linear_method()
    for module in model.modules():
        if isinstance(getattr(module, "quant_method", None), linear):
            module._cpu_skip_gemm_dispatch = True


def drop_packed_copies(model: torch.nn.Module) -> None:
    """After post-processing, on CPU: the logits layers compute with their own (shared) weight."""
    embedding = _embedding_method()
    for module in model.modules():
        if isinstance(getattr(module, "quant_method", None), embedding) and hasattr(module, "cpu_linear"):
            module.cpu_linear = F.linear


def check_writes_reach_compute(model: torch.nn.Module) -> None:
    """Zero one output row of the first linear layer and of the logits layer, in place, and check
    that vLLM's own compute for that layer (its quant method's `apply`) sees it; then restore the
    row bit for bit."""
    linear, embedding = _linear_method(), _embedding_method()
    checked = []
    for kind in (linear, embedding):
        layer = next((m for m in model.modules() if isinstance(getattr(m, "quant_method", None), kind)
                      and getattr(m, "weight", None) is not None and m.weight.dim() == 2 and m.weight.numel()),
                     None)
        if layer is not None:
            _check_layer(layer)
            checked.append(type(layer).__name__)
    if not checked:
        raise ComputeMismatch("found no unquantized linear or logits layer to check that writes reach vLLM's compute")


@torch.no_grad()
def _check_layer(layer: torch.nn.Module) -> None:
    weight = layer.weight
    x = torch.randn(2, weight.shape[1], dtype=weight.dtype, device=weight.device)
    before = layer.quant_method.apply(layer, x)
    saved = weight[0].clone()
    weight[0].zero_()
    try:
        after = layer.quant_method.apply(layer, x)
    finally:
        weight[0].copy_(saved)
    bias = getattr(layer, "bias", None)
    expected = (bias[0] if bias is not None else torch.zeros((), device=x.device)).to(after.dtype).expand(2)
    if not (torch.equal(after[:, 0], expected) and torch.equal(after[:, 1:], before[:, 1:])):
        raise ComputeMismatch(
            f"a write into the shared weight of {type(layer).__name__} did not change what vLLM computes with it "
            f"(this vLLM build computes with a private copy of the weights); in-place training cannot reach it"
        )
