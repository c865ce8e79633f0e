"""A transformers model of a checkpoint's architecture, built on the meta device: its modules and shapes
without memory for its weights. The training worker binds its parameters to views of vLLM's weights
(worker/views.py); inside vLLM, random weights of a config-only model directory are drawn from it module
by module (vllm_worker/random_weights.py)."""

from __future__ import annotations

import torch


def meta_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """ValueError naming the class when this transformers has none for `config.architectures`."""
    import transformers

    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no model class {arch!r} for this checkpoint")
    with torch.device("meta"):
        return cls._from_config(config, dtype=dtype)
