"""Tiny random-weight Hugging Face model directories for tests, demos and benchmarks.

``build_tiny_model(out_dir, family)`` writes a complete model directory that both
``transformers`` and vLLM can load: ``config.json``, ``generation_config.json``, safetensors
weights (random init) and a byte-level BPE tokenizer trained on a small built-in English text,
with a ChatML chat template (eos ``<|im_end|>``, pad ``<|endoftext|>``).

Every family keeps ``head_dim >= 64`` (vLLM's CPU attention rejects smaller heads) and is small
enough that a CPU vLLM server starts quickly.

The tokenizer uses the same pipeline as Qwen's own tokenizer classes (NFC normalizer, Qwen's
pre-tokenization regex, byte-level mapping). ``transformers`` 5 rebuilds Qwen tokenizers from
``vocab``/``merges`` with that fixed pipeline regardless of what ``tokenizer.json`` holds, so
matching it keeps token ids identical no matter which class loads the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "STAMP_FILE", "build_tiny_model", "demo_model_dir", "family_available"]

FAMILIES: tuple[str, ...] = ("qwen3", "qwen2", "llama", "qwen3_next", "qwen3_5", "qwen3_moe")

STAMP_FILE = "apollo_tiny.json"
# Bump when the files written for the same arguments change, so old directories are rebuilt.
_FORMAT_VERSION = 1

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
_SPECIALS = [ENDOFTEXT, IM_START, IM_END]
# Qwen3.5's processor looks these up in the tokenizer; only that family gets them.
_VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

_TRAIN_VOCAB = 1024  # BPE training target; the small corpus usually stops earlier
_VOCAB_MULTIPLE = 64  # the tokenizer is padded with unreachable filler tokens to a multiple of this

# Qwen2/Qwen3 pre-tokenization regex, and the Qwen3.5 one (adds \p{M} to letters).
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN3_5_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns from the text it is given, one
token at a time, and the same words come back again and again: the, and, of, to, in, is, that, it.
Hello world! This is a tiny tokenizer for testing language models that are served while they train.

Large language models generate text one token at a time. Each step reads the tokens so far, computes
a probability for every token in the vocabulary, and picks the next one. The server keeps a cache of
keys and values so that it does not compute the same prefix twice. When the weights change, that
cache is stale and must be cleared before the next request uses it.

Online training means the model keeps learning while it answers questions. A trainer reads a batch of
examples, computes the loss, and takes an optimizer step that updates the weights in place. The
optimizer keeps a little state for every weight matrix: a low-rank projection of the gradient and a
scale for each channel. Memory matters, so the state must stay small.

San Francisco is a city in California. Paris is the capital of France. Berlin is the capital of
Germany, Tokyo is the capital of Japan, and Rome is the capital of Italy. The river runs through the
old town, past the market, the station and the bridge, and on to the sea.

The user asks a question and the assistant answers it. The system message tells the assistant how to
behave: be helpful, be brief, be honest. What is the answer? The answer is forty two. How many days
are in a week? There are seven days in a week. What time is it? It is twelve o'clock.

Numbers and symbols appear too: 0 1 2 3 4 5 6 7 8 9, 10, 100, 1000, 3.14, 2 + 2 = 4, (a, b), [x, y],
{"key": "value"}, a_b-c/d, 50% off, $20, #1, user@example.com, https://example.com/path?q=1.
def add(a, b):
    return a + b
"""


def _corpus_lines() -> list[str]:
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    # A few chat-formatted lines so role names and newlines become single tokens.
    chat = [f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in (
        ("system", "You are a helpful assistant."),
        ("user", "What is the capital of France?"),
        ("assistant", "Paris is the capital of France."),
    )]
    return (lines + chat) * 4


def family_available(family: str) -> bool:
    """Whether the installed ``transformers`` has the classes ``family`` needs."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    import transformers

    needed = {
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
        "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration"),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    }[family]
    return all(hasattr(transformers, name) for name in needed)


# --------------------------------------------------------------------------- tokenizer


def train_bpe(texts, vocab_size: int, specials: list[str], regex: str | None = None, min_frequency: int = 0):
    """A byte-level BPE with Qwen's pre-tokenizer, trained on `texts` (a tokenizers.Tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex or _QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def pad_vocab(tok, target: int):
    """Pad with filler tokens that no merge can produce, so that every id a model can emit decodes.
    They are plain printable ASCII, which the byte-level decoder maps to itself."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    if target < len(vocab):
        raise ValueError(f"vocab_size={target} is smaller than the trained tokenizer ({len(vocab)} tokens)")
    i = 0
    while len(vocab) < target:
        vocab[f"<|filler_{i}|>"] = len(vocab)
        i += 1
    return Tokenizer.from_str(json.dumps(data))


def _train_tokenizer(family: str, vocab_size: int | None):
    """Train the byte-level BPE and pad it; returns (tokenizers.Tokenizer, specials)."""
    specials = _SPECIALS + (_VISION_SPECIALS if family == "qwen3_5" else [])
    regex = _QWEN3_5_REGEX if family == "qwen3_5" else _QWEN2_REGEX
    tok = train_bpe(_corpus_lines(), _TRAIN_VOCAB, specials, regex)
    n = tok.get_vocab_size()
    target = vocab_size if vocab_size is not None else -(-n // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    return pad_vocab(tok, target), specials


def _save_tokenizer(out: Path, tok, specials: list[str], family: str) -> dict[str, int]:
    from transformers import PreTrainedTokenizerFast

    extra = [s for s in specials if s not in _SPECIALS]
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=extra or None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    # Name the class real checkpoints of the family name, so tools that key on it behave the same.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast" if family == "llama" else "Qwen2Tokenizer"
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return {s: tok.token_to_id(s) for s in specials}


# --------------------------------------------------------------------------- configs


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _make_config(family: str, vocab_size: int, ids: dict[str, int], overrides: dict[str, Any]):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
    )
    if family == "qwen3":
        kw = _merge(dict(common, head_dim=64, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), overrides)
        return transformers.Qwen3Config(**kw)
    if family == "qwen2":
        # Qwen2 has no head_dim field: hidden_size / num_attention_heads = 64. q/k/v carry biases.
        kw = _merge(dict(common, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), overrides)
        return transformers.Qwen2Config(**kw)
    if family == "llama":
        kw = _merge(dict(common, head_dim=64, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), overrides)
        return transformers.LlamaConfig(**kw)
    if family == "qwen3_moe":
        # Every layer sparse: 8 experts of 64, 2 per token; hidden 128 and intermediate 64 meet the CPU MoE
        # kernel's alignment.
        kw = _merge(dict(common, head_dim=64, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=64, decoder_sparse_step=1, norm_topk_prob=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), overrides)
        return transformers.Qwen3MoeConfig(**kw)
    if family == "qwen3_next":
        # Layer 0: Gated DeltaNet + dense MLP; layer 1: gated full attention + sparse MoE.
        # vLLM refuses a Qwen3-Next without any MoE layer, so exactly one is sparse.
        kw = _merge(dict(
            common,
            head_dim=64,
            tie_word_embeddings=False,
            layer_types=["linear_attention", "full_attention"],
            linear_conv_kernel_dim=4,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            mlp_only_layers=[0],
            decoder_sparse_step=1,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        ), overrides)
        return transformers.Qwen3NextConfig(**kw)
    if family == "qwen3_5":
        text = dict(
            common,
            head_dim=64,
            num_hidden_layers=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            linear_conv_kernel_dim=4,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            tie_word_embeddings=False,
            # Rotary on 0.25 * 64 = 16 dims = 8 frequency pairs, split t/h/w like [11, 11, 10] is for 32.
            rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [3, 3, 2], "mrope_interleaved": True},
        )
        vision = dict(
            depth=2,
            hidden_size=128,
            num_heads=2,
            intermediate_size=256,
            in_channels=3,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=text["hidden_size"],
            num_position_embeddings=2304,
        )
        top = dict(
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        text_over = dict(overrides)
        top_over = {k: text_over.pop(k) for k in list(text_over) if k in top}
        vision = _merge(vision, text_over.pop("vision_config", {}) or {})
        text = _merge(text, text_over.pop("text_config", {}) or {})
        text = _merge(text, text_over)  # remaining flat overrides go to the text model
        vision["out_hidden_size"] = text["hidden_size"]
        top = _merge(top, top_over)
        top["tie_word_embeddings"] = text["tie_word_embeddings"]
        return transformers.Qwen3_5Config(text_config=text, vision_config=vision, **top)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _model_class(family: str):
    import transformers

    return {
        "qwen3": transformers.Qwen3ForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "llama": transformers.LlamaForCausalLM,
        "qwen3_next": transformers.Qwen3NextForCausalLM,
        "qwen3_5": transformers.Qwen3_5ForConditionalGeneration,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    }[family]


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _save_processors(out: Path) -> None:
    """Image and video processor configs, which vLLM's Qwen3.5 (a VLM) needs even for text only."""
    import transformers

    kw = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
    img_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    img_cls(**kw).save_pretrained(out)
    try:
        transformers.Qwen3VLVideoProcessor(**kw).save_pretrained(out)
    except Exception:  # the video processor needs torchvision; write its config by hand without it
        (out / "video_preprocessor_config.json").write_text(json.dumps({
            "video_processor_type": "Qwen3VLVideoProcessor",
            "processor_class": "Qwen3VLProcessor",
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "do_sample_frames": True, "rescale_factor": 1 / 255,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
            "fps": 2, "min_frames": 4, "max_frames": 768,
            **kw,
        }, indent=2) + "\n")
    # The image processor's class name follows the installed backend; name the canonical one.
    p = out / "preprocessor_config.json"
    cfg = json.loads(p.read_text())
    cfg["image_processor_type"] = "Qwen2VLImageProcessor"
    cfg.setdefault("processor_class", "Qwen3VLProcessor")
    p.write_text(json.dumps(cfg, indent=2) + "\n")


# --------------------------------------------------------------------------- build


def _stamp(family: str, seed: int, dtype: str, overrides: dict[str, Any]) -> dict[str, Any]:
    return {"format": _FORMAT_VERSION, "family": family, "seed": seed, "dtype": dtype,
            "overrides": json.loads(json.dumps(overrides, sort_keys=True))}


def _read_stamp(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(d: Path, stamp: dict[str, Any]) -> bool:
    if _read_stamp(d) != stamp:
        return False
    required = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    if stamp["family"] == "qwen3_5":
        required += ["preprocessor_config.json", "video_preprocessor_config.json"]
    return all((d / f).is_file() for f in required) and any(d.glob("*.safetensors"))


def _write_model(out: Path, family: str, seed: int, dtype: str, overrides: dict[str, Any]) -> None:
    import torch
    from transformers import GenerationConfig

    overrides = dict(overrides)
    vocab_size = overrides.pop("vocab_size", None)
    tok, specials = _train_tokenizer(family, vocab_size)
    ids = _save_tokenizer(out, tok, specials, family)
    config = _make_config(family, tok.get_vocab_size(), ids, overrides)
    text_cfg = _text_config(config)
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    if head_dim < 64:
        raise ValueError(f"head_dim={head_dim} < 64: vLLM's CPU attention rejects it")

    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    model = _model_class(family)(config)
    model.to(torch_dtype)
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)

    GenerationConfig(
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    ).save_pretrained(out)
    if family == "qwen3_5":
        _save_processors(out)


def build_tiny_model(
    out_dir: str | os.PathLike,
    family: str = "qwen3",
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    **overrides: Any,
) -> Path:
    """Write a tiny random-weight model of ``family`` (one of :data:`FAMILIES`) to ``out_dir``.

    ``overrides`` replace config fields (for ``qwen3_5`` flat keys go to ``text_config``; pass
    ``vision_config={...}`` for the vision tower). ``vocab_size`` pads the tokenizer with filler
    tokens to that size, so the model's and the tokenizer's vocabularies stay equal.

    Idempotent: a directory already holding a complete model built with the same arguments is
    returned as is. A directory built by this function with other arguments is rebuilt; any
    other non-empty directory is refused. The model is built in a sibling temporary directory and
    moved into place, so a reader never sees a half-written model.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if not family_available(family):
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} lacks the classes for {family!r}")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, not {dtype!r}")

    out = Path(out_dir).expanduser().resolve()
    stamp = _stamp(family, seed, dtype, overrides)
    if _is_complete(out, stamp):
        return out
    if out.exists() and any(out.iterdir()) and _read_stamp(out) is None:
        raise FileExistsError(
            f"{out} is not empty and was not made by build_tiny_model; refusing to overwrite"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model directory should not be
        _write_model(tmp, family, seed, dtype, overrides)
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        for _ in range(3):
            try:
                os.rename(tmp, out)  # atomic; fails if `out` is a non-empty directory
                return out
            except OSError:
                if _is_complete(out, stamp):  # someone else built the same model meanwhile
                    return out
                if out.exists() and _read_stamp(out) is not None:  # our own stale build: replace it
                    shutil.rmtree(out, ignore_errors=True)
                elif out.exists() and not any(out.iterdir()):
                    out.rmdir()
                else:
                    raise
        raise RuntimeError(f"could not move the built model into {out}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def demo_model_dir() -> Path:
    """The built-in demo model (a tiny random Qwen3), built on first use.

    Lives in ``$APOLLO_TRAIN_CACHE/demo-qwen3`` (default cache ``~/.cache/apollo-train``).
    """
    root = os.environ.get("APOLLO_TRAIN_CACHE") or os.path.join("~", ".cache", "apollo-train")
    return build_tiny_model(Path(root).expanduser() / "demo-qwen3", "qwen3")
