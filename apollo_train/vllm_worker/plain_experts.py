"""On CPU, a mixture of experts' weights kept in the layout they loaded in, so the training worker can share them.

vLLM's CPU build repacks each MoE layer's expert weights (`w13_weight` [experts, 2 x intermediate,
hidden], `w2_weight` [experts, hidden, intermediate]) into its grouped-GEMM kernel's private layout,
which no view can follow. Our loader gives every unquantized MoE layer of the model it builds a quant
method of ours instead (through the layer's own `_replace_quant_method`), before post-processing: it
keeps the weights as loaded and computes the routed experts with plain torch ops, reading the weights
at every call, so a write into them is seen by the next forward pass. It is slower than the packed
kernel; it exists so that experts can be trained in place on a CPU. Shared experts are computed by
vLLM's runner as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _method_class():
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    class PlainExpertsMethod(UnquantizedFusedMoEMethod):
        """Unquantized experts in their loaded layout, computed with torch."""

        def process_weights_after_loading(self, layer) -> None:
            return  # no padding, no repacking: the weights stay what the checkpoint loaded

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            return routed_experts(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                                  layer.activation.value, layer.apply_router_weight_on_input)

    return PlainExpertsMethod


def keep_plain(model: torch.nn.Module) -> int:
    """Before post-processing, on CPU: unquantized MoE layers keep their expert weights as loaded; returns how
    many layers."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    plain = _method_class()
    layers = [m for m in model.modules() if type(getattr(m, "quant_method", None)) is UnquantizedFusedMoEMethod]
    for layer in layers:
        layer._replace_quant_method(plain(layer.quant_method.moe))
    return len(layers)


def routed_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, activation: str, weights_on_input: bool) -> torch.Tensor:
    """sum over a token's chosen experts e of weight_e * down_e(act(gate_e(x)) * up_e(x)), expert by expert."""
    if activation != "silu":
        raise NotImplementedError(f"plain experts compute the silu activation, not {activation!r}")
    out = torch.zeros_like(x)
    for e in topk_ids.unique().tolist():
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        if not weights_on_input:  # else the router's weight was applied to x already
            y = y * topk_weights[token, slot, None].to(y.dtype)
        out.index_add_(0, token, y)
    return out
