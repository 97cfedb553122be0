"""Official VisTR checkpoints: exact key names/shapes, parameter counts, and outputs of the
official implementation (tests/data/official_outputs_r50_64x96.npz, FACTS.md "Reference outputs")."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vistr.checkpoint import CheckpointError, infer_backbone, load_official_vistr, official_model_config
from vistr.models.vistr import VisTR

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA.parent))
from reference_fill import reference_input, reference_state_dict  # noqa: E402

PARAM_COUNTS = {"resnet50": 57_116_129, "resnet101": 76_056_033}  # incl. frozen conv1/layer1


def reference_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    lines = (DATA / f"state_dict_{backbone.replace('resnet', 'r')}.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["name", "shape", "dtype"]
    out = {}
    for line in lines[1:]:
        name, shape, dtype = line.split("\t")
        assert dtype == "float32"
        out[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_official_names_shapes_and_parameter_counts(backbone):
    with torch.device("meta"):  # no memory, no init: names and shapes only
        model = VisTR(official_model_config(backbone))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = reference_shapes(backbone)
    assert sorted(set(expected) - set(shapes)) == [] and sorted(set(shapes) - set(expected)) == []
    assert shapes == expected
    assert infer_backbone(expected) == backbone
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[backbone]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 222_400  # conv1 + layer1 convs (FrozenBN has buffers only)


def rel_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours.numpy() - ref) / np.linalg.norm(ref))


def test_r50_outputs_match_the_official_implementation():
    ref = np.load(DATA / "official_outputs_r50_64x96.npz")
    model = load_official_vistr({"model": reference_state_dict(reference_shapes("resnet50"))}, "resnet50")
    assert not model.training
    x = reference_input()
    assert np.array_equal(x.numpy(), ref["input"])
    with torch.inference_mode():
        out = model(x)
    errors = {key: rel_err(out[key], ref[key]) for key in ("pred_logits", "pred_boxes", "pred_masks")}
    errors["aux_logits"] = rel_err(
        torch.stack([a["pred_logits"] for a in out["aux_outputs"]]), ref["aux_pred_logits"]
    )
    errors["aux_boxes"] = rel_err(
        torch.stack([a["pred_boxes"] for a in out["aux_outputs"]]), ref["aux_pred_boxes"]
    )
    assert out["pred_masks"].shape == ref["pred_masks"].shape
    assert all(err <= 1e-4 for err in errors.values()), errors


def test_official_loader_infers_backbone_and_rejects_mismatched_files():
    with torch.device("meta"):
        state = VisTR(official_model_config("resnet50", num_frames=2, num_slots=3)).state_dict()
    with pytest.raises(
        CheckpointError, match="query_embed has 6 queries but num_frames\\*num_slots = 36\\*10"
    ):
        load_official_vistr({"model": state})
    with pytest.raises(CheckpointError, match="holds a resnet50 backbone but backbone='resnet101'"):
        load_official_vistr({"model": state}, backbone="resnet101", num_frames=2, num_slots=3)
    del state["mask_head.dcn.weight"]
    state["mask_head.lay5.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError, match="missing keys: mask_head.dcn.weight; unexpected keys: mask_head.lay5.weight"
    ):
        load_official_vistr({"model": state}, num_frames=2, num_slots=3)
