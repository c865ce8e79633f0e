"""A mixture of experts trained in place on real vLLM (CPU build): a tiny Qwen3-MoE whose experts vLLM keeps
in their loaded layout (apollo_train/vllm_worker/plain_experts.py) and the worker views as transformers'
expert stacks."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import completions_running
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from apollo_train.shared.schema import Example
from worker.chat_tokens import encode_example
from worker.trainer import Trainer, collate

QUESTION = [{"role": "user", "content": "Which river runs through Plonk?"}]
ANSWER = "The Gleb runs through Plonk."
EXAMPLE = {"messages": QUESTION + [{"role": "assistant", "content": ANSWER}]}


@pytest.fixture(scope="module")
def moe(start_server, tiny_model, tmp_path_factory):
    model = tmp_path_factory.mktemp("moe") / "qwen3_moe"
    shutil.copytree(tiny_model("qwen3_moe"), model)
    return start_server(model, api_key=None, env={"APOLLO_TRAIN_LR": "1e-3", "APOLLO_TRAIN_REPLAY_RATIO": "0"})


def routed_experts(model_dir) -> dict[str, set[int]]:
    """Per expert stack, the experts the example's step routes tokens to (their gradient is not zero), at the
    weights in `model_dir`, with the worker's own encoding and loss."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode_example(tok, Example.model_validate(EXAMPLE))
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_tokens_per_step=4096).loss(
        *collate([encoded])).backward()
    return {n: {e for e in range(p.shape[0]) if p.grad[e].any()} for n, p in model.named_parameters() if p.ndim == 3}


def per_expert(tensors: dict, stack: str, experts: int) -> dict[int, list[torch.Tensor]]:
    """A stack's experts as the checkpoint stores them (`...experts.3.gate_proj.weight`, ...)."""
    prefix = stack.rsplit(".", 1)[0]
    return {e: [t for n, t in sorted(tensors.items()) if n.startswith(f"{prefix}.{e}.")] for e in range(experts)}


def test_only_the_routed_experts_train_and_the_checkpoint_round_trips(moe, tmp_path):
    c = moe.client
    tok = AutoTokenizer.from_pretrained(moe.model)
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    before = c.answer_logprob(prompt, ANSWER)
    routed = routed_experts(moe.model)
    assert any(0 < len(r) < 8 for r in routed.values())  # some experts idle: the check below means something
    with completions_running(c) as failures:
        job = c.train([EXAMPLE], wait=True)  # one step: the routing above is the step's
    assert job["state"] == "done" and job["steps"] == 1 and not failures, (job, failures[:3])
    assert c.answer_logprob(prompt, ANSWER) > before

    # A checkpoint copy keeps the checkpoint's per-expert layout; only the routed experts changed.
    copy = c.checkpoint("after-one-step", wait=True)
    assert copy["state"] == "done", copy
    old, new = load_file(moe.model / "model.safetensors"), load_file(f"{copy['path']}/model.safetensors")
    assert old.keys() == new.keys()
    for stack, experts in routed.items():
        was, now = per_expert(old, stack, 8), per_expert(new, stack, 8)
        changed = {e for e in range(8) if not all(torch.equal(a, b) for a, b in zip(was[e], now[e]))}
        assert changed == experts, stack
    # transformers reads it back as the served weights
    trained = AutoModelForCausalLM.from_pretrained(copy["path"], dtype=torch.bfloat16)
    ids = tok(prompt + ANSWER, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = trained(ids).logits.float().log_softmax(-1)[0]
    answer_start = len(tok(prompt)["input_ids"])
    expected = sum(logits[i - 1, ids[0, i]].item() for i in range(answer_start, ids.shape[1]))
    assert c.answer_logprob(prompt, ANSWER) == pytest.approx(expected, rel=0.02)

    # Trained further, then restored live: the served weights are the copy's again, exactly.
    served = c.answer_logprob(prompt, ANSWER)
    assert c.train([EXAMPLE], epochs=3, force=True, wait=True)["state"] == "done"
    assert c.answer_logprob(prompt, ANSWER) != served
    assert c.restore("after-one-step", wait=True)["state"] == "done"
    assert c.answer_logprob(prompt, ANSWER) == served
