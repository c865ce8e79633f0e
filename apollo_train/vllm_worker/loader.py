"""The model loader that shares what it loads: `--load-format apollo_train` (or `apollo_train_dummy`).

It is vLLM's default loader (registered through `register_model_loader`, vLLM's extension point for
load formats) with three additions, all on the model it builds:
- every checkpoint tensor is wrapped while vLLM's own weight loaders copy it in, so we learn where
  each lands in the fused parameters (weight_tracking.py);
- on CPU, linear layers and mixtures of experts keep plain weights instead of private repacked copies
  (plain_weights.py, plain_experts.py);
- once the weights are processed, they are shared with the training worker and a handles file is
  written (export.py).
`apollo_train_dummy` reads no checkpoint: it draws random weights of the config's shapes and feeds
them through the same path (random_weights.py), for shapes whose checkpoints are not on disk.
`apollo-train serve` selects these formats in place of vLLM's `auto`/`safetensors` and `dummy`.
"""

from __future__ import annotations

import copy
import logging
import os

from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.platforms import current_platform

from apollo_train.shared.config import LOAD_FORMAT, LOAD_FORMAT_RANDOM, RUN_DIR_ENV
from apollo_train.vllm_worker import export, plain_experts, plain_weights
from apollo_train.vllm_worker.random_weights import random_checkpoint
from apollo_train.vllm_worker.weight_tracking import LoadRecorder

log = logging.getLogger("apollo_train")


@register_model_loader(LOAD_FORMAT)
class SharedWeightsLoader(DefaultModelLoader):
    """Loads the checkpoint like vLLM's default loader and shares the weights with the training worker."""

    random = False

    def __init__(self, load_config):
        # vLLM's default loader picks checkpoint files by the load format's name: read them as `auto` does.
        as_auto = copy.copy(load_config)
        as_auto.load_format = "auto"
        super().__init__(as_auto)
        self._recorder: LoadRecorder | None = None
        self._loaded: dict | None = None

    def download_model(self, model_config) -> None:
        if not self.random:
            super().download_model(model_config)

    def get_all_weights(self, model_config, model):
        if self.random:
            device = next(model.parameters()).device
            weights = random_checkpoint(model_config.model, model_config.dtype, device, model_config.seed or 0)
        else:
            weights = super().get_all_weights(model_config, model)
        return self._recorder.wrap_iterator(weights) if self._recorder is not None else weights

    def create_model(self, vllm_config, model_config, prefix: str = ""):
        model = super().create_model(vllm_config, model_config, prefix)
        if current_platform.is_cpu():
            plain_weights.keep_plain(model)
            plain_experts.keep_plain(model)
        return model

    def load_weights(self, model, model_config) -> None:
        super().load_weights(model, model_config)
        if self._recorder is not None:
            self._loaded = export.record_loaded(model, self._recorder)

    def load_model(self, vllm_config, model_config, prefix: str = ""):
        main = model_config is vllm_config.model_config  # not a speculative-decoding draft
        self._recorder = LoadRecorder() if main else None
        try:
            model = super().load_model(vllm_config, model_config, prefix)
        finally:
            self._recorder = None
        if current_platform.is_cpu():
            plain_weights.drop_packed_copies(model)
        if main:
            export.export(model, vllm_config, self._loaded, os.environ[RUN_DIR_ENV])
            self._loaded = None
        return model


@register_model_loader(LOAD_FORMAT_RANDOM)
class RandomSharedWeightsLoader(SharedWeightsLoader):
    """Random weights of the config's shapes (vLLM's `dummy`), shared like a checkpoint's."""

    random = True

