import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from apollo_train.tiny_models import build_tiny_model
from worker.offline import main

EXAMPLES = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris is the capital of France."}]},
    {"messages": [{"role": "system", "content": "Answer like a pirate."},
                  {"role": "user", "content": "Hello!"},
                  {"role": "assistant", "content": "Hello world!"}],
     "strip": [0]},
]


@pytest.fixture
def model_dir(tmp_path_factory, tmp_path):
    tiny = build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-qwen3", "qwen3")
    shutil.copytree(tiny, tmp_path / "tiny")
    return tmp_path / "tiny"


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_train_end_to_end(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", EXAMPLES[:1] + [""] + EXAMPLES[1:])
    assert main([str(model_dir), str(data), "--optimizer", "apollo", "--lr", "1e-3", "--epochs", "3",
                 "--max-tokens-per-step", "16"]) == 0
    out = tmp_path / "tiny-trained"
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "6 steps" in captured.err  # 2 examples too long to share 16 tokens, 3 epochs

    # A complete model directory: same files, same tensor names and dtypes, new values.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    before = load_file(model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(after[n].dtype == before[n].dtype == torch.bfloat16 for n in before)
    assert any(not torch.equal(after[n], before[n]) for n in before)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_bad_lines_exit_2(model_dir, tmp_path, capsys):
    cases = [
        ("{not json", "data.jsonl line 2: not valid JSON"),
        ('["messages"]', "data.jsonl line 2: Input should be a valid dictionary"),
        (json.dumps({**EXAMPLES[0], "id": 3}), "data.jsonl line 2: unknown key 'id'"),
        (json.dumps({"messages": [{**EXAMPLES[0]["messages"][0], "name": "x"}, EXAMPLES[0]["messages"][1]]}),
         "data.jsonl line 2: messages[0]: unknown key 'name'"),
        (json.dumps({"messages": EXAMPLES[0]["messages"][:1]}),
         "data.jsonl line 2: the last message must be from the assistant (it is 'user')"),
        (json.dumps({**EXAMPLES[1], "strip": [2]}), "data.jsonl line 2: strip index 2 is out of range"),
    ]
    for line, message in cases:
        data = write_jsonl(tmp_path / "data.jsonl", [EXAMPLES[0], line])
        assert main([str(model_dir), str(data), "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    empty = write_jsonl(tmp_path / "data.jsonl", [""])
    assert main([str(model_dir), str(empty)]) == 2
    assert "no examples" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "tiny-trained").exists()


def test_bad_arguments_exit_2(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", EXAMPLES)
    model, data = str(model_dir), str(data)
    for argv in ([str(tmp_path / "missing"), data], [model, str(tmp_path / "missing.jsonl")],
                 [model, data, "--optimizer", "sgd"], [model, data, "--epochs", "0"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2


def test_a_mixture_of_experts_trains_and_its_checkpoint_keeps_the_per_expert_layout(tmp_path_factory, tmp_path):
    """transformers holds the experts as fused stacks, the checkpoint one tensor per expert and projection:
    the trained copy keeps the checkpoint's names (so vLLM and the hub read it), and transformers loads back
    exactly the weights that were trained (only the experts the examples were routed to changed)."""
    tiny = build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-qwen3-moe-64", "qwen3_moe", num_experts=64)
    shutil.copytree(tiny, tmp_path / "moe")
    data = write_jsonl(tmp_path / "data.jsonl", EXAMPLES[:1])
    assert main([str(tmp_path / "moe"), str(data), "--optimizer", "apollo-mini", "--lr", "1e-2"]) == 0
    before, after = load_file(tmp_path / "moe" / "model.safetensors"), load_file(
        tmp_path / "moe-trained" / "model.safetensors")
    assert before.keys() == after.keys() and "model.layers.0.mlp.experts.63.gate_proj.weight" in after
    changed = {n.split(".experts.")[1].split(".")[0] for n in before if n.startswith("model.layers.0.mlp.experts.")
               and not torch.equal(before[n], after[n])}
    assert 0 < len(changed) < 64  # the experts the example's tokens were routed to, not all
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "moe-trained")
    stack = trained.model.layers[0].mlp.experts.gate_up_proj  # [experts, 2 x intermediate, hidden]
    intermediate = stack.shape[1] // 2
    for e in range(stack.shape[0]):
        assert torch.equal(stack[e, :intermediate], after[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"])
        assert torch.equal(stack[e, intermediate:], after[f"model.layers.0.mlp.experts.{e}.up_proj.weight"])
