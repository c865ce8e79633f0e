"""Random weights of a model's own shapes, for serving a model directory that holds only its config
(vLLM's `--load-format dummy` case) in a way training can share.

vLLM's dummy loader fills its fused tensors in place and never runs the model's weight loaders, so
nothing would tell us where q, k or v live. Instead we yield checkpoint-named tensors, initialised
the way transformers initialises a fresh model of that config, and let them take the same path as a
checkpoint read from disk (see loader.py), a mixture of experts' stacks split into the per-expert tensors
checkpoints hold. Module by module: only one module's tensors exist at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from apollo_train.shared.expert_stacks import as_checkpoint_tensors
from apollo_train.shared.meta_model import meta_model


def random_checkpoint(model_dir: str, dtype: torch.dtype, device: torch.device,
                      seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a freshly initialised transformers model of `model_dir`'s config.
    Every process that draws them gets the same values (tensor-parallel ranks take their shards)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    model = meta_model(config, dtype)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for prefix, module in model.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if not own:
                continue
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
            drawn = {f"{prefix}.{name}" if prefix else name: getattr(module, name).detach() for name in own}
            yield from as_checkpoint_tensors(drawn).items()  # experts one by one, as checkpoints hold them
            module.to_empty(device="meta", recurse=False)
