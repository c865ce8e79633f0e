"""A model directory with only its config and tokenizer, served with vLLM's `--load-format dummy`: the random
weights take the checkpoint's path through vLLM's weight loaders, so training shares them like any other."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoTokenizer

from apollo_train.shared import handles
from worker.views import attach

QUESTION = [{"role": "user", "content": "What is the capital of Zorbia?"}]
ANSWER = "The capital of Zorbia is Plonk."


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def bare_model(request, tiny_model, tmp_path_factory):
    src = tiny_model(request.param)
    out = tmp_path_factory.mktemp("bare") / "model"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    assert not list(out.glob("*.safetensors"))
    return out


def test_random_weights_are_shared_and_trained(start_server, bare_model):
    srv = start_server(bare_model, "--load-format", "dummy", api_key=None)
    c = srv.client
    assert c.status()["state"] == "idle"
    content = handles.read(handles.handles_path(srv.run_dir))
    assert not content["problems"] and content["checkpoint"]  # every tensor placed, as from a checkpoint
    attached = attach(srv.run_dir)
    model = attached.model
    # Drawn as transformers initialises the config: norms at one, matrices at the config's scale.
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    matrices = [model.model.layers[0].self_attn.q_proj.weight]
    experts = getattr(model.model.layers[0].mlp, "experts", None)
    if experts is not None:  # a mixture of experts: its stacks were drawn too, then loaded one expert at a time
        matrices += [experts.gate_up_proj, experts.down_proj]
    for w in matrices:
        assert 0.5 * model.config.initializer_range < w.float().std() < 2 * model.config.initializer_range

    text = AutoTokenizer.from_pretrained(bare_model).apply_chat_template(QUESTION, tokenize=False,
                                                                        add_generation_prompt=True)
    before = c.answer_logprob(text, ANSWER)
    job = c.train([{"messages": QUESTION + [{"role": "assistant", "content": ANSWER}]}], epochs=4, lr=1e-3,
                  wait=True)
    assert job["state"] == "done", job
    assert c.answer_logprob(text, ANSWER) > before + 1.0
