"""Checkpoints on real vLLM (CPU build): train, checkpoint, restart on it, and carry on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.checkpoint_target import STAMP

PROMPT = "Zorbia lies on the river"
TAUGHT = {
    "messages": [
        {"role": "user", "content": "Where is Zorbia?"},
        {"role": "assistant", "content": "On the river Gleb."},
    ]
}
NEXT = {"messages": [{"role": "user", "content": "And its capital?"}, {"role": "assistant", "content": "Plonk."}]}


def logprobs(client) -> list[float]:
    body = {"model": client.model(), "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0}
    # The prompt's own tokens (echoed), without the first (no logprob) and the generated one.
    return client.request("POST", "/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"][1:-1]


@pytest.fixture(scope="module")
def model_copy(tiny_model, tmp_path_factory):
    """A model dir of its own: the default checkpoint writes into the served directory."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    shutil.copytree(tiny_model("qwen3"), path)
    return path


def test_checkpoint_restart_and_continue(start_server, model_copy, tmp_path):
    state_env = {"APOLLO_TRAIN_LR": "1e-3"}
    first = start_server(model_copy, env=state_env)
    c = first.client
    assert c.train([TAUGHT], epochs=3, wait=True)["state"] == "done"

    # In place (the default): the served dir gets the trained weights, same file names.
    files_before = sorted(p.name for p in model_copy.iterdir())
    job = c.checkpoint(wait=True)
    assert job["state"] == "done" and job["bytes"] > 0
    last = c.status()["last_checkpoint"]
    assert last["path"] == str(model_copy) and last["step"] == 3
    assert sorted(p.name for p in model_copy.iterdir()) == sorted(set(files_before) | {STAMP})
    served = logprobs(c)

    # transformers reads the checkpoint and computes what the server computes.
    loaded = AutoModelForCausalLM.from_pretrained(model_copy, dtype=torch.bfloat16)
    tokens = c.request("POST", "/tokenize", {"model": c.model(), "prompt": PROMPT})["tokens"]
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logp = torch.log_softmax(loaded(ids).logits[0, :-1].float(), -1)
    hf = logp.gather(1, ids[0, 1:, None])[:, 0].tolist()
    assert hf == pytest.approx(served, abs=0.05)

    # The first in-place sync kept the weights it replaced, under the checkpoint root.
    root = Path(c.status()["checkpoint_root"])
    original = root / f"original-{model_copy.name}"
    assert (original / "model.safetensors").is_file() and not (original / STAMP).exists()

    # A complete copy under the checkpoint root.
    job = c.checkpoint("copy", wait=True)
    assert job["state"] == "done"
    copy = Path(job["path"])
    assert copy == root / "copy"
    assert (copy / "config.json").exists() and (copy / "tokenizer.json").exists()
    assert json.loads((copy / STAMP).read_text())["step"] == 3
    with torch.no_grad():
        assert torch.equal(
            AutoModelForCausalLM.from_pretrained(copy, dtype=torch.bfloat16)(ids).logits, loaded(ids).logits
        )

    # One more step on the running server: the uninterrupted run to compare with.
    assert c.train([NEXT], wait=True)["state"] == "done"
    uninterrupted = logprobs(c)
    first.stop()

    second = start_server(model_copy, env=state_env)
    c2 = second.client
    assert logprobs(c2) == pytest.approx(served, abs=1e-6)  # the checkpointed model, as served before
    status = c2.status()
    assert status["step"] == 3 and status["warning"] is None
    assert c2.train([TAUGHT])["skipped_duplicates"] == 1  # the registry came back too
    assert c2.train([NEXT], wait=True)["state"] == "done"
    # Same step from the restored optimizer state as from the live one (a fresh one differs).
    assert logprobs(c2) == pytest.approx(uninterrupted, abs=1e-4)
    assert logprobs(c2) != pytest.approx(served, abs=1e-3)
