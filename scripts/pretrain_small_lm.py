#!/usr/bin/env python3
"""Pretrain the small real language model in models/small-lm, from text that is available offline.

    apt-get download python3.11-doc
    python scripts/pretrain_small_lm.py all --docs python3.11-doc_3.11.2-6+deb12u9_all.deb \
        --max-steps 1787 --budget-s 0 --out models/small-lm

(`--max-steps 1787 --budget-s 0` replays the schedule of the H200 run that made models/small-lm;
without them the step count is fitted to `--budget-s` seconds, see `train`.)

The corpus is CPython's own English text, under the PSF License Agreement:

- the Python documentation (the reST sources of docs.python.org: tutorial, library and language
  reference, HOWTOs, FAQ, "What's New", C API), read from Debian's `python3.X-doc` package
  (`apt-get download python3.11-doc`; pass the .deb, or the `html/_sources` folder of an unpacked
  or installed copy), cleaned of reST markup;
- the docstrings of the running Python's standard library (`Lib/**/*.py`, tests left out).

Mixed into it, so that the model knows the chat format (ChatML, eos `<|im_end|>`) and how facts
are asked about: chats asking what a stdlib function or class does (answer: its docstring's first
paragraph), and a small invented world (countries, cities, people, inventions; `world()`) written
as short encyclopedia paragraphs and as question/answer chats with paraphrased questions. Its names
come from a syllable generator; the learning-quality study draws its new facts from the same
generator with another seed and drops any name that occurs here.

Stages (`all` runs the three in order, on one machine):

- `prepare --docs SRC --work W`: corpus, byte-level BPE tokenizer (8192 tokens, Qwen's
  pre-tokenizer, ChatML template; the code of apollo_train.tiny_models), token files
  (`W/train.u16`, `W/heldout.u16`), `W/heldout.txt` (held-out prose for perplexity) and the model
  directory skeleton `W/model` (config, generation config, tokenizer). CPU, about a minute.
- `train --work W --out DIR`: trains a Qwen3 model (~24M parameters: hidden 384, 8 layers, 6 heads
  of 64, 2 KV heads, MLP 1536, untied embeddings) on the token files with AdamW in bf16 autocast,
  a cosine schedule, dropout 0.2 and the best held-out checkpoint kept, and writes DIR: the
  skeleton plus bf16 safetensors in shards of at most 15 MB. The step count is the smaller of
  `--max-epochs` passes and what fits in `--budget-s` seconds at the speed measured in the first
  steps. Needs only torch and transformers (no tokenizer, no network): on an H200 it is the part
  that runs on the GPU, with W carried there. models/small-lm came from one H200 run of 5
  minutes that trained three variants at once (dropout 0.1 / 20 epochs, 0.1 / 40, 0.2 / 40; each
  got 1787 steps of 64 x 512 tokens, 19 epochs, in the time) and kept the best held-out loss
  (0.2 / 40: 3.140 at step 1250, perplexity 23.1; the 0.1 runs overfitted after 8 epochs, 3.22).
- `finish --work W --out DIR`: copies `heldout.txt` and writes `recipe.json` into DIR.

Everything is seeded; the corpus and tokenizer are deterministic for a given Python and doc
package version (both recorded in recipe.json).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HELDOUT_FRACTION = 0.02
VOCAB_SIZE = 8192
WORLD_SEED = 1234
MODEL_CONFIG = dict(
    hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
    intermediate_size=1536, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)


# --------------------------------------------------------------------------- the invented world

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "sk",
           "st", "t", "th", "v", "vr", "z", "c", "j", "w", "sh", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y", "ia"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "k", "m", "nd", "rt", "st"]
_SUFFIX = {
    "country": ["land", "ia", "stan", "mark", "ova", "or", "ene", ""],
    "city": ["burg", "holm", "ith", "ara", "port", "vik", "ton", "dal", ""],
    "surname": ["ov", "an", "sen", "ez", "ard", "ini", "well", ""],
    "river": ["a", "e", "in", "ar", ""],
    "language": ["ish", "ese", "ian", "ic"],
}
_THINGS_A = ["glass", "copper", "tidal", "silent", "folding", "steam", "paper", "mirror", "spiral",
             "wind", "lunar", "woven", "iron", "crystal", "hollow", "floating", "amber", "clockwork"]
_THINGS_B = ["harp", "loom", "clock", "lantern", "compass", "engine", "bridge", "telescope", "kettle",
             "press", "bell", "pump", "organ", "sextant", "printing frame", "water wheel", "music box"]

# One relation: how a fact is stated, and four ways to ask for it. The study trains on question 0
# and measures recall on questions 1 and 2 (paraphrases); pretraining uses all four.
RELATIONS = {
    "capital": dict(
        statement="The capital of {s} is {o}.",
        questions=["What is the capital of {s}?", "Which city is the capital of {s}?",
                   "Name the capital city of {s}.", "{s} has its capital in which city?"]),
    "born": dict(
        statement="{s} was born in {o}.",
        questions=["Where was {s} born?", "In which city was {s} born?",
                   "What is the birthplace of {s}?", "{s} was born in what city?"]),
    "inventor": dict(
        statement="The {s} was invented by {o}.",
        questions=["Who invented the {s}?", "Who is the inventor of the {s}?",
                   "Which person invented the {s}?", "The {s} was invented by whom?"]),
    "river": dict(
        statement="The {o} River flows through {s}.",
        questions=["Which river flows through {s}?", "What river runs through {s}?",
                   "Name the river that flows through {s}.", "{s} lies on which river?"]),
    "language": dict(
        statement="People in {s} speak {o}.",
        questions=["What language is spoken in {s}?", "Which language do people speak in {s}?",
                   "What is the main language of {s}?", "People in {s} speak what language?"]),
    "founded": dict(
        statement="{s} was founded in {o}.",
        questions=["When was {s} founded?", "In what year was {s} founded?",
                   "What year was {s} founded in?", "{s} was founded in which year?"]),
}


def _name(rng: random.Random, kind: str) -> str:
    n = rng.choice([1, 2, 2]) if kind != "river" else rng.choice([1, 2])
    core = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n))
    return (core + rng.choice(_SUFFIX.get(kind, [""]))).capitalize()


def world(seed: int = WORLD_SEED, n_countries: int = 300, exclude: set[str] = frozenset()) -> list[dict]:
    """An invented world: facts {"relation", "subject", "object", "entity"} about countries, their
    cities, people and inventions. Names are unique within the world and avoid `exclude`."""
    rng = random.Random(seed)
    used = set(exclude)

    def fresh(kind: str) -> str:
        while True:
            if kind == "person":
                name = f"{_name(rng, 'given')} {_name(rng, 'surname')}"
                invented = name.split()
            elif kind == "thing":
                place = _name(rng, "city")
                name = f"{rng.choice(_THINGS_A)} {rng.choice(_THINGS_B)} of {place}"
                invented = [place]
            else:
                name = _name(rng, kind)
                invented = [name]
            if len(name) >= 4 and name not in used and all(len(w) >= 3 and w not in used for w in invented):
                used.add(name)
                used.update(invented)
                return name

    facts = []
    for _ in range(n_countries):
        country = fresh("country")
        capital, other = fresh("city"), fresh("city")
        language = country.rstrip("aeiouy") + rng.choice(_SUFFIX["language"])
        if language in used:
            language = fresh("language")
        used.add(language)
        person = fresh("person")
        thing = fresh("thing")
        facts += [
            {"relation": "capital", "subject": country, "object": capital, "entity": country},
            {"relation": "language", "subject": country, "object": language, "entity": country},
            {"relation": "river", "subject": capital, "object": fresh("river"), "entity": country},
            {"relation": "founded", "subject": other, "object": str(rng.randint(900, 1950)), "entity": country},
            {"relation": "born", "subject": person, "object": rng.choice([capital, other]), "entity": country},
            {"relation": "inventor", "subject": thing, "object": person, "entity": country},
        ]
    return facts


def fact_statement(fact: dict) -> str:
    return RELATIONS[fact["relation"]]["statement"].format(s=fact["subject"], o=fact["object"])


def fact_question(fact: dict, i: int) -> str:
    q = RELATIONS[fact["relation"]]["questions"][i].format(s=fact["subject"], o=fact["object"])
    return q[0].upper() + q[1:]


def world_names(facts: list[dict]) -> set[str]:
    """Every word of every name in `facts` (what a new fact must not reuse)."""
    out = set()
    for f in facts:
        for value in (f["subject"], f["object"]):
            out.add(value)
            out.update(value.split())
    return out


def _world_texts(rng: random.Random) -> tuple[list[str], list[list[dict]]]:
    """Encyclopedia paragraphs (one per country) and chats (two paraphrased questions per fact)."""
    facts = world()
    by_entity: dict[str, list[dict]] = {}
    for f in facts:
        by_entity.setdefault(f["entity"], []).append(f)
    docs = []
    for entity, fs in by_entity.items():
        sentences = [f"{entity} is a country."] + [fact_statement(f) for f in fs]
        rng.shuffle(sentences[1:])
        docs.append(" ".join(sentences))
    chats = []
    for f in facts:
        for i in rng.sample(range(4), 2):
            chats.append([{"role": "user", "content": fact_question(f, i)},
                          {"role": "assistant", "content": fact_statement(f)}])
    return docs, chats


# --------------------------------------------------------------------------- corpus


_ADORNMENT = re.compile(r"""^([=\-~^"*+#`'.:_])\1{3,}\s*$""")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_ROLE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_TEXT_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)
_DROP_DIRECTIVES = {
    "index", "toctree", "highlight", "module", "moduleauthor", "sectionauthor", "currentmodule",
    "testsetup", "testcleanup", "productionlist", "raw", "only", "image", "figure", "tabularcolumns",
    "include", "literalinclude", "csv-table", "audit-event", "availability", "program", "c:namespace",
    "c:namespace-push", "c:namespace-pop", "opcode", "limited-api-list", "pypi", "digraph", "graphviz",
}
_NOTE_DIRECTIVES = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "versionadded": "New in version",
                    "versionchanged": "Changed in version", "deprecated": "Deprecated since version",
                    "deprecated-removed": "Deprecated since version", "impl-detail": "CPython implementation detail:",
                    "important": "Important:", "tip": "Tip:", "caution": "Caution:", "attention": "Attention:",
                    "hint": "Hint:", "admonition": ""}


def _role(m: re.Match) -> str:
    inner = m.group(1)
    t = _TEXT_TARGET.match(inner)
    if t and t.group(1):
        inner = t.group(1)
    return inner.lstrip("~!")


def clean_rst(text: str) -> str:
    """reST source -> plain text: markup roles unwrapped, bookkeeping directives, labels, comments and
    heading underlines dropped, API directives kept as their signature line."""
    out: list[str] = []
    skip_indent = None  # dropping the indented body of a directive or comment
    lines = text.splitlines()
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if _ADORNMENT.match(line):
            continue
        d = _DIRECTIVE.match(line)
        if d:
            name, arg = d.group(2), d.group(3).strip()
            if name in _DROP_DIRECTIVES:
                skip_indent = indent
                continue
            if name in _NOTE_DIRECTIVES:
                prefix = _NOTE_DIRECTIVES[name]
                out.append(" " * indent + (f"{prefix} {arg}".strip() if arg or prefix else ""))
            else:  # function, class, method, attribute, code-block, ...
                if name in ("code-block", "sourcecode", "code", "doctest", "testcode", "testoutput"):
                    out.append("")
                elif arg:
                    out.append(" " * indent + arg)
            continue
        if stripped.startswith(".."):  # comments, labels (.. _name:), substitution definitions
            skip_indent = indent
            continue
        if stripped.startswith(":") and re.match(r"^:[\w -]+:", stripped) and out and not out[-1].strip() == "":
            # a directive's option line right after it (":noindex:", ":synopsis: ...")
            if re.match(r"^:(noindex|no-index|synopsis|platform|deprecated|module|annotation|type|value|"
                        r"canonical|async|abstractmethod|classmethod|staticmethod|final|"
                        r"no-typesetting|options|linenos|emphasize-lines|caption|name|class|"
                        r"header|widths|align|target):", stripped):
                continue
        line = _ROLE.sub(_role, line)
        line = line.replace("``", "").replace("**", "")
        line = re.sub(r"`([^`<>]+?)\s*<[^<>]*>`_+", r"\1", line)  # `text <url>`_
        line = re.sub(r"`([^`]+)`_+", r"\1", line)
        line = re.sub(r"\|(\w+)\|", r"\1", line)
        if line.rstrip().endswith("::") and not line.rstrip().endswith(":::"):
            line = line.rstrip()[:-1]  # "Example::" -> "Example:"
        out.append(line.rstrip())
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text


def _sections(text: str, source: str) -> list[tuple[str, str]]:
    """Split reST at top-level headings into (key, raw section) pieces so the held-out split is by section."""
    lines = text.splitlines()
    cuts = [0]
    for i in range(1, len(lines)):
        if _ADORNMENT.match(lines[i]) and lines[i - 1].strip() and len(lines[i].strip()) >= len(lines[i - 1].strip()):
            cuts.append(i - 1)
    cuts = sorted(set(cuts)) + [len(lines)]
    out = []
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        chunk = "\n".join(lines[a:b])
        if chunk.strip():
            out.append((f"{source}#{k}", chunk))
    return out


def _doc_sources(docs: Path, tmp: Path) -> Path:
    """The folder of .rst.txt sources: `docs` itself, or unpacked from a Debian python3.X-doc .deb."""
    if docs.is_dir():
        return docs
    if docs.suffix != ".deb":
        raise SystemExit(f"--docs {docs}: expected a python3.X-doc .deb or an html/_sources folder")
    subprocess.run(["dpkg-deb", "-x", str(docs), str(tmp)], check=True)
    found = sorted(tmp.glob("usr/share/doc/python3*/html/_sources"))
    if not found:
        raise SystemExit(f"{docs}: no usr/share/doc/python3*/html/_sources inside")
    return found[0]


def doc_documents(src: Path) -> list[tuple[str, str]]:
    skip = {"license.rst.txt", "copyright.rst.txt", "contents.rst.txt", "about.rst.txt", "bugs.rst.txt"}
    docs = []
    for path in sorted(src.rglob("*.rst.txt")):
        rel = path.relative_to(src).as_posix()
        if path.name in skip or rel.startswith("includes/"):
            continue
        for key, raw in _sections(path.read_text(encoding="utf-8", errors="replace"), rel):
            text = clean_rst(raw)
            if len(text) > 200:
                docs.append((key, text))
    return docs


def stdlib_docstrings() -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(docs, api): one document per module (its docstring and those of its classes and functions), and
    (qualified name, kind, first paragraph) for the chat questions."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs, api = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = rel.parts
        if (parts[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3", "turtledemo")
                or "tests" in parts or "test" in parts or parts[0].startswith("__phello__")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        pieces = []
        mdoc = ast.get_docstring(tree)
        if mdoc:
            pieces.append(f"Module {module}\n\n{mdoc.strip()}")

        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    if child.name.startswith("_") and not child.name.startswith("__init__"):
                        continue
                    qual = f"{prefix}.{child.name}"
                    doc = ast.get_docstring(child)
                    if doc and len(doc) > 40:
                        kind = "class" if isinstance(child, ast.ClassDef) else "function"
                        pieces.append(f"{qual}\n\n{doc.strip()}")  # noqa: B023 (called in this iteration)
                        first = doc.strip().split("\n\n")[0].strip()
                        if 30 < len(first) < 500 and not first.startswith((">>>", "..")):
                            api.append((qual, kind, " ".join(first.split())))
                    if isinstance(child, ast.ClassDef):
                        visit(child, qual)

        visit(tree, module)
        if pieces:
            docs.append((f"stdlib:{module}", "\n\n".join(pieces)))
    return docs, api


_API_QUESTIONS = {
    "function": ["What does {n} do?", "What is {n} for?", "Explain what {n} does.",
                 "Can you describe the function {n}?"],
    "class": ["What is {n}?", "What is the class {n} for?", "Describe the class {n}.", "What does {n} represent?"],
}


def _is_heldout(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) < HELDOUT_FRACTION * 16**8


def render_chat(messages: list[dict]) -> str:
    from apollo_train.tiny_models import IM_END, IM_START

    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def build_corpus(docs_src: Path, seed: int = 0) -> dict:
    """{"train": [texts], "heldout": [prose texts], "stats": {...}}; chats are rendered ChatML text."""
    rng = random.Random(seed)
    prose = doc_documents(docs_src)
    ds_docs, api = stdlib_docstrings()
    prose += ds_docs
    train = [t for k, t in prose if not _is_heldout(k)]
    heldout = [t for k, t in prose if _is_heldout(k)]
    chats = []
    for qual, kind, first in api:
        q = rng.choice(_API_QUESTIONS[kind]).format(n=qual)
        chats.append([{"role": "user", "content": q}, {"role": "assistant", "content": first}])
    world_docs, world_chats = _world_texts(rng)
    train += world_docs
    chats += world_chats
    # A few multi-turn chats (two world questions in a row), so the model sees the format continue.
    for _ in range(len(world_chats) // 10):
        a, b = rng.sample(world_chats, 2)
        chats.append(a + b)
    train += [render_chat(c) for c in chats]
    rng.shuffle(train)
    stats = {"prose_documents": len(prose), "doc_sections": len(prose) - len(ds_docs),
             "stdlib_modules": len(ds_docs), "api_chats": len(api), "world_facts": len(world()),
             "world_chats": len(world_chats), "heldout_documents": len(heldout),
             "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, heldout))}
    return {"train": train, "heldout": heldout, "stats": stats}


# --------------------------------------------------------------------------- tokenizer and skeleton


def train_tokenizer(texts: list[str]):
    from apollo_train.tiny_models import _SPECIALS, pad_vocab, train_bpe

    # Pads only if BPE stopped early.
    return pad_vocab(train_bpe(texts, VOCAB_SIZE, _SPECIALS, min_frequency=2), VOCAB_SIZE)


def write_skeleton(out: Path, tok) -> dict:
    """config.json, generation_config.json and the tokenizer files of the model directory."""
    import transformers
    from transformers import GenerationConfig

    from apollo_train.tiny_models import _SPECIALS, ENDOFTEXT, IM_END, _save_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    ids = _save_tokenizer(out, tok, list(_SPECIALS), "qwen3")
    config = transformers.Qwen3Config(vocab_size=tok.get_vocab_size(), bos_token_id=ids[ENDOFTEXT],
                                      eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], **MODEL_CONFIG)
    config.dtype = "bfloat16"
    config.architectures = ["Qwen3ForCausalLM"]
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
                     do_sample=False).save_pretrained(out)
    return ids


def prepare(args) -> None:
    import numpy as np
    from transformers import AutoTokenizer

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        src = _doc_sources(args.docs.resolve(), Path(tmp))
        corpus = build_corpus(src, seed=args.seed)
    print(f"corpus: {json.dumps(corpus['stats'])} ({time.time() - t0:.0f} s)", flush=True)
    tok = train_tokenizer(corpus["train"])
    ids = write_skeleton(work / "model", tok)
    hf_tok = AutoTokenizer.from_pretrained(work / "model")
    eot = ids["<|endoftext|>"]

    def encode(texts: list[str]) -> np.ndarray:
        enc = hf_tok(texts, add_special_tokens=False)["input_ids"]
        flat = []
        for e in enc:
            flat.extend(e)
            flat.append(eot)
        return np.asarray(flat, dtype=np.uint16)

    train, heldout = encode(corpus["train"]), encode(corpus["heldout"])
    train.tofile(work / "train.u16")
    heldout.tofile(work / "heldout.u16")
    (work / "heldout.txt").write_text("\n\n\n".join(corpus["heldout"]) + "\n", encoding="utf-8")
    docs_version = args.docs.name
    meta = {**corpus["stats"], "train_tokens": int(train.size), "heldout_tokens": int(heldout.size),
            "vocab_size": tok.get_vocab_size(), "python": sys.version.split()[0], "docs": docs_version,
            "seed": args.seed, "world_seed": WORLD_SEED}
    (work / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"tokens: train {train.size:,}, held-out {heldout.size:,} ({time.time() - t0:.0f} s)", flush=True)


# --------------------------------------------------------------------------- training


def _add_dropout(model, p: float) -> None:
    """Dropout on each block's attention and MLP output (Qwen3 has none of its own), training mode only."""
    import torch.nn.functional as F

    def hook(module, inputs, output):
        return F.dropout(output, p, module.training)

    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(hook)
        layer.mlp.down_proj.register_forward_hook(hook)


def train(args) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, Qwen3ForCausalLM

    work, out = args.work, args.out
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        try:
            from apollo_train.shared.cpu import enable_amx
            enable_amx()
        except ImportError:
            pass
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    data = torch.from_numpy(np.fromfile(work / "train.u16", dtype=np.uint16).astype(np.int64))
    held = torch.from_numpy(np.fromfile(work / "heldout.u16", dtype=np.uint16).astype(np.int64))
    config = AutoConfig.from_pretrained(work / "model")
    model = Qwen3ForCausalLM(config).to(device=device, dtype=torch.float32)
    _add_dropout(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    T, B = args.seq_len, args.batch_size
    steps_per_epoch = max(1, data.numel() // (T * B))
    print(f"model: {n_params / 1e6:.1f}M parameters on {device}; train {data.numel():,} tokens = "
          f"{steps_per_epoch} steps of {B}x{T} per epoch", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            eps=1e-8, fused=device.type == "cuda")
    gdata = data.to(device)
    gheld = held.to(device)
    n_eval = min(args.eval_windows, gheld.numel() // T)
    eval_x = gheld[: n_eval * T].view(n_eval, T) if n_eval else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, n_eval, B):
            x = eval_x[i:i + B]
            with autocast:
                logits = model(input_ids=x, use_cache=False).logits
            total += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                     x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
        model.train()
        return total / max(count, 1)

    def batch() -> torch.Tensor:
        starts = torch.from_numpy(rng.integers(0, gdata.numel() - T - 1, size=B)).to(device)
        return gdata[starts[:, None] + torch.arange(T + 1, device=device)]

    def lr_at(step: int, total: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    log = {"n_params": n_params, "steps_per_epoch": steps_per_epoch, "evals": [], "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}}
    cap = int(args.max_epochs * steps_per_epoch)
    total = cap if args.max_steps is None else min(cap, args.max_steps)
    best, best_state, best_step = float("inf"), None, -1
    model.train()
    t0 = time.time()
    step = 0
    timed = False
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total)
        xy = batch()
        with autocast:
            logits = model(input_ids=xy[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step in (10, 40) and args.budget_s and not timed:  # speed after warm-up (allocator, kernels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step == 10:
                t10 = time.time()
            else:
                per_step = (time.time() - t10) / 30
                fits = int((args.budget_s - (time.time() - t0)) / per_step * 0.93) + step  # evals take the rest
                total = min(total, max(fits, step + 1))
                timed = True
                print(f"{per_step * 1000:.1f} ms/step: {total} steps = {total / steps_per_epoch:.1f} epochs "
                      f"({total * B * T / 1e6:.0f}M tokens)", flush=True)
        if step % args.eval_every == 0 or step == total:
            val = evaluate() if n_eval else float("nan")
            elapsed = time.time() - t0
            log["evals"].append({"step": step, "epoch": step / steps_per_epoch, "train_loss": loss.item(),
                                 "heldout_loss": val, "lr": opt.param_groups[0]["lr"], "seconds": elapsed})
            print(f"step {step}/{total} epoch {step / steps_per_epoch:.1f} train {loss.item():.3f} "
                  f"held-out {val:.3f} (ppl {math.exp(val):.1f}) {elapsed:.0f} s", flush=True)
            if val < best:
                best, best_step = val, step
                best_state = {k: v.detach().to("cpu", torch.bfloat16, copy=True) for k, v in model.state_dict().items()}
    log.update(best_heldout_loss=best, best_step=best_step, steps=step, seconds=time.time() - t0)
    print(f"best held-out loss {best:.3f} (ppl {math.exp(best):.1f}) at step {best_step}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", torch.bfloat16)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out, max_shard_size="15MB")
    for f in (work / "model").iterdir():  # the skeleton's config, generation config and tokenizer win
        shutil.copy2(f, out / f.name)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


def finish(args) -> None:
    work, out = args.work, args.out
    shutil.copy2(work / "heldout.txt", out / "heldout.txt")
    corpus = json.loads((work / "corpus.json").read_text())
    log_path = out / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    recipe = {"command": "python scripts/pretrain_small_lm.py all --docs python3.11-doc_3.11.2-6+deb12u9_all.deb "
                         "--max-steps 1787 --budget-s 0 --out models/small-lm",
              "corpus": corpus, "model": MODEL_CONFIG, "training": log}
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    if log_path.exists():
        log_path.unlink()
    sizes = {f.name: f.stat().st_size for f in out.iterdir()}
    print(json.dumps(sizes, indent=1), f"total {sum(sizes.values()) / 2**20:.1f} MiB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)

    def common(sp, need_docs=False, need_out=False):
        sp.add_argument("--work", type=Path, default=REPO / ".small-lm-build", help="build folder")
        sp.add_argument("--seed", type=int, default=0)
        if need_docs:
            sp.add_argument("--docs", type=Path, required=True,
                            help="Debian python3.X-doc .deb, or the html/_sources folder of the Python docs")
        if need_out:
            sp.add_argument("--out", type=Path, default=REPO / "models" / "small-lm")

    def training(sp):
        sp.add_argument("--device", default=None)
        sp.add_argument("--seq-len", type=int, default=512)
        sp.add_argument("--batch-size", type=int, default=64)
        sp.add_argument("--lr", type=float, default=2e-3)
        sp.add_argument("--min-lr-ratio", type=float, default=0.1)
        sp.add_argument("--warmup", type=int, default=200)
        sp.add_argument("--weight-decay", type=float, default=0.1)
        sp.add_argument("--dropout", type=float, default=0.2)
        sp.add_argument("--max-epochs", type=float, default=40)
        sp.add_argument("--max-steps", type=int, default=None, help="cap (for a dry run)")
        sp.add_argument("--budget-s", type=float, default=300, help="training time budget (0: none)")
        sp.add_argument("--eval-every", type=int, default=250)
        sp.add_argument("--eval-windows", type=int, default=256)

    sp = sub.add_parser("prepare", help="corpus, tokenizer, token files, model skeleton (CPU)")
    common(sp, need_docs=True)
    sp.set_defaults(func=prepare)
    sp = sub.add_parser("train", help="pretrain on the token files, write the model directory")
    common(sp, need_out=True)
    training(sp)
    sp.set_defaults(func=train)
    sp = sub.add_parser("finish", help="add heldout.txt and recipe.json to the model directory")
    common(sp, need_out=True)
    sp.set_defaults(func=finish)
    sp = sub.add_parser("all", help="prepare, train and finish")
    common(sp, need_docs=True, need_out=True)
    training(sp)
    sp.set_defaults(func=lambda a: (prepare(a), train(a), finish(a)))
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
