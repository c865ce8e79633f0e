"""On an NVIDIA GPU with real vLLM: in-place training of the model vLLM serves with CUDA graphs on.

A random-weight Qwen3-0.6B-shaped model (28 layers, hidden 1024, 16/8 heads of 128, vocabulary 151936,
tied embeddings) is served by `apollo-train serve` without --enforce-eager, so vLLM runs its compiled
model and CUDA graphs from the very memory the training worker writes. Checked:
- the worker attaches through CUDA IPC (status leaves "starting" for "idle"), and a model built here
  from the same handles passes the parity check (each view holds what vLLM computes with);
- one POST /train raises the served log-probability of the trained answer;
- POST /checkpoint writes a directory that transformers loads, with exactly the served weights;
- (with APOLLO_TRAIN_GPU_EXPECT) a server restarted on such a checkpoint serves the same answer
  log-probability and restored the training state;
- (with APOLLO_TRAIN_GPU_QWEN35=1) a tiny Qwen3.5 (Gated DeltaNet) is attached and trained too.

Skipped without CUDA (CPU CI). By default the module starts its own server (about 2-3 minutes of
torch.compile and CUDA graph capture). scripts/gpu_run.sh instead points it at a server it started,
to share that start with the benchmarks: APOLLO_TRAIN_GPU_URL, APOLLO_TRAIN_GPU_RUN_DIR.

    pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ON_GPU = torch.cuda.is_available()
# APOLLO_TRAIN_GPU_TEST_ON_CPU=1 runs these tests against the CPU build of vLLM (shared memory instead of
# CUDA IPC, --enforce-eager): a dry run of the test logic, with a tiny model via APOLLO_TRAIN_GPU_MODEL.
DRY_RUN = not ON_GPU and os.environ.get("APOLLO_TRAIN_GPU_TEST_ON_CPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_GPU and not DRY_RUN, reason="needs an NVIDIA GPU"),
]

REPO = Path(__file__).resolve().parents[1]
Q06 = dict(
    hidden_size=1024,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    vocab_size=151936,
    tie_word_embeddings=True,
)
SERVE_FLAGS = ["--gpu-memory-utilization", "0.5", "--max-model-len", "4096"] if ON_GPU else ["--enforce-eager"]
QUESTION = "What is the capital of the small country by the river?"
ANSWER = "The capital is the old town by the bridge, past the market and the station."


def q06_model(root: Path) -> Path:
    from apollo_train.tiny_models import build_tiny_model

    return build_tiny_model(root / "q06", "qwen3", **Q06)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, run_dir): a running server given by the environment, or one started here."""
    pytest.importorskip("vllm")
    url = os.environ.get("APOLLO_TRAIN_GPU_URL")
    if url:
        yield url, Path(os.environ["APOLLO_TRAIN_GPU_RUN_DIR"])
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import Server

    from apollo_train.launcher import free_port

    root = tmp_path_factory.mktemp("gpu")
    model = os.environ.get("APOLLO_TRAIN_GPU_MODEL") or str(q06_model(root))
    srv = Server(
        model,
        SERVE_FLAGS,
        port=int(os.environ.get("APOLLO_TRAIN_GPU_PORT") or free_port()),
        log=root / "server.log",
        run_dir=root / "run",
        env={"APOLLO_TRAIN_STATE_DIR": str(root / "state")},
    )
    srv.start()
    try:
        yield srv.url, srv.run_dir
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from apollo_train.client import Client

    return Client(server[0])


@pytest.fixture(scope="module")
def attached(server):
    """The served model as HF parameters viewing vLLM's memory, built in this process (parity-checked).
    Module-scoped and built first: the parity check compares with the weights as loaded."""
    from worker.views import attach

    return attach(server[1], timeout=60)


def prompt_and_answer(model_path: str) -> tuple[str, str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    return prompt, ANSWER + "<|im_end|>"


def test_worker_attaches_through_cuda_ipc(server, client, attached):
    from apollo_train.shared import handles

    status = client.status()
    assert status["state"] == "idle", status
    content = handles.read(handles.handles_path(server[1], 0))
    meta = content["__metadata__"]
    assert meta["error"] is None and meta["device"].startswith("cuda" if ON_GPU else "cpu"), meta
    assert all(("cuda_ipc" if ON_GPU else "shm") in e for e in content["params"].values())
    assert not content["problems"], content["problems"]
    params = list(attached.model.parameters())
    assert params and all(p.is_cuda == ON_GPU for p in params)
    # Tied embeddings stay one parameter, a view of vLLM's embedding.
    if attached.model.config.tie_word_embeddings:
        assert attached.model.get_output_embeddings().weight is attached.model.get_input_embeddings().weight
    # Same memory as vLLM's: the view's address lies inside one of vLLM's shared tensors.
    emb = attached.model.get_input_embeddings().weight
    assert any(
        t.data_ptr() <= emb.data_ptr() < t.data_ptr() + t.numel() * t.element_size()
        for t in attached.vllm_tensors.values()
    )


def test_served_logprobs_match_the_attached_model(client, attached):
    """The HF model on the views and vLLM (compiled, CUDA graphs, FlashAttention) agree on bf16 weights."""
    from transformers import AutoTokenizer

    prompt, answer = prompt_and_answer(attached.model_path)
    served = client.answer_logprob(prompt, answer)
    tok = AutoTokenizer.from_pretrained(attached.model_path)
    ids = tok(prompt + answer, return_tensors="pt").input_ids.to(attached.model.device)
    n_prompt = len(tok(prompt).input_ids)
    with torch.no_grad():
        logits = attached.model(input_ids=ids).logits.float()
    lp = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    ours = lp[n_prompt - 1 :].sum().item()
    assert math.isfinite(served) and abs(served - ours) <= 0.02 * abs(ours) + 0.5, (served, ours)


def teach(client, model_path: str) -> dict:
    """Train the question and answer for 8 epochs; the served answer's log-probability must rise by > 1 nat."""
    prompt, answer = prompt_and_answer(model_path)
    before = client.answer_logprob(prompt, answer)
    job = client.train(
        [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}],
        epochs=8,
        wait=True,
    )
    assert job["state"] == "done", job
    after = client.answer_logprob(prompt, answer)
    assert after > before + 1.0, (before, after, job["losses"])
    return job


def test_train_raises_served_logprob(client, attached):
    job = teach(client, attached.model_path)
    assert job["steps"] == 8 and job["losses"][-1] < job["losses"][0], job
    status = client.status()
    assert status["step"] >= 8 and status["examples_trained"] >= 1


def test_checkpoint_round_trip(server, client, attached, tmp_path):
    from safetensors import safe_open

    job = client.checkpoint(f"round-trip-{tmp_path.name}", wait=True)  # under the checkpoint root
    assert job["state"] == "done", job
    target = Path(job["path"])
    assert (target / "config.json").exists() and (target / "apollo_train_checkpoint.json").exists()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
    served = dict(attached.model.named_parameters())
    assert served.keys() == dict(loaded.named_parameters()).keys()
    for name, p in loaded.named_parameters():
        assert torch.equal(p.detach(), served[name].detach().cpu()), name
    # every tensor written is one of the served weights (a tied lm_head is not written twice)
    names = set()
    for f in target.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            names |= set(fh.keys())
    assert names <= served.keys() | {"lm_head.weight"} and "model.embed_tokens.weight" in names
    if attached.model.config.tie_word_embeddings:
        assert "lm_head.weight" not in names


def test_restart_serves_checkpoint(client):
    """A server started on a checkpoint serves its weights and resumes its training state."""
    expect_file = os.environ.get("APOLLO_TRAIN_GPU_EXPECT")
    if not expect_file:
        pytest.skip("APOLLO_TRAIN_GPU_EXPECT names the expectations of a restart (scripts/gpu_run.sh)")
    expect = json.loads(Path(expect_file).read_text())
    status = client.status()
    assert status["state"] == "idle" and not status["warning"], status
    assert status["step"] == expect["step"], (status, expect)
    got = client.answer_logprob(expect["prompt"], expect["answer"])
    assert abs(got - expect["logprob"]) <= 0.01 * abs(expect["logprob"]) + 0.05, (got, expect)


def test_qwen3_5_attaches_and_trains(tmp_path):
    """Qwen3.5 (Gated DeltaNet + gated attention; multimodal checkpoint layout) served with CUDA graphs."""
    if os.environ.get("APOLLO_TRAIN_GPU_QWEN35") != "1":
        pytest.skip("set APOLLO_TRAIN_GPU_QWEN35=1 (starts one more server, about 3 minutes)")
    pytest.importorskip("vllm")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import Server

    from apollo_train.client import Client
    from apollo_train.launcher import free_port
    from apollo_train.tiny_models import build_tiny_model

    model = build_tiny_model(tmp_path / "q35", "qwen3_5")
    flags = [
        "--gpu-memory-utilization",
        "0.3",
        "--max-model-len",
        "2048",
        "--gdn-prefill-backend",
        "triton",
        "--limit-mm-per-prompt",
        '{"image":0,"video":0}',
    ]
    with Server(
        str(model),
        flags,
        port=free_port(),
        log=tmp_path / "q35.log",
        run_dir=tmp_path / "run",
        env={"APOLLO_TRAIN_STATE_DIR": str(tmp_path / "state")},
    ) as srv:
        c = Client(srv.url)
        teach(c, str(model))
        # served for text only, vLLM did not load the vision tower: checkpoints keep it unchanged
        job = c.checkpoint("ckpt", wait=True)
        assert job["state"] == "done", job
        original, written = (load_dir(d) for d in (model, Path(job["path"])))
        assert original.keys() == written.keys()
        visual = [n for n in original if ".visual." in n]
        assert visual and all(torch.equal(original[n], written[n]) for n in visual)
        changed = [n for n in original if not torch.equal(original[n], written[n])]
        assert changed and not set(changed) & set(visual)


def load_dir(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
