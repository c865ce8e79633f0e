"""Tiny random model directories: build, reload with transformers, chat template, idempotence."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from apollo_train.tiny_models import (  # noqa: E402
    FAMILIES,
    STAMP_FILE,
    build_tiny_model,
    demo_model_dir,
    family_available,
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]


def _params(family):
    if not family_available(family):
        return pytest.param(family, marks=pytest.mark.skip(f"transformers lacks {family}"))
    return family


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_tiny_model(tmp_path_factory.mktemp("tiny") / family, family)
        return cache[family]

    return get


def _token_ids(tok, messages, **kw):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


@pytest.mark.parametrize("family", [_params(f) for f in FAMILIES])
def test_builds_and_reloads(built, family):
    d = built(family)
    required = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    for name in (*required, STAMP_FILE):
        assert (d / name).is_file(), name
    assert list(d.glob("*.safetensors"))

    config = transformers.AutoConfig.from_pretrained(d)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert head_dim >= 64
    assert text.hidden_size <= 256 and text.num_hidden_layers <= 4

    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert len(tok) == text.vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert text.eos_token_id == tok.eos_token_id
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id and gen["pad_token_id"] == tok.pad_token_id

    # Whatever class transformers picks for the model type, ids match the trained tokenizer.json.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    sample = "Hello world! The capital of France is Paris. 12345 don't\n\n  x"
    ids = tok(sample)["input_ids"]
    assert ids == raw.encode(sample).ids
    assert tok.decode(ids) == sample

    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), text.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", [_params(f) for f in FAMILIES])
def test_chat_template(built, family):
    tok = transformers.AutoTokenizer.from_pretrained(built(family))
    eos = tok.eos_token_id
    newline = tok.encode("\n", add_special_tokens=False)

    full = _token_ids(tok, MESSAGES)
    # The assistant turn ends with eos (the template then adds the ChatML newline).
    assert full[-len(newline):] == newline
    assert full[-len(newline) - 1] == eos

    prompt = _token_ids(tok, MESSAGES[:-1], add_generation_prompt=True)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert full[: len(prompt)] == prompt  # the prompt is a token prefix of the full conversation
    answer = tok.decode(full[len(prompt):])
    assert answer == "Paris is the capital of France.<|im_end|>\n"

    text = tok.apply_chat_template(MESSAGES[:-1], tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    )


def test_idempotent(tmp_path):
    d = build_tiny_model(tmp_path / "m", "qwen3")
    weights = next(d.glob("*.safetensors"))
    stamp = d / STAMP_FILE
    before = (weights.stat().st_mtime_ns, stamp.stat().st_mtime_ns)

    assert build_tiny_model(tmp_path / "m", "qwen3") == d
    assert (weights.stat().st_mtime_ns, stamp.stat().st_mtime_ns) == before

    # Different arguments rebuild the same directory.
    build_tiny_model(tmp_path / "m", "qwen3", seed=1)
    assert json.loads(stamp.read_text())["seed"] == 1
    assert not list(tmp_path.glob(".m.tmp-*"))  # no leftovers


def test_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = build_tiny_model(tmp_path / "a", "qwen3", seed=3)
    b = build_tiny_model(tmp_path / "b", "qwen3", seed=3)
    c = build_tiny_model(tmp_path / "c", "qwen3", seed=4)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    wa, wb, wc = (load_file(next(d.glob("*.safetensors"))) for d in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["lm_head.weight"], wc["lm_head.weight"])


def test_overrides_and_vocab_padding(tmp_path):
    d = build_tiny_model(tmp_path / "m", "qwen3", num_hidden_layers=3, vocab_size=1024, dtype="float32")
    config = transformers.AutoConfig.from_pretrained(d)
    assert config.num_hidden_layers == 3 and config.vocab_size == 1024
    assert len(transformers.AutoTokenizer.from_pretrained(d)) == 1024
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model(tmp_path / "bad", "qwen3", head_dim=16)


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_model(tmp_path / "m", "qwen3")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "x", "gpt2")


def test_demo_model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("APOLLO_TRAIN_CACHE", str(tmp_path))
    d = demo_model_dir()
    assert d == (tmp_path / "demo-qwen3").resolve()
    assert json.loads((d / STAMP_FILE).read_text())["family"] == "qwen3"
    assert demo_model_dir() == d


@pytest.mark.skipif(not family_available("qwen3_5"), reason="transformers lacks Qwen3.5")
def test_qwen3_5_layout(built):
    d = built("qwen3_5")
    assert (d / "preprocessor_config.json").is_file() and (d / "video_preprocessor_config.json").is_file()
    config = transformers.AutoConfig.from_pretrained(d)
    assert config.architectures == ["Qwen3_5ForConditionalGeneration"]
    assert config.vision_config.depth == 2
    assert "linear_attention" in config.text_config.layer_types
    assert "full_attention" in config.text_config.layer_types
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    model = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(d)
    assert any(n.startswith("model.visual.") for n, _ in model.named_parameters())


@pytest.mark.skipif(not family_available("qwen3_next"), reason="transformers lacks Qwen3-Next")
def test_qwen3_next_has_one_sparse_layer(built):
    config = transformers.AutoConfig.from_pretrained(built("qwen3_next"))
    sparse = [i for i in range(config.num_hidden_layers)
              if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0]
    assert len(sparse) == 1
    assert set(config.layer_types) == {"linear_attention", "full_attention"}
