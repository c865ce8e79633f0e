"""The HF view model over vLLM's served weights, for each model family vLLM's CPU build serves."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from apollo_train.shared import handles
from worker.views import AttachError, attach

FAMILIES = ["qwen3", "qwen2", "llama"]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, start_server, tiny_model):
    """(server, attached view model) per family, on an untrained server of its own."""
    family = request.param
    srv = start_server(tiny_model(family), api_key=None)
    return family, srv, attach(srv.run_dir)


def served_logprobs(srv) -> list[float]:
    c = srv.client
    body = {"model": c.model(), "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0}
    return c.request("POST", "/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"][1:]


def test_views_match_transformers(served):
    family, srv, attached = served
    model = attached.model
    reference = AutoModelForCausalLM.from_pretrained(srv.model, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 33, 100, 7, 42, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # Every HF parameter is a view (no copy) of vLLM's memory, and q/k/v share one fused tensor.
    storages = {p.untyped_storage().data_ptr() for p in attached.vllm_tensors.values()}
    assert all(p.untyped_storage().data_ptr() in storages for p in model.parameters())
    if family in ("qwen3", "qwen2", "llama"):
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    if family == "llama":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_gradients_land_on_the_views(served):
    _, _, attached = served
    model = attached.model
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    model(ids).logits.float().logsumexp(-1).mean().backward()
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        assert params and all(p.grad is not None and p.grad.shape == p.shape for p in params)
    finally:
        model.zero_grad(set_to_none=True)


def test_an_edit_through_a_view_reaches_the_next_completion(served):
    _, srv, attached = served
    weight = attached.model.get_output_embeddings().weight
    saved = weight.detach().clone()
    before = served_logprobs(srv)
    with torch.no_grad():
        weight.zero_()
    try:
        edited = served_logprobs(srv)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    restored = served_logprobs(srv)
    vocab = attached.model.config.get_text_config().vocab_size
    assert edited == pytest.approx([-torch.log(torch.tensor(float(vocab))).item()] * len(edited), abs=1e-2)
    assert restored == pytest.approx(before, abs=1e-5)


def test_hybrid_gated_deltanet_layers_map_and_moe_experts_are_refused(start_server, tiny_model):
    """Qwen3-Next (the Qwen3.5 text architecture plus MoE, which vLLM's CPU build requires):
    vLLM re-lays MoE expert weights out for its kernels, so attaching is refused naming them;
    every Gated-DeltaNet tensor is placed exactly, A_log as vLLM's float32."""
    from safetensors.torch import load_file

    srv = start_server(tiny_model("qwen3_next"), api_key=None)
    with pytest.raises(AttachError) as err:
        attach(srv.run_dir)
    message = str(err.value)
    assert "experts.gate_up_proj" in message and "experts.down_proj" in message
    assert "linear_attn" not in message and "self_attn" not in message
    assert all(lp < 0 for lp in served_logprobs(srv))  # vLLM serves on, with unpacked conv weights
    status = srv.client.status()
    assert status["state"] == "error" and "cannot be shared" in status["error"]

    content = handles.read(handles.handles_path(srv.run_dir))
    checkpoint = load_file(str(srv.model / "model.safetensors"))
    gdn = [n for n in checkpoint if ".linear_attn." in n]
    assert {n.rsplit(".", 2)[-2] if n.endswith("weight") else n.rsplit(".", 1)[-1] for n in gdn} >= {
        "in_proj_qkvz",
        "in_proj_ba",
        "conv1d",
        "A_log",
        "dt_bias",
        "out_proj",
    }
    tensors = {name: handles.open_shared(e) for name, e in content["params"].items()}
    for name in gdn:
        entry = content["checkpoint"][name]
        numel = checkpoint[name].numel()
        view = tensors[entry["param"]].view(-1)[entry["offset"] : entry["offset"] + numel].view(entry["shape"])
        if name.endswith("A_log"):
            assert view.dtype == torch.float32
        assert torch.equal(view.to(checkpoint[name].dtype), checkpoint[name]), name


def test_a_mixture_of_experts_is_refused_naming_the_repacking_and_its_trained_copy_serves(
        start_server, tiny_model, tmp_path):
    """Qwen3-MoE on the CPU build: vLLM repacks the experts for its kernel, so in-place training is refused,
    naming why; a copy trained offline (`apollo-train train`) keeps the checkpoint's layout, and vLLM serves
    it as transformers computes it."""
    import json

    from worker.offline import main as train_offline

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Hello there."}]}) + "\n")
    assert train_offline([str(tiny_model("qwen3_moe")), str(data), "--out", str(tmp_path / "moe"),
                          "--optimizer", "apollo-mini", "--lr", "1e-4"]) == 0
    srv = start_server(tmp_path / "moe", api_key=None)
    status = srv.client.status()
    assert status["state"] == "error" and "a mixture of experts' stack" in status["error"], status
    assert "layout of its kernel's" in status["error"] and "experts.gate_up_proj" in status["error"]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.bfloat16)
    tokens = AutoTokenizer.from_pretrained(tmp_path / "moe")(PROMPT)["input_ids"]  # as vLLM tokenizes the prompt
    with torch.no_grad():
        logits = reference(torch.tensor([tokens])).logits.float().log_softmax(-1)[0]
    expected = [logits[i, tokens[i + 1]].item() for i in range(len(tokens) - 1)]
    served = served_logprobs(srv)[: len(expected)]  # the prompt's (the last is the generated token's)
    assert served == pytest.approx(expected, rel=0.01, abs=0.05), (served, expected)
