"""The replay buffer: a bounded uniform sample of what was trained, journaled, mixed into each step."""

from __future__ import annotations

from collections import Counter

import torch
from transformers import AutoModelForCausalLM

from worker.chat_tokens import Encoded
from worker.param_groups import make_optimizer
from worker.replay import ReplayBuffer
from worker.trainer import Trainer


def enc(i: int, n: int = 6) -> Encoded:
    return Encoded(input_ids=[(i + j) % 50 + 1 for j in range(n)], target_start=2, key=f"k{i}")


def test_the_buffer_keeps_a_bounded_uniform_sample():
    counts = Counter()
    for seed in range(200):
        buf = ReplayBuffer(10, seed=seed)
        buf.add(enc(i) for i in range(100))
        assert len(buf) == 10 and buf.seen == 100
        counts.update(e.key for e in buf.items)
    # each of the 100 examples is kept with probability 1/10: about 20 times in 200 buffers
    assert min(counts[f"k{i}"] for i in range(100)) > 5 and max(counts.values()) < 40
    assert counts["k0"] > 5 and counts["k99"] > 5  # the first examples are as likely as the last


def test_the_journal_brings_it_back_and_stays_small(tmp_path):
    buf = ReplayBuffer(4, tmp_path / "replay.journal")
    for i in range(50):
        buf.add([enc(i)])
    again = ReplayBuffer(4, tmp_path / "replay.journal")
    assert [e.key for e in again.items] == [e.key for e in buf.items] and again.seen == 50
    assert len((tmp_path / "replay.journal").read_text().splitlines()) <= 4 * 4 + 1  # compacted
    copy = ReplayBuffer(4)
    copy.replace(buf.dumps())
    assert copy.items == buf.items and copy.seen == buf.seen
    assert set(e.key for e in buf.sample(10, exclude=[buf.items[0].key])) == {e.key for e in buf.items[1:]}


def test_replayed_examples_join_each_step_but_do_not_count_as_new(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"), dtype=torch.float32)
    buf = ReplayBuffer(8)
    buf.add(enc(i, 10) for i in range(100, 108))
    new = [enc(i, 10) for i in range(4)]
    trainer = Trainer(model, make_optimizer(model, "apollo", 1e-3), max_tokens_per_step=80)
    result = trainer.train(new, replay=buf, replay_ratio=1.0)
    # budget 80 / (1 + 1) = 40 tokens of new examples a step: 4 examples of 10 in one step, with 4 replayed
    assert result.steps == 1 and result.replayed == 4
    assert result.tokens == sum(e.num_target_tokens for e in new)
    plain = trainer.train(new)
    assert plain.replayed == 0
    # ratio 3 within 40 tokens: one new example a step (40 / 4 = 10 tokens), and three replayed
    tight = Trainer(model, make_optimizer(model, "apollo", 1e-3), max_tokens_per_step=40)
    assert (r := tight.train(new, replay=buf, replay_ratio=3.0)).steps == 4 and r.replayed == 12
    # replayed examples that would not fit the step are left out, never the new ones
    long = ReplayBuffer(8)
    long.add(enc(i, 20) for i in range(200, 208))
    assert (r := tight.train(new, replay=long, replay_ratio=3.0)).steps == 4 and r.replayed == 4
