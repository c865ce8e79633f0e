"""Where a checkpoint request may write: only what this server owns, and nothing is created on a refusal."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from apollo_train.shared.protocol import BadRequest, Conflict, Forbidden
from worker import checkpoint_target
from worker.checkpoint_target import STAMP, Target, checkpoints_under, keep_original, prune, resolve


@pytest.fixture
def dirs(tmp_path):
    root = tmp_path / "state" / "checkpoints"
    root.mkdir(parents=True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return root, model


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def stamp(d, time=0.0, id="x"):
    d.mkdir(parents=True, exist_ok=True)
    (d / STAMP).write_text(json.dumps({"id": id, "time": time}))


def test_default_is_the_served_model_dir(dirs):
    root, model = dirs
    assert resolve(None, root, model) == Target(model, in_place=True)


def test_relative_and_absolute_paths_inside_the_root(dirs):
    root, model = dirs
    assert resolve("run-1", root, model) == Target(root / "run-1", in_place=False)
    assert resolve("a/b", root, model).path == root / "a" / "b"
    assert resolve(str(root / "run-2"), root, model).path == root / "run-2"


@pytest.mark.parametrize("path, error, needle", [
    ("../escape", BadRequest, "'..'"),
    ("a/../../escape", BadRequest, "'..'"),
    ("~", BadRequest, "'~'"),
    ("~root/x", BadRequest, "'~'"),
    ("bad\x00name", BadRequest, "NUL"),
    (".", BadRequest, "root itself"),
    ("/etc/apollo", Forbidden, "outside the checkpoint root"),
    ("/tmp", Forbidden, "outside the checkpoint root"),
])
def test_refusals_create_nothing(dirs, tmp_path, path, error, needle):
    root, model = dirs
    before = tree(tmp_path)
    with pytest.raises(error, match=needle):
        resolve(path, root, model)
    assert tree(tmp_path) == before


def test_symlinks_in_any_component_are_refused(dirs, tmp_path):
    root, model = dirs
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "real").mkdir()
    (root / "real" / "inner").symlink_to(outside)
    for path in ("link", "link/sub", "real/inner", str(root / "link" / "x")):
        with pytest.raises(Forbidden, match="symlink"):
            resolve(path, root, model)
    assert list(outside.iterdir()) == []


def test_existing_directories_that_are_not_ours_are_a_409(dirs):
    root, model = dirs
    (root / "users").mkdir()
    (root / "users" / "notes.txt").write_text("mine")
    (root / "file").write_text("x")
    with pytest.raises(Conflict, match="not a checkpoint this server wrote"):
        resolve("users", root, model)
    with pytest.raises(Conflict, match="not a directory"):
        resolve("file", root, model)
    (root / "empty").mkdir()
    assert resolve("empty", root, model).path == root / "empty"
    stamp(root / "ours")
    assert resolve("ours", root, model).path == root / "ours"
    assert (root / "users" / "notes.txt").read_text() == "mine"


def test_the_model_dir_inside_the_root_cannot_be_a_target(tmp_path):
    root = tmp_path / "root"
    model = root / "model"
    model.mkdir(parents=True)
    with pytest.raises(Conflict, match="must not contain each other"):
        resolve("model", root, model)


def test_a_hub_cache_snapshot_is_not_written_in_place(dirs, tmp_path, monkeypatch):
    root, _ = dirs
    monkeypatch.setattr(checkpoint_target, "_in_hub_cache", lambda path: True)
    with pytest.raises(BadRequest, match="Hugging Face cache"):
        resolve(None, root, tmp_path / "snapshot")


def test_prune_keeps_the_newest_copies(dirs):
    root, _ = dirs
    for i in range(5):
        stamp(root / f"c{i}", time=float(i), id=f"id{i}")
    (root / "not-ours").mkdir()
    removed = prune(root, keep=3)
    assert [s["id"] for s in removed] == ["id0", "id1"]
    assert [p.name for p, _ in checkpoints_under(root)] == ["c2", "c3", "c4"]
    assert (root / "not-ours").is_dir()


def test_the_original_weights_are_kept_once(dirs):
    root, model = dirs
    save_file({"w": torch.ones(2)}, model / "model.safetensors")
    (model / "README.md").write_text("readme")
    kept = keep_original(model, root)
    assert kept == root / "original-model"
    assert (kept / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert (kept / "README.md").read_text() == "readme"
    assert os.stat(kept / "README.md").st_ino == os.stat(model / "README.md").st_ino  # a hard link, no copy
    assert keep_original(model, root) is None  # once
    stamp(model)
    assert keep_original(model, root) is None  # weights we wrote are not "original"
