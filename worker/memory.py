"""What the training worker needs on a GPU, set against what vLLM left free, at start.

vLLM takes `--gpu-memory-utilization` of the GPU for weights, activations and KV cache; the worker
lives in the rest. Its needs, above the shared weights: the optimizer state, the gradients that exist
at once (a few parameters' with the step in backward, all of them without), and the activations of a
step of `--train-max-tokens-per-step` tokens (the decoder layers' inputs and one layer's working set
with activation checkpointing). An estimate, meant to say so at start when it will not fit.
"""

from __future__ import annotations

import math

import torch

from apollo_train.shared.config import Settings
from worker.governor import decoder_layers
from worker.trainer import LOSS_CHUNK_TOKENS

GiB = 1 << 30
FIX = ("start vLLM with a lower --gpu-memory-utilization, or lower --train-max-tokens-per-step, or use "
       "--train-optimizer apollo-mini / --train-freeze-embeddings")


def estimate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, settings: Settings) -> dict[str, int]:
    """Bytes by part: optimizer state, gradients, activations."""
    state = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            shape = optimizer.state_shape(p)  # a tensor-parallel shard's state is its whole matrix's
            stacked = group.get("experts") and len(shape) == 3  # one matrix per expert
            count, shape = (shape[0], shape[1:]) if stacked else (1, shape)
            if group.get("low_rank") and len(shape) == 2:
                rank = group["rank"]  # fp32 moments of the projected gradient, the projection in its dtype
                state += count * rank * (8 * max(shape) + p.element_size() * min(shape))
            else:
                state += 8 * math.prod(shape)  # fp32 moments
    trainable = [p for p in model.parameters() if p.requires_grad]
    if settings.step_in_backward and not settings.barrier:  # a layer's at once, and the largest other tensor
        layers = [sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
                  for layer in decoder_layers(model)]
        gradients = max(layers, default=0) + max((p.numel() * p.element_size() for p in trainable), default=0)
    else:  # the step after backward: every gradient at once
        gradients = sum(p.numel() * p.element_size() for p in trainable)
    shards = [p for g in optimizer.param_groups for p in g["params"] if optimizer.state_shape(p) != tuple(p.shape)]
    if shards:  # a shard's step gathers its whole gradient and weight
        gradients += 2 * max(math.prod(optimizer.state_shape(p)) * p.element_size() for p in shards)
    config = model.config.get_text_config()
    tokens, hidden, layers = settings.max_tokens_per_step, config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    element = next(model.parameters()).element_size()
    one_layer = 4 * tokens * (6 * hidden + 3 * intermediate) * element  # forward, recomputed, and its gradients
    if settings.activation_checkpointing:
        activations = tokens * hidden * layers * element + one_layer
    else:
        activations = layers * one_layer
    activations += 2 * LOSS_CHUNK_TOKENS * config.vocab_size * 4  # one chunk of float32 logits and their gradient
    return {"optimizer_state": state, "gradients": gradients, "activations": activations}


def check(model: torch.nn.Module, optimizer: torch.optim.Optimizer, settings: Settings,
          free: int | None = None) -> str | None:
    """A warning when the estimate exceeds `free` bytes, by default the free memory of the model's GPU (None
    on a CPU, or if it fits)."""
    device = next(model.parameters()).device
    if free is None:
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
    parts = estimate(model, optimizer, settings)
    need = sum(parts.values())
    if need <= free:
        return None
    detail = ", ".join(f"{k.replace('_', ' ')} {v / GiB:.1f}" for k, v in parts.items())
    return (f"training may run out of GPU memory: it needs about {need / GiB:.1f} GiB ({detail}) and vLLM left "
            f"{free / GiB:.1f} GiB free; {FIX}")


def out_of_memory(exc: Exception, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  settings: Settings) -> str:
    """Why a job failed for GPU memory, and the fix (after the worker freed what the job took)."""
    device = next(model.parameters()).device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    need = sum(estimate(model, optimizer, settings).values())
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    barrier = (" (the step barrier keeps every gradient until the step; --no-train-barrier steps each layer "
               "inside the backward pass)" if settings.barrier else "")
    return (f"the job ran out of GPU memory ({first}); training needs about {need / GiB:.1f} GiB above the "
            f"shared weights{barrier}" + (f" and {free / GiB:.1f} GiB is free now" if free is not None else "")
            + f"; {FIX}. The job's steps before this one were kept; the worker goes on")
