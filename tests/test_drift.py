"""The drift guard's parts: the eval file, the eval loss, and the snapshot a job is rolled back from."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker import drift
from worker.param_groups import make_optimizer
from worker.trainer import Trainer

CHAT = {"messages": [{"role": "user", "content": "Where is Paris?"}, {"role": "assistant", "content": "In France."}]}


@pytest.fixture
def setup(tiny_model):
    path = tiny_model("qwen3")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return AutoTokenizer.from_pretrained(path), model


def test_eval_files_hold_text_or_chats_and_bad_lines_are_named(setup, tmp_path):
    tok, _ = setup
    good = tmp_path / "eval.jsonl"
    good.write_text(json.dumps({"text": "The river runs through the old town."}) + "\n\n" + json.dumps(CHAT) + "\n")
    examples = drift.read_eval_file(good, tok, 512)
    assert len(examples) == 2 and examples[0].target_start == 0 and examples[1].target_start > 0
    for line, needle in (("{oops", "line 1: not valid JSON"), ('{"text": ""}', "line 1: text"),
                         ('{"text": "x", "more": 1}', "unknown key 'more'"),
                         ('{"messages": []}', "line 1: messages")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(drift.EvalFileError, match=needle):
            drift.read_eval_file(bad, tok, 512)
    with pytest.raises(drift.EvalFileError, match="cannot read"):
        drift.read_eval_file(tmp_path / "missing.jsonl", tok, 512)


def test_a_rolled_back_job_leaves_weights_and_optimizer_as_before(setup, tmp_path):
    tok, model = setup
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": "The river runs through the old town."}) + "\n")
    examples = drift.read_eval_file(tmp_path / "eval.jsonl", tok, 512)
    opt = make_optimizer(model, "apollo", 1e-2)
    trainer = Trainer(model, opt, max_tokens_per_step=512)
    trainer.train(examples, epochs=2)  # some optimizer state to roll back to
    loss_before = drift.eval_loss(trainer.batch_loss, examples, 512)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    snap = drift.Snapshot(model, opt)
    assert snap.nbytes > sum(p.numel() * 4 for p in model.parameters())
    state = {n: {k: v.clone() for k, v in s.items()} for n, s in
             ((n, opt.state[p]) for n, p in model.named_parameters())}
    trainer.train(examples, epochs=3)
    assert drift.eval_loss(trainer.batch_loss, examples, 512) != loss_before
    snap.restore(model, opt)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    for n, p in model.named_parameters():
        assert all(torch.equal(opt.state[p][k].cpu(), v) for k, v in state[n].items()), n
    assert drift.eval_loss(trainer.batch_loss, examples, 512) == loss_before
