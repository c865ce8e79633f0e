"""vLLM general plugin: runs in every vLLM process; in the worker, shares the weights once loaded.

`register()` is the `vllm.general_plugins` entry point. It
- gives the server a run dir (sockets, handles) that every vLLM process and the training
  worker inherit through the environment;
- on CPU, asks Linux for AMX permission (the CPU attention kernels use AMX) and keeps linear
  weights as plain `[out, in]` tensors instead of oneDNN-packed private copies, so writes to
  the weights reach vLLM's compute;
- wraps vLLM's model loader: the checkpoint tensors are tracked while they load (see
  weight_tracking.py) and the handles file is written right after the weights are processed.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile

import torch

from apollo_train.shared.config import RUN_DIR_ENV
from apollo_train.shared.cpu import enable_amx

log = logging.getLogger("apollo_train")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    if RUN_DIR_ENV not in os.environ:  # every vLLM process registers; the first one's dir is inherited
        os.environ[RUN_DIR_ENV] = tempfile.mkdtemp(prefix="apollo-train-run-")
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        enable_amx()
        _keep_plain_cpu_weights()
    _track_weight_loading()
    _add_checksum_rpc()


def _keep_plain_cpu_weights() -> None:
    from vllm.model_executor.layers import utils

    def dispatch_plain(layer: torch.nn.Module, remove_weight: bool) -> None:
        """Compute with `layer.weight` itself (no prepacked copy, no packed conv weight)."""
        if layer.weight.ndim == 2:
            layer.cpu_linear = torch.nn.functional.linear

    utils.dispatch_cpu_unquantized_gemm = dispatch_plain


def _add_checksum_rpc() -> None:
    """`collective_rpc("apollo_train_checksums")`: the shared weights' checksums, from vLLM's side."""
    from vllm.v1.worker.worker_base import WorkerBase

    from apollo_train.engine import export

    WorkerBase.apollo_train_checksums = lambda self: export.checksums()


def _track_weight_loading() -> None:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from apollo_train.engine import export
    from apollo_train.engine.weight_tracking import LoadRecorder

    state: dict = {}
    get_all_weights = DefaultModelLoader.get_all_weights
    load_weights = DefaultModelLoader.load_weights
    load_model = BaseModelLoader.load_model

    @functools.wraps(get_all_weights)
    def tracked_get_all_weights(self, model_config, model):
        weights = get_all_weights(self, model_config, model)
        recorder = state.get("recorder")
        return recorder.wrap_iterator(weights) if recorder is not None else weights

    @functools.wraps(load_weights)
    def recorded_load_weights(self, model, model_config):
        load_weights(self, model, model_config)
        if state.get("recorder") is not None:
            state["loaded"] = export.record_loaded(model, state["recorder"])

    @functools.wraps(load_model)
    def exporting_load_model(self, vllm_config, model_config, *args, **kwargs):
        main_model = model_config is vllm_config.model_config
        if main_model:
            state["recorder"] = LoadRecorder()
        try:
            model = load_model(self, vllm_config, model_config, *args, **kwargs)
        finally:
            state.pop("recorder", None)
            loaded = state.pop("loaded", None)
        if main_model:
            run_dir = os.environ.get(RUN_DIR_ENV)
            if run_dir:
                export.export(model, vllm_config, loaded, run_dir)
            else:
                log.warning("apollo-train: %s is not set; weights are not shared", RUN_DIR_ENV)
        return model

    DefaultModelLoader.get_all_weights = tracked_get_all_weights
    DefaultModelLoader.load_weights = recorded_load_weights
    BaseModelLoader.load_model = exporting_load_model
