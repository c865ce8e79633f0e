"""The worker's GPU memory estimate, said at start when training will not fit beside vLLM."""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoModelForCausalLM

from apollo_train.shared.config import Settings
from worker import memory
from worker.param_groups import make_optimizer, optimizer_state_bytes


def test_the_estimate_follows_the_settings(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"), dtype=torch.bfloat16)
    settings = Settings()
    apollo = make_optimizer(model, "apollo", 1e-3)
    parts = memory.estimate(model, apollo, settings)
    adamw = memory.estimate(model, make_optimizer(model, "adamw", 1e-3), settings)
    assert parts["optimizer_state"] < adamw["optimizer_state"]
    whole = memory.estimate(model, apollo, dataclasses.replace(settings, step_in_backward=False))
    assert whole["gradients"] == sum(p.numel() * 2 for p in model.parameters()) > parts["gradients"]
    unchecked = memory.estimate(model, apollo, dataclasses.replace(settings, activation_checkpointing=False))
    assert unchecked["activations"] > parts["activations"]
    # The state estimate is the real state after a step, give or take the step counters.
    model(torch.tensor([[1, 2, 3, 4]])).logits.float().mean().backward()
    apollo.step()
    assert abs(optimizer_state_bytes(apollo) - parts["optimizer_state"]) < 0.05 * parts["optimizer_state"]
    assert memory.check(model, apollo, settings) is None  # on a CPU there is nothing to check


def test_the_warning_when_training_will_not_fit(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"), dtype=torch.bfloat16)
    settings = Settings()
    apollo = make_optimizer(model, "apollo", 1e-3)
    need = sum(memory.estimate(model, apollo, settings).values())
    warning = memory.check(model, apollo, settings, free=need // 2)
    assert warning.startswith("training may run out of GPU memory: it needs about")
    assert "--gpu-memory-utilization" in warning and "--train-max-tokens-per-step" in warning
    assert memory.check(model, apollo, settings, free=need) is None
