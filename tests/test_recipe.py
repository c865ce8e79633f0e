"""The recipe's job loop on a model loaded with transformers: what happens to a job that runs out of memory."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from apollo_train.shared.config import Settings
from worker.chat_tokens import Encoded
from worker.jobs import Job, JobQueue, TrainWork
from worker.param_groups import make_optimizer
from worker.recipe import Recipe
from worker.trainer import Trainer
from worker.training_setup import Rank


def recipe_on(model, run_dir) -> Recipe:
    """Rank 0's Recipe with `model` in place of views of vLLM's weights: what run_job uses."""
    recipe = Recipe(str(run_dir), 0, Settings(), jobs=JobQueue(4))
    recipe.model, recipe.me = model, Rank(attached=None)
    recipe.optimizer = make_optimizer(model, "apollo", lr=1e-3)
    recipe.trainer = Trainer(model, recipe.optimizer, max_tokens_per_step=4096)
    return recipe


def job(n: int) -> Job:
    encoded = [Encoded(input_ids=list(range(1, 30)), target_start=10, key=f"k{n}")]
    return Job.of(TrainWork(encoded=encoded, epochs=1, lr=None, keys=[e.key for e in encoded]),
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
    recipe = recipe_on(model, tmp_path)
    # the backward pass fails at the first layer, after the layers above it were stepped
    hook = model.model.layers[0].register_forward_hook(lambda m, args, out: OutOfMemoryInBackward.apply(out))
    failed = job(1)
    recipe.run_job(failed)
    hook.remove()
    assert failed.state == "failed" and "ran out of GPU memory (CUDA out of memory. Tried to allocate 2.90 GiB)" in \
        failed.error and "--gpu-memory-utilization" in failed.error and "the worker goes on" in failed.error
    assert all(p.grad is None for p in model.parameters())  # what it took was freed
    assert recipe.state.phase == "idle" and "k1" not in recipe.state.pending_keys

    done = job(2)
    recipe.run_job(done)
    assert done.state == "done" and done.result["steps"] == 1
    assert recipe.state.counters["step"] == 1  # the step that failed is not counted
