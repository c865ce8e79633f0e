"""The HF view model over vLLM's served weights, for each model family vLLM's CPU build serves: dense
(Qwen3, Qwen2, Llama), a mixture of experts (Qwen3-MoE) and the Gated-DeltaNet hybrid with experts
(Qwen3-Next, the Qwen3.5 text architecture plus MoE, which vLLM's CPU build requires)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from apollo_train.shared import handles
from worker.views import attach

FAMILIES = ["qwen3", "qwen2", "llama", "qwen3_moe", "qwen3_next"]
MIXTURES = ("qwen3_moe", "qwen3_next")
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


def test_an_edit_of_an_expert_stack_reaches_the_next_completion(served):
    """The experts' stacks are vLLM's own expert tensors, which it computes with (in their loaded layout)."""
    family, srv, attached = served
    if family not in MIXTURES:
        pytest.skip("no experts")
    stack = next(p for n, p in attached.model.named_parameters() if n.endswith("experts.down_proj"))
    saved = stack.detach().clone()
    before = served_logprobs(srv)
    with torch.no_grad():
        stack.zero_()
    try:
        edited = served_logprobs(srv)
    finally:
        with torch.no_grad():
            stack.copy_(saved)
    assert edited != pytest.approx(before, abs=1e-3)
    assert served_logprobs(srv) == pytest.approx(before, abs=1e-5)


def test_gated_deltanet_tensors_are_placed_exactly(served):
    """Every Gated-DeltaNet tensor of Qwen3-Next is placed exactly in vLLM's memory, A_log as vLLM's float32."""
    from safetensors.torch import load_file

    family, srv, _ = served
    if family != "qwen3_next":
        pytest.skip("no Gated DeltaNet")
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
