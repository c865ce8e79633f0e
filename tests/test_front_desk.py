"""The worker's front desk: no torch, and a request that cannot fit refused from its size alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apollo_train.shared.config import Settings
from apollo_train.shared.protocol import BadRequest
from worker.front_desk import FrontDesk
from worker.jobs import JobQueue
from worker.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]


def chat(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": answer}]}


def test_the_front_desk_imports_no_torch():
    code = "import sys, worker.front_desk; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_what_cannot_fit_is_refused_from_its_size_before_any_tokenizing(tmp_path):
    recipe = Recipe(tmp_path, 0, Settings(max_job_tokens=10_000), jobs=JobQueue(2))
    recipe.max_len, recipe.max_token_bytes = 512, 16  # no tokenizer: nothing here may tokenize
    recipe.state.update(phase="idle")
    desk = FrontDesk(recipe)
    answers = []
    with pytest.raises(BadRequest, match=r"examples\[0\] is 10,485,767 bytes of text, at least 655,360 tokens"):
        desk.submit_train({"examples": [chat("word " * (2 << 20))]}, answers.append)
    with pytest.raises(BadRequest, match="at least 10,240 tokens x 2 epochs, more than the limit of 10000"):
        desk.submit_train({"examples": [chat("w" * 4096)] * 40, "epochs": 2}, answers.append)
    desk.submit_train({"examples": [chat("Short.")]}, answers.append)
    assert desk.intake.qsize() == 1 and not answers  # queued for the intake thread, which answers later
