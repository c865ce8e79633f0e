import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import until
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from apollo_train.tiny_models import build_tiny_model
from worker import checkpoint
from worker.checkpoint import (
    INDEX_NAME,
    Abandoned,
    rename_exchange,
    snapshot,
    write_files_atomically,
    write_model_dir,
)
from worker.checkpoint_target import Target

REPO = Path(__file__).resolve().parents[1]
NON_WEIGHT_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "chat_template.jinja"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-qwen3", "qwen3")


@pytest.fixture(scope="module")
def sharded(tiny, tmp_path_factory) -> Path:
    """The tiny model saved in four shards with an index, as large checkpoints are."""
    out = tmp_path_factory.mktemp("sharded") / "model"
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(out, max_shard_size="300KB")
    for f in tiny.iterdir():
        if not f.name.endswith(".safetensors") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    assert len(list(out.glob("*.safetensors"))) == 4
    return out


def load(path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path)
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def trained(path) -> dict[str, torch.Tensor]:
    """The model's weights after a pretend training step (every weight moved)."""
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    return snapshot(model.state_dict())


def stored_keys(path: Path) -> dict[str, list[str]]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            assert st.metadata() == {"format": "pt"}
            out[f.name] = sorted(st.keys())
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


def leftovers(target: Path) -> list[Path]:
    """What a write left next to its target: temp or old copies of ours."""
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.apollo-train-"))


def test_snapshot_copies_and_keeps_ties():
    emb = torch.nn.Parameter(torch.randn(4, 3))
    w = torch.randn(6, 3)
    w_before, emb_before = w.clone(), emb.detach().clone()
    named = {"emb": emb, "head": emb, "a": w[:3], "b": w[3:], "empty": torch.empty(0)}
    snap = snapshot(named)
    assert snap["emb"] is snap["head"]  # tied: one copy
    assert snap["a"].data_ptr() != snap["b"].data_ptr()  # slices of one tensor are not ties
    assert not snap["emb"].requires_grad and snap["a"].is_contiguous()
    with torch.no_grad():
        emb.add_(1.0)
        w.zero_()
    assert torch.equal(snap["emb"], emb_before) and torch.equal(snap["a"], w_before[:3])


def test_write_new_dir_and_reload(tiny, tmp_path):
    weights = trained(tiny)
    calls = []
    info = write_model_dir(weights, source_dir=tiny, target_dir=tmp_path / "out",
                           extra_files={"training.json": b"{}"}, progress=lambda d, t: calls.append((d, t)))
    out = tmp_path / "out"
    assert info["path"] == str(out)
    assert set(info["files"]) == {p.name for p in tiny.iterdir()} | {"training.json"}
    assert NON_WEIGHT_FILES <= set(info["files"])
    assert info["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert stored_keys(out) == stored_keys(tiny)
    assert_same(load(out), dict(weights))
    for f in NON_WEIGHT_FILES:
        assert (out / f).read_bytes() == (tiny / f).read_bytes()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    # Progress: from zero, never backwards, ending at the total of tensor bytes.
    total = sum(t.numel() * t.element_size() for t in weights.values())
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert leftovers(out) == []


def test_in_place_write_keeps_shard_names_and_index(sharded, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(sharded, served)
    # Everything that is not a weight file being rewritten is kept, hard-linked: docs, history, other formats.
    (served / "README.md").write_text("about this model")
    (served / ".git" / "objects").mkdir(parents=True)
    (served / ".git" / "objects" / "ab").write_bytes(b"blob")
    (served / "pytorch_model.bin").write_bytes(b"other format")
    (served / "original").mkdir()
    (served / "original" / "consolidated.00.pth").write_bytes(b"more weights")
    (served / "link.txt").symlink_to("README.md")
    kept = ["README.md", ".git/objects/ab", "pytorch_model.bin", "original/consolidated.00.pth"]
    inodes = {f: (served / f).stat().st_ino for f in kept}
    before_index = json.loads((served / INDEX_NAME).read_text())
    before_keys = stored_keys(served)
    inode = served.stat().st_ino
    weights = trained(served)

    write_model_dir(weights, source_dir=served, target_dir=served)

    assert served.stat().st_ino != inode  # a new directory was swapped in
    assert {f: (served / f).stat().st_ino for f in kept} == inodes
    assert (served / "link.txt").is_symlink() and (served / "link.txt").read_text() == "about this model"
    assert stored_keys(served) == before_keys
    index = json.loads((served / INDEX_NAME).read_text())
    assert index["weight_map"] == before_index["weight_map"]
    assert index["metadata"]["total_size"] == before_index["metadata"]["total_size"]
    assert_same(load(served), dict(weights))
    assert leftovers(served) == []
    added = {"README.md", ".git", "pytorch_model.bin", "original", "link.txt"}
    assert sorted(p.name for p in served.iterdir()) == sorted({p.name for p in sharded.iterdir()} | added)


def test_tied_weights_are_saved_once(tmp_path_factory, tmp_path):
    llama = build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-llama", "llama")
    weights = trained(llama)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    write_model_dir(weights, source_dir=llama, target_dir=tmp_path / "out")
    assert stored_keys(tmp_path / "out") == stored_keys(llama)
    assert "lm_head.weight" not in stored_keys(llama)["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])


def test_new_tensors_go_to_the_last_shard_and_missing_ones_are_an_error(sharded, tmp_path):
    weights = dict(trained(sharded))
    weights["extra.bias"] = torch.ones(3)
    write_model_dir(weights, source_dir=sharded, target_dir=tmp_path / "out")
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["weight_map"]["extra.bias"] == "model-00004-of-00004.safetensors"
    assert "extra.bias" in stored_keys(tmp_path / "out")["model-00004-of-00004.safetensors"]

    del weights["model.norm.weight"]
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.norm.weight"):
        write_model_dir(weights, source_dir=sharded, target_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="not nested"):
        write_model_dir(weights, source_dir=tmp_path / "out", target_dir=tmp_path / "out" / "inside")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert leftovers(tmp_path / "out") == []


def test_source_without_safetensors_and_symlinks(tiny, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).symlink_to(f)  # like a Hugging Face cache snapshot
    (src / "pytorch_model.bin").write_bytes(b"stale weights")
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("kept")
    weights = trained(tiny)
    info = write_model_dir(weights, source_dir=src, target_dir=tmp_path / "out")
    out = tmp_path / "out"
    assert "pytorch_model.bin" not in info["files"] and "sub/notes.txt" in info["files"]
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert stored_keys(out) == {"model.safetensors": sorted(weights)}
    assert_same(load(out), dict(weights))


def test_writer_killed_midway_leaves_the_previous_dir(sharded, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(sharded, served)
    original = load(served)
    script = textwrap.dedent(f"""
        import os, pathlib, signal
        from safetensors.torch import load_file
        from worker.checkpoint import write_model_dir
        weights = {{}}
        for f in pathlib.Path({str(served)!r}).glob("*.safetensors"):
            weights.update({{n: t + 1 for n, t in load_file(f).items()}})
        def progress(done, total):
            if done >= total // 2:  # at least the first shard is complete
                os.kill(os.getpid(), signal.SIGKILL)
        write_model_dir(weights, source_dir={str(served)!r}, target_dir={str(served)!r}, progress=progress)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (tmp,) = leftovers(served)
    assert tmp.name.startswith(".served.apollo-train-tmp-")
    assert (tmp / "model-00001-of-00004.safetensors").is_file()  # it was killed while writing weights

    assert_same(load(served), original)  # the served dir is untouched and complete
    assert sorted(p.name for p in served.iterdir()) == sorted(p.name for p in sharded.iterdir())

    weights = trained(served)
    write_model_dir(weights, source_dir=served, target_dir=served)
    assert leftovers(served) == []
    assert_same(load(served), dict(weights))


def test_swap_without_renameat2_and_nothing_of_others_is_adopted(tiny, tmp_path, monkeypatch):
    target = tmp_path / "model"
    shutil.copytree(tiny, target)
    monkeypatch.setattr(checkpoint, "rename_exchange", lambda a, b: False)
    # Siblings that look like leftovers but are not ours (no lock file of a writer) stay untouched.
    for name in ("model.tmp-1234", "model.old-1234", ".model.apollo-train-tmp-5678"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_text("someone else's")
    weights = trained(target)
    write_model_dir(weights, source_dir=target, target_dir=target)
    assert_same(load(target), dict(weights))
    for name in ("model.tmp-1234", "model.old-1234", ".model.apollo-train-tmp-5678"):
        assert (tmp_path / name / "data").read_text() == "someone else's"


def test_an_abandoned_write_changes_nothing(tiny, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny, target)
    original = load(target)
    calls = []
    with pytest.raises(Abandoned):
        write_model_dir(trained(target), source_dir=target, target_dir=target,
                        should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert_same(load(target), original)
    assert leftovers(target) == []


def test_rename_exchange_swaps_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    if not rename_exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"
    with pytest.raises(FileNotFoundError):
        rename_exchange(tmp_path / "a", tmp_path / "missing")


def test_write_files_atomically(tmp_path):
    state = tmp_path / "state"
    info = write_files_atomically(state, {
        "registry.txt": b"k1\nk2\n",
        "optimizer.pt": lambda p: torch.save({"step": torch.tensor(3)}, p),
    })
    assert info["files"] == ["optimizer.pt", "registry.txt"]
    assert torch.load(state / "optimizer.pt")["step"] == 3
    write_files_atomically(state, {"registry.txt": b"k3\n"})  # the directory is replaced as a whole
    assert sorted(p.name for p in state.iterdir()) == ["registry.txt"]
    assert (state / "registry.txt").read_text() == "k3\n"

    def broken(path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_files_atomically(state, {"registry.txt": b"k4\n", "optimizer.pt": broken})
    assert (state / "registry.txt").read_text() == "k3\n"
    assert leftovers(state) == []
    with pytest.raises(ValueError, match="relative path inside"):
        write_files_atomically(state, {"../escape": b""})


def test_in_place_checkpoints_replace_their_state_and_copies_keep_theirs(tiny, tmp_path):
    """The served directory's stamp names only its newest state, so older ones go; a copy written with
    `path` names its own, which stays and is restored when the copy is served."""
    from worker import persist
    from worker.registry import DedupeRegistry
    from worker.replay import ReplayBuffer

    served = tmp_path / "served"
    shutil.copytree(tiny, served)
    model = AutoModelForCausalLM.from_pretrained(served)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state_dir = tmp_path / "state"

    root = state_dir / "checkpoints"

    def save(target=None, step=0):
        ckpt_id, write = persist.save(model=model, optimizer=optimizer, registry_keys=["k"], replay=b"",
                                      counters={"step": step}, model_path=str(served), state_dir=state_dir,
                                      target=target or Target(served, in_place=True), root=root, keep=3)
        write()
        return ckpt_id

    first = save(step=1)
    copy = save(target=Target(tmp_path / "copy", in_place=False), step=2)
    latest = save(step=3)
    assert sorted(p.name for p in state_dir.iterdir()) == sorted([copy, latest, "checkpoints"])
    assert (root / "original-served" / "model.safetensors").is_file()  # the weights the first sync replaced
    for directory, step in ((served, 3), (tmp_path / "copy", 2)):
        counters, warning = persist.restore(model, optimizer, DedupeRegistry(None), ReplayBuffer(4), str(directory),
                                            state_dir)
        assert warning is None and counters["step"] == step
    assert not (state_dir / first).exists()


def test_sigterm_during_a_write_abandons_it_cleanly(tiny, tmp_path):
    """The worker's shutdown path: SIGTERM while a checkpoint is written, a grace period too short to
    finish it, and the previous checkpoint (weights and training state) is left complete."""
    served = tmp_path / "served"
    shutil.copytree(tiny, served)
    original = load(served)
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import pathlib, signal, threading, time
        import torch
        from transformers import AutoModelForCausalLM
        from worker import persist
        from worker.checkpoint_target import Target
        from worker.recipe import finish_or_abandon

        served = pathlib.Path({str(served)!r})
        model = AutoModelForCausalLM.from_pretrained(served)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        abandon, stop = threading.Event(), threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())

        def slow(done, total):
            pathlib.Path({str(started)!r}).touch()
            time.sleep(0.2)  # a large model: every tensor takes a while

        _, write = persist.save(model=model, optimizer=optimizer, registry_keys=[], replay=b"", counters={{"step": 1}},
                                model_path=str(served), state_dir=pathlib.Path({str(tmp_path / "state")!r}),
                                target=Target(served, in_place=True), root=pathlib.Path({str(tmp_path / "root")!r}),
                                keep=3, progress=slow, should_stop=abandon.is_set)
        writer = threading.Thread(target=lambda: write())
        writer.start()
        stop.wait()
        finish_or_abandon(writer, abandon, grace=0.3)
        print("abandoned" if abandon.is_set() else "finished")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    until(lambda: started.exists() or proc.poll() is not None, 300, "the writer to start", every=0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "abandoned", err
    assert_same(load(served), original)  # the previous weights, complete
    assert leftovers(served) == []
    assert not any((tmp_path / "state").glob("*/optimizer.pt"))  # no training state names weights never written
