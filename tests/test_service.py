"""The worker's job loop on a model loaded with transformers: what happens to a job that runs out of memory."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from apollo_train.shared.config import Settings
from worker.examples import Encoded
from worker.jobs import Job
from worker.param_groups import make_optimizer
from worker.registry import DedupeRegistry
from worker.replay import ReplayBuffer
from worker.service import TrainingService
from worker.trainer import Trainer
from worker.training_setup import Rank


def service_on(model, run_dir) -> TrainingService:
    """A TrainingService whose model is `model` (no vLLM): the parts run_job uses."""
    settings = Settings()
    service = TrainingService(str(run_dir), settings)
    service.model, service.rank = model, Rank(attached=None)
    service.optimizer = make_optimizer(model, "apollo", lr=1e-3)
    service.trainer = Trainer(model, service.optimizer, max_tokens_per_step=4096)
    service.registry, service.replay = DedupeRegistry(None), ReplayBuffer(0)
    return service


def job(n: int) -> Job:
    encoded = [Encoded(input_ids=list(range(1, 30)), target_start=10, key=f"k{n}")]
    return Job("train", {"encoded": encoded, "epochs": 1, "lr": None, "keys": [e.key for e in encoded]},
               result={"accepted": 1, "losses": [], "steps": 0})


class OutOfMemoryInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.90 GiB")


def test_a_job_out_of_memory_fails_with_the_fix_and_the_worker_goes_on(tiny_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"))
    service = service_on(model, tmp_path)
    # the backward pass fails at the first layer, after the layers above it were stepped
    hook = model.model.layers[0].register_forward_hook(lambda m, args, out: OutOfMemoryInBackward.apply(out))
    failed = job(1)
    service.run_job(failed)
    hook.remove()
    assert failed.state == "failed" and "ran out of GPU memory (CUDA out of memory. Tried to allocate 2.90 GiB)" in \
        failed.error and "--gpu-memory-utilization" in failed.error and "the worker goes on" in failed.error
    assert all(p.grad is None for p in model.parameters())  # what it took was freed
    assert service.state == "idle" and "k1" not in service.pending_keys

    done = job(2)
    service.run_job(done)
    assert done.state == "done" and done.result["steps"] == 1
    assert service.counters["step"] == 1  # the step that failed is not counted
