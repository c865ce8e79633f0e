"""Learning where a loader puts each checkpoint tensor, and refusing what cannot be a view."""

from __future__ import annotations

import copy

import pytest
import torch

from apollo_train.vllm_worker.export import SharingRefused, check_shareable
from apollo_train.vllm_worker.weight_tracking import LoadRecorder


def load(recorder, weights, loader):
    for name, tensor in recorder.wrap_iterator(weights.items()):
        loader(name, tensor)


def test_fused_rows_padding_and_dtype_changes_are_placed():
    q, k, v = torch.randn(8, 4), torch.randn(2, 4), torch.randn(2, 4)
    emb = torch.randn(5, 4)
    a_log = torch.randn(3, dtype=torch.bfloat16)
    params = {"qkv": torch.zeros(12, 4), "emb": torch.zeros(8, 4), "a_log": torch.zeros(3)}
    offsets = {"q": 0, "k": 8, "v": 10}

    def loader(name, t):
        if name in offsets:  # like QKVParallelLinear.weight_loader: narrow the param, copy in
            params["qkv"].data.narrow(0, offsets[name], t.shape[0]).copy_(t)
        elif name == "emb":  # a padded vocabulary: the first rows
            params["emb"].data[: t.shape[0]] = t
        else:  # float32 in vLLM, bf16 in the checkpoint
            params["a_log"].data.copy_(t)

    rec = LoadRecorder()
    load(rec, {"q": q, "k": k, "v": v, "emb": emb, "a_log": a_log}, loader)
    placements, problems = rec.placements(params)
    assert problems == {}
    assert (placements["k"].param, placements["k"].offset, placements["k"].shape) == ("qkv", 32, (2, 4))
    for name, t in {"q": q, "k": k, "v": v, "emb": emb}.items():
        pl = placements[name]
        view = params[pl.param].view(-1)[pl.offset : pl.offset + t.numel()].view(pl.shape)
        assert torch.equal(view, t)
    assert placements["a_log"].param == "a_log"


def test_chunked_copies_of_one_tensor_are_one_placement():
    conv = torch.randn(6, 1, 4)
    param = torch.zeros(6, 1, 4)

    def loader(name, t):  # like mamba's sharded loader at one rank: chunk by chunk
        for start in (0, 2, 4):
            param.data[start : start + 2] = t[start : start + 2]

    rec = LoadRecorder()
    load(rec, {"conv": conv}, loader)
    placements, problems = rec.placements({"conv": param})
    assert problems == {} and placements["conv"].offset == 0


@pytest.mark.parametrize(
    "transform,reason",
    [
        (lambda t: t.t(), "converts or re-lays"),
        (lambda t: t * 2, "converts or re-lays"),
        (lambda t: t[::2], "converts or re-lays"),
    ],
)
def test_anything_but_a_plain_block_is_a_problem(transform, reason):
    w = torch.randn(4, 4)
    param = torch.zeros(4, 4)

    def loader(name, t):
        out = transform(t)
        param.data[: out.shape[0]].copy_(out)

    rec = LoadRecorder()
    load(rec, {"w": w}, loader)
    placements, problems = rec.placements({"w": param})
    assert "w" not in placements and reason in problems["w"]


def test_a_tensor_parallel_ranks_boxes_are_placed():
    """Column-parallel rows, row-parallel columns (a strided view of the checkpoint tensor), and a
    vocabulary shard copied into the first rows of a padded parameter."""
    w, emb = torch.randn(6, 8), torch.randn(10, 4)
    params = {"col": torch.zeros(3, 8), "row": torch.zeros(6, 4), "emb": torch.zeros(8, 4)}

    def loader(name, t):  # rank 1 of 2, as vLLM's parallel linear and vocabulary loaders do
        if name == "col":
            params["col"].data.copy_(t.narrow(0, 3, 3))
        elif name == "row":
            params["row"].data.copy_(t.narrow(1, 4, 4))
        else:
            shard = t.narrow(0, 8, 2)
            params["emb"][: shard.shape[0]].data.copy_(shard)

    rec = LoadRecorder()
    load(rec, {"col": w, "row": w, "emb": emb}, loader)
    placements, problems = rec.placements(params)
    assert problems == {}
    assert {n: (pl.start, pl.shape) for n, pl in placements.items()} == {
        "col": ((3, 0), (3, 8)), "row": ((0, 4), (6, 4)), "emb": ((8, 0), (2, 4))}
    assert torch.equal(params["row"], w[:, 4:]) and torch.equal(params["emb"][:2], emb[8:])


@pytest.fixture(scope="module")
def model_config(tiny_model):
    """vLLM's own ModelConfig of a tiny Qwen3 (as the engine builds it from `--model`)."""
    from vllm.config import ModelConfig

    return ModelConfig(model=str(tiny_model("qwen3")), dtype="bfloat16")


def vllm_configs(model_config, layer_types=None, experts=0, tp=1, pp=1, dp=1, **model_fields):
    """vLLM's real ModelConfig (these fields changed) and ParallelConfig."""
    from vllm.config import ParallelConfig

    model = copy.copy(model_config)
    model.hf_config = copy.copy(model_config.hf_config)
    if layer_types:
        model.hf_config.layer_types = layer_types
    if experts:
        model.hf_config.num_experts = experts
    for name, value in model_fields.items():
        setattr(model, name, value)
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp)
    return model, parallel


def test_unshareable_servers_are_refused_with_the_fix(model_config):
    def config(**kw):
        return vllm_configs(model_config, **kw)

    check_shareable(*config())
    with pytest.raises(SharingRefused, match="fp8 weights; in-place training needs unquantized weights"):
        check_shareable(*config(quantization="fp8"))
    with pytest.raises(SharingRefused, match="sleep-mode"):
        check_shareable(*config(enable_sleep_mode=True))
    with pytest.raises(SharingRefused, match="pipeline-parallel-size 1"):
        check_shareable(*config(pp=2))
    with pytest.raises(SharingRefused, match="data-parallel-size 1"):
        check_shareable(*config(dp=2))
    check_shareable(*config(tp=2))
    with pytest.raises(SharingRefused, match="Gated DeltaNet .* --tensor-parallel-size 1"):
        check_shareable(*config(tp=2, layer_types=["linear_attention", "full_attention"]))
    check_shareable(*config(experts=8))
    with pytest.raises(SharingRefused, match="mixture of experts, which in-place training shares at tensor parallel "
                                             "size 1 only"):
        check_shareable(*config(tp=2, experts=8))
