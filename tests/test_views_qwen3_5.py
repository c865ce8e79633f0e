"""The view model for Qwen3.5's layout (vision tower + Gated-DeltaNet text model).

vLLM's CPU build cannot serve Qwen3.5 (its model module needs torchvision), so here the handles
file is written by hand, one shared tensor per checkpoint tensor with A_log in float32 as vLLM
holds it, to test our side of the attach: the HF class built on the meta device, buffers rebuilt,
every parameter bound, and logits equal to transformers loading the checkpoint itself. The same
attach against real vLLM runs on a GPU (tests/test_gpu.py). Served for text only, vLLM does not load
the vision tower: then those parameters come from the checkpoint, frozen, and nothing else may be missing.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

from apollo_train.shared import handles
from apollo_train.tiny_models import family_available
from worker.views import AttachError, attach

pytestmark = pytest.mark.skipif(not family_available("qwen3_5"), reason="transformers lacks Qwen3.5")


def shared_copy(t: torch.Tensor, path) -> dict:
    buf = torch.from_file(str(path), shared=True, size=t.numel() * t.element_size(), dtype=torch.uint8)
    buf.view(t.dtype).view(t.shape).copy_(t)
    return {
        "shape": list(t.shape),
        "stride": list(t.contiguous().stride()),
        "storage_offset": 0,
        "dtype": str(t.dtype).removeprefix("torch."),
        "shm": {"path": str(path), "nbytes": buf.numel()},
    }


def write_handles(model_dir, run_dir, skip=lambda name: False) -> dict:
    """A handles file sharing every checkpoint tensor but those ``skip`` names; returns the tensors."""
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    params, placements = {}, {}
    for i, (name, t) in enumerate(sorted(tensors.items())):
        if skip(name):
            continue
        if name.endswith("A_log"):
            t = t.float()  # vLLM keeps A_log in float32
        params[name] = shared_copy(t, run_dir / f"{i}.bin")
        placements[name] = {"param": name, "offset": 0, "shape": list(t.shape), "start": [0] * t.dim(),
                            "full_shape": list(t.shape), "checksum": handles.checksum(t)}
    meta = {"format": handles.FORMAT, "model_path": str(model_dir), "dtype": "bfloat16", "tp_size": 1, "error": None}
    handles.write(
        handles.handles_path(run_dir),
        {"__metadata__": meta, "params": params, "checkpoint": placements, "problems": {}},
    )
    return tensors


@pytest.mark.parametrize("vision_served", [True, False], ids=["multimodal", "text-only"])
def test_qwen3_5_views_bind_and_match_transformers(tiny_model, tmp_path, vision_served):
    model_dir = tiny_model("qwen3_5")
    tensors = write_handles(model_dir, tmp_path, skip=lambda name: not vision_served and ".visual." in name)

    model = attach(tmp_path).model
    a_logs = [p for n, p in model.named_parameters() if n.endswith("A_log")]
    assert a_logs and all(p.dtype == torch.float32 for p in a_logs)
    reference = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.equal(ours, theirs)
    model(input_ids=ids).logits.float().mean().backward()
    linear = [n for n, p in model.named_parameters() if "linear_attn.in_proj" in n and p.grad is not None]
    assert linear  # gradients reach the Gated-DeltaNet projections' views
    visual = {n: p for n, p in model.named_parameters() if ".visual." in n}
    assert visual and all(p.requires_grad == vision_served for p in visual.values())
    assert all(torch.equal(p, tensors[n]) for n, p in visual.items())


def test_a_missing_language_model_tensor_is_still_refused(tiny_model, tmp_path):
    model_dir = tiny_model("qwen3_5")
    missing = "layers.0.mlp.up_proj.weight"
    write_handles(model_dir, tmp_path, skip=lambda name: ".visual." in name or name.endswith(missing))
    with pytest.raises(AttachError, match=r"1 parameter\(s\) cannot be shared.*layers\.0\.mlp\.up_proj\.weight"):
        attach(tmp_path)
