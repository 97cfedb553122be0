"""Speed rewrites of the model must not change what it computes: the mask head's split ``lay1``
and channels-last 3-D head (always on), and ``optimize_for_inference`` (folded FrozenBN,
channels-last backbone), checked against the plain formulas and the official reference outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from vistr.checkpoint import load_official_vistr, official_model_config
from vistr.config import load_config
from vistr.models import build_model
from vistr.models.inference_opt import fold_frozen_batchnorms, optimize_for_inference
from vistr.models.segmentation import MaskHeadSmallConv, apply_sequence_head, instance_sequence_head
from vistr.models.vistr import VisTR

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA.parent))
from reference_fill import reference_input, reference_state_dict  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_split_lay1_equals_the_convolution_of_the_concatenation() -> None:
    torch.manual_seed(0)
    head = MaskHeadSmallConv(24 + 4, (32, 16, 8), [12, 8, 8, 8]).double()
    nn.init.normal_(head.lay1.bias)
    x = torch.randn(3, 24, 5, 7, dtype=torch.float64)  # 3 frames
    attn = torch.randn(3, 4, 4, 5, 7, dtype=torch.float64)  # 4 slots, 4 heads
    official = head.lay1(torch.cat([x.repeat_interleave(4, dim=0), attn.flatten(0, 1)], dim=1))
    assert _rel(head._lay1(x, attn), official) <= 1e-13
    assert {n for n, _ in head.named_parameters() if n.startswith("lay1")} == {"lay1.weight", "lay1.bias"}


def test_channels_last_3d_head_equals_the_plain_layout() -> None:
    torch.manual_seed(1)
    head = instance_sequence_head(6, 4).double()
    feats = torch.randn(2 * 5 * 3, 6, 8, 9, dtype=torch.float64)  # (clip, frame, slot)
    got = apply_sequence_head(head, feats, batch=2, frames=5, three_d=True)
    seq = feats.view(2, 5, 3, 6, 8, 9).permute(0, 2, 3, 1, 4, 5).reshape(6, 6, 5, 8, 9)
    want = head(seq).view(2, 3, 5, 8, 9).transpose(1, 2).reshape(2, 15, 8, 9)  # q = t·n + slot
    assert got.shape == (2, 15, 8, 9)
    assert _rel(got, want) <= 1e-13


def _randomize_frozen_bn(model: nn.Module) -> None:
    """Non-trivial statistics, else folding an identity BN would prove nothing."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
            m.bias.copy_(0.1 * torch.randn(c, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(1 + 0.5 * torch.rand(c, generator=g))


def test_optimized_copy_matches_and_leaves_the_model_untouched() -> None:
    torch.manual_seed(3)
    cfg = load_config("tiny_cpu", {"model.backbone_norm": "frozen_bn"}).model  # the official backbone
    model = build_model(cfg, train_backbone=True).eval()
    _randomize_frozen_bn(model)
    nn.init.normal_(model.mask_head.conv_offset.weight, std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    fast = optimize_for_inference(model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training
    assert fast.vistr.backbone[0].body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())

    clip = torch.randn(cfg.num_frames, 3, 64, 96)
    with torch.inference_mode():
        want, got = model(clip), fast(clip)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert _rel(got[key], want[key]) <= 1e-5, key


def test_fold_counts_every_resnet_batchnorm_and_rejects_unpaired_ones() -> None:
    model = build_model(official_model_config("resnet50"), train_backbone=False)
    body = model.vistr.backbone[0].body
    assert fold_frozen_batchnorms(body) == 53  # stem + 16 blocks x 3 + 4 downsamples
    bad = nn.Sequential(nn.ReLU(), FrozenBatchNorm2d(4))
    with pytest.raises(ValueError, match="expected the Conv2d '0' before it, found ReLU"):
        fold_frozen_batchnorms(bad)
    with pytest.raises(TypeError, match="expects a VisTR model"):
        optimize_for_inference(bad)  # type: ignore[arg-type]


def test_fold_is_exact_in_float64() -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False).double()
    bn = FrozenBatchNorm2d(5).double()
    _randomize_frozen_bn(bn)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    want = bn(conv(x))
    seq = nn.Sequential(conv, bn)
    assert fold_frozen_batchnorms(seq) == 1 and isinstance(seq[1], nn.Identity)
    assert _rel(seq(x), want) <= 1e-14
    assert _rel(F.conv2d(x, conv.weight, conv.bias, padding=1), want) <= 1e-14


def test_optimized_r50_matches_the_official_outputs() -> None:
    """The folded, channels-last copy against the official implementation's outputs (≤1e-4, as
    for the model itself) and against the unoptimized model (≤1e-5)."""
    ref = np.load(DATA / "official_outputs_r50_64x96.npz")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VisTR(official_model_config("resnet50")).state_dict().items()}
    model = load_official_vistr({"model": reference_state_dict(shapes)}, "resnet50")
    fast = optimize_for_inference(model)
    with torch.inference_mode():
        out, plain = fast(reference_input()), model(reference_input())
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        want = torch.from_numpy(ref[key])
        assert _rel(out[key], want) <= 1e-4, key
        assert _rel(out[key], plain[key]) <= 1e-5, key
