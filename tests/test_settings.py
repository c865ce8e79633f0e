"""One name per server option: `--train-<field>` flag, `APOLLO_TRAIN_<FIELD>` variable, validated once."""

from __future__ import annotations

import pytest

from apollo_train.cli import serve_command, split_cores, with_our_loader
from apollo_train.shared.config import LOAD_FORMAT, LOAD_FORMAT_RANDOM, WORKER_EXTENSION, Settings


def test_flags_become_environment_variables():
    cmd, env = serve_command(["/models/m", "--train-lr", "1e-4", "--train-barrier", "--no-train-step-in-backward",
                              "--train-max-lr", "0.05", "--port", "9000"], environ={})
    assert cmd[cmd.index("--model") + 1] == "/models/m" and "--port" in cmd and "9000" in cmd
    assert env["APOLLO_TRAIN_LR"] == "1e-4" and env["APOLLO_TRAIN_MAX_LR"] == "0.05"
    assert env["APOLLO_TRAIN_BARRIER"] == "1" and env["APOLLO_TRAIN_STEP_IN_BACKWARD"] == "0"
    settings = Settings.from_env(env)
    assert settings.lr == 1e-4 and settings.barrier and not settings.step_in_backward
    assert env["VLLM_PLUGINS"] == "apollo_train,apollo_train_router"


@pytest.mark.parametrize("argv, needle", [
    (["--train-lr", "1"], "at most max_lr"),
    (["--train-optimizer", "sgd"], "not one of"),
    (["--train-queue-size", "0"], "queue_size must be at least 1"),
    (["--train-max-request-bytes", "lots"], "APOLLO_TRAIN_MAX_REQUEST_BYTES='lots' is not a valid"),
])
def test_bad_values_are_refused_before_vllm_starts(argv, needle):
    with pytest.raises(ValueError, match=needle):
        serve_command(argv, environ={})


def test_our_loader_and_extension_replace_vllms_checkpoint_and_dummy_formats():
    assert with_our_loader(["--port", "1"]) == ["--port", "1", "--load-format", LOAD_FORMAT,
                                                "--worker-extension-cls", WORKER_EXTENSION]
    assert with_our_loader(["--load-format", "dummy"])[1] == LOAD_FORMAT_RANDOM
    assert with_our_loader(["--load-format=safetensors"])[1] == LOAD_FORMAT
    assert with_our_loader(["--load-format", "tensorizer"])[1] == "tensorizer"  # refused later, with the reason


def test_the_cpu_build_gets_a_kv_cache_size_unless_one_is_set(monkeypatch):
    import apollo_train.cli as cli

    monkeypatch.setattr(cli, "_cpu_build", lambda: True)
    _, env = serve_command([], environ={})
    assert int(env["VLLM_CPU_KVCACHE_SPACE"]) >= 1
    _, env = serve_command([], environ={"VLLM_CPU_KVCACHE_SPACE": "7"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "7"


def test_resolved_settings_put_checkpoints_under_the_state_dir(tmp_path):
    s = Settings(state_dir=str(tmp_path / "state")).resolved(tmp_path)
    assert s.checkpoint_root == str(tmp_path / "state" / "checkpoints")
    assert Settings.from_json(s.to_json()) == s


def test_a_model_id_is_read_from_its_snapshot_in_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from apollo_train.shared.config import resolve_model_dir

    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir("org/tiny") == snapshot.resolve()
    assert resolve_model_dir(str(snapshot)) == snapshot.resolve()
    with pytest.raises(ValueError, match="neither a directory nor a model in the local Hugging Face cache"):
        resolve_model_dir("org/missing")


def test_tensor_parallel_ranks_on_the_cpu_build_get_their_share_of_the_cores(monkeypatch):
    import apollo_train.cli as cli

    assert split_cores([0, 1, 2, 3, 4], 2) == "0,1|2,3" and split_cores([0], 2) is None
    monkeypatch.setattr(cli, "_cpu_build", lambda: True)
    monkeypatch.setattr(cli, "_numa_nodes", lambda: 1)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {4, 5, 6, 7})
    _, env = serve_command(["/models/m", "--tensor-parallel-size", "2"], environ={})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "4,5|6,7"
    _, env = serve_command(["/models/m", "-tp=2"], environ={"VLLM_CPU_OMP_THREADS_BIND": "auto"})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"  # the operator's choice stands
    _, env = serve_command(["/models/m"], environ={})
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env  # one rank: vLLM's own binding
