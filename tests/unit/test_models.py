"""VisTR model: positional encoding, shapes, ablation switches, gradients, batching, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vistr.config import ConfigError, ModelConfig, load_config
from vistr.models import build_model
from vistr.models.position_encoding import PositionEmbeddingSine3D
from vistr.models.vistr import VisTR

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# The tiny_cpu preset with the sizes these tests hard-code pinned (the preset may evolve).
# The official architecture (FrozenBatchNorm backbone) at tiny_cpu's sizes.
PINNED = {"num_frames": 6, "num_slots": 4, "hidden_dim": 96, "backbone_norm": "frozen_bn"}


def tiny(**overrides) -> VisTR:
    cfg = load_config("tiny_cpu", {f"model.{k}": v for k, v in {**PINNED, **overrides}.items()})
    torch.manual_seed(0)
    return build_model(cfg).eval()


def clip(
    model: VisTR, batch: int | None = 1, height: int = 64, width: int = 64, seed: int = 1
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (
        (model.num_frames, 3, height, width) if batch is None else (batch, model.num_frames, 3, height, width)
    )
    return torch.randn(shape, generator=gen)


# ---------------------------------------------------------------- positional encoding (Eq. 1)


def test_position_encoding_matches_eq1_by_hand():
    d, frames, h, w = 24, 3, 2, 4
    pos = PositionEmbeddingSine3D(d)(torch.zeros(1, frames, h, w, dtype=torch.bool))
    assert pos.shape == (1, frames, d, h, w)
    feats = d // 3
    for t, y, x in [(0, 0, 0), (2, 1, 3), (1, 0, 2)]:
        coords = {"z": (t + 1) / (frames + 1e-6), "y": (y + 1) / (h + 1e-6), "x": (x + 1) / (w + 1e-6)}
        for axis_index, value in enumerate(coords.values()):
            for k in range(feats):
                omega = 1.0 / 10000 ** (2 * (k // 2) / feats)
                angle = value * 2 * math.pi * omega
                expected = math.sin(angle) if k % 2 == 0 else math.cos(angle)
                got = pos[0, t, axis_index * feats + k, y, x].item()
                assert got == pytest.approx(expected, abs=2e-6), (t, y, x, axis_index, k)


def test_position_encoding_normalizes_over_unpadded_extent():
    mask = torch.zeros(1, 2, 3, 5, dtype=torch.bool)
    mask[..., 3:] = True  # the two right columns are padding
    pos = PositionEmbeddingSine3D(6)(mask)
    # x channel 0 (sin): the last valid column sits at 2π·3/(3+eps), i.e. sin ≈ 0.
    assert pos[0, 0, 4, 0, 2].item() == pytest.approx(math.sin(2 * math.pi * 3 / (3 + 1e-6)), abs=1e-5)


def test_position_encoding_rejects_bad_dim():
    with pytest.raises(ValueError, match="divisible by 3"):
        PositionEmbeddingSine3D(100)


# ---------------------------------------------------------------- shapes


# Every preset, and every Table 1 / from-scratch switch on the tiny preset.
VARIANTS = {p.stem: (p, {}) for p in CONFIGS.glob("*.yaml")} | {
    f"tiny_{key.split('.')[1]}_{value}": (CONFIGS / "tiny_cpu.yaml", {key: value})
    for key, values in {"model.query_level": ["video", "frame", "instance"], "model.position_encoding": [False],
                        "model.mask_features": ["cnn"], "model.mask_head": ["2d"],
                        "model.backbone_norm": ["group_norm"]}.items()
    for value in values
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_shapes_for_every_preset(variant):
    path, overrides = VARIANTS[variant]
    # Paper presets keep their architecture; T is cut to 2 to keep a CPU forward short.
    cfg = load_config(path, {"model.num_frames": 2, **overrides})
    model = build_model(cfg).eval()
    m = cfg.model
    with torch.no_grad():
        out = model(torch.randn(1, 2, 3, 64, 96))
    queries = m.num_slots * 2
    assert out["pred_logits"].shape == (1, queries, m.num_classes + 1)
    assert out["pred_boxes"].shape == (1, queries, 4)
    assert out["pred_masks"].shape == (1, queries, 16, 24)
    assert len(out["aux_outputs"]) == (m.dec_layers - 1 if m.aux_loss else 0)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


@pytest.mark.parametrize(
    "level,embeddings", [("prediction", 24), ("instance", 4), ("frame", 6), ("video", 1)]
)
def test_query_levels(level, embeddings):
    model = tiny(query_level=level)
    n, frames = model.num_slots, model.num_frames
    assert model.vistr.query_embed.weight.shape == (embeddings, 96)
    queries = model.query_positions().view(frames, n, -1)  # q = t·n + slot
    weight = model.vistr.query_embed.weight
    for t in range(frames):
        for k in range(n):
            index = {"prediction": t * n + k, "instance": k, "frame": t, "video": 0}[level]
            assert torch.equal(queries[t, k], weight[index])
    with torch.no_grad():
        out = model(clip(model))
    assert out["pred_logits"].shape == (1, n * frames, model.config.num_classes + 1)
    assert out["pred_masks"].shape == (1, n * frames, 16, 16)
    if level == "video":  # identical decoder inputs -> identical class/box predictions
        assert torch.allclose(
            out["pred_logits"][0], out["pred_logits"][0, :1].expand(n * frames, -1), atol=1e-5
        )


def test_unbatched_clip_and_other_frame_counts_and_odd_sizes():
    model = tiny(num_frames=3)
    x = clip(model, batch=None, height=70, width=90)
    with torch.no_grad():
        out = model(x)
    assert out["pred_masks"].shape == (1, 3 * 4, 18, 23)  # layer1 of ResNet: ceil(H/4), ceil(W/4)


# ---------------------------------------------------------------- layout and batching


def _capture(module: torch.nn.Module, store: dict, key: str, inputs: bool = False):
    def hook(mod, args, output):
        store[key] = args if inputs else output

    return module.register_forward_hook(hook)


def test_batch_of_two_equals_two_single_clips():
    model = tiny()
    x = torch.cat([clip(model, seed=1), clip(model, seed=2)])
    with torch.no_grad():
        both = model(x)
        singles = [model(x[i : i + 1]) for i in range(2)]
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        ref = torch.cat([s[key] for s in singles])
        assert torch.allclose(both[key], ref, atol=1e-5, rtol=1e-4), key
    assert torch.allclose(
        both["aux_outputs"][0]["pred_boxes"],
        torch.cat([s["aux_outputs"][0]["pred_boxes"] for s in singles]),
        atol=1e-5,
    )


def test_3d_head_is_per_slot_over_time_like_the_official_loop():
    model = tiny()
    store: dict = {}
    _capture(model.mask_head, store, "feats")
    with torch.no_grad():
        out = model(clip(model))
        feats = store["feats"]  # [T·n, c, h, w] ordered (frame, slot)
        n, frames = model.num_slots, model.num_frames
        per_frame = feats.view(frames, n, *feats.shape[1:])
        for k in range(n):  # official: frame_masks[:, k] -> [1, c, T, h, w] -> head
            seq = per_frame[:, k].permute(1, 0, 2, 3).unsqueeze(0)
            mask_k = model.insmask_head(seq)[0, 0]  # [T, h, w]
            for t in range(frames):
                assert torch.allclose(out["pred_masks"][0, t * n + k], mask_k[t], atol=1e-5)


def test_2d_mask_head_is_one_conv_per_frame_and_slot():
    model = tiny(mask_head="2d")
    assert isinstance(model.insmask_head, torch.nn.Conv2d) and model.insmask_head.out_channels == 1
    store: dict = {}
    _capture(model.mask_head, store, "feats")
    with torch.no_grad():
        out = model(clip(model))
        expected = model.insmask_head(store["feats"])[:, 0]
    assert torch.allclose(out["pred_masks"][0], expected, atol=1e-6)


@pytest.mark.parametrize("source", ["transformer", "cnn"])
def test_mask_features_switch(source):
    model = tiny(mask_features=source)
    store: dict = {}
    _capture(model.vistr.input_proj, store, "cnn")
    _capture(model.mask_head, store, "args", inputs=True)
    _capture(model.bbox_attention, store, "attn_args", inputs=True)
    with torch.no_grad():
        model(clip(model))
    fused, memory = store["args"][0], store["attn_args"][1]
    assert not torch.allclose(store["cnn"], memory, atol=1e-3)  # E differs from O
    assert torch.equal(fused, store["cnn"] if source == "cnn" else memory)


def test_position_encoding_switch():
    """Without positions the transformer is blind to frame order: reversing time changes nothing."""
    x = clip(tiny())
    for enabled in (False, True):
        model = tiny(position_encoding=enabled)
        with torch.no_grad():
            a, b = model(x)["pred_logits"], model(x.flip(1))["pred_logits"]
        assert torch.allclose(a, b, atol=1e-5) is (not enabled)


# ---------------------------------------------------------------- training behaviour


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one():
    model = tiny().train()
    with torch.no_grad():  # zero-initialised biases (b_v, conv_offset) would hide paths at init
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.normal_(0.0, 0.1)
    out = model(clip(model, height=48, width=48))
    loss = out["pred_logits"].square().mean() + out["pred_boxes"].mean() + out["pred_masks"].square().mean()
    loss = loss + sum(a["pred_logits"].square().mean() + a["pred_boxes"].mean() for a in out["aux_outputs"])
    loss.backward()
    for name, p in model.named_parameters():
        frozen = "backbone" in name and not any(f"layer{i}" in name for i in (2, 3, 4))
        assert p.requires_grad is not frozen, name
        if frozen:
            assert p.grad is None, name
        elif name == "vistr.transformer.decoder.layers.0.self_attn.in_proj_weight":
            # DETR property: the first decoder layer's values are W_v·0 + b_v (tgt starts at zero),
            # so its self-attention output is constant in q, k and W_v: the gradient is 0 up to rounding.
            assert p.grad is not None and p.grad.abs().max() < 1e-7, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert sum(not p.requires_grad for p in model.parameters()) > 0


def test_lr_backbone_zero_freezes_whole_backbone():
    cfg = load_config("tiny_cpu", {"train.lr_backbone": 0.0})
    model = build_model(cfg)
    assert all(not p.requires_grad for p in model.vistr.backbone.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "backbone" not in n)


def test_backbone_weights_are_loaded_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    resnet = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), path)
    model = tiny(backbone_weights=str(path))
    body = model.vistr.backbone[0].body
    assert torch.equal(body.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)
    assert torch.equal(body.bn1.running_var, resnet.bn1.running_var)
    with pytest.raises(ValueError, match="does not exist"):
        tiny(backbone_weights=str(tmp_path / "nope.pth"))


def test_small_hidden_dims_use_valid_group_norms():
    model = VisTR(
        ModelConfig(backbone="resnet18", hidden_dim=48, enc_layers=1, dec_layers=1, num_frames=2, num_slots=2)
    )
    gns = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_channels % m.num_groups == 0 for m in gns)
    assert [m.num_channels for m in gns][:5] == [56, 24, 12, 6, 3]  # d+heads, d/2, d/4, d/8, d/16


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "shape,mask_shape,match",
    [
        ((3, 64, 64), None, "expects a clip"),
        ((1, 1, 6, 3, 64, 64), None, "expects a clip"),
        ((1, 5, 3, 64, 64), None, "configured for T=6"),
        ((1, 6, 1, 64, 64), None, "3 \\(RGB\\) channels"),
        ((1, 6, 3, 64, 64), (1, 6, 64, 32), "pad_mask must have shape \\[1, 6, 64, 64\\]"),
    ],
)
def test_bad_input_raises_clear_value_error(shape, mask_shape, match):
    model = tiny()
    mask = None if mask_shape is None else torch.zeros(mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape), mask)


def test_padding_mask_hides_padded_pixels_from_attention():
    model = tiny()
    x = clip(model)
    mask = torch.zeros(1, 6, 64, 64, dtype=torch.bool)
    mask[..., 32:] = True
    store: dict = {}
    _capture(model.bbox_attention, store, "attn")
    with torch.no_grad():
        out = model(x, mask)
    attn = store["attn"]  # [T, n, heads, 2, 2]
    assert torch.all(attn[..., 1] == 0) and torch.allclose(attn.flatten(2).sum(-1), torch.ones(6, 4))
    assert torch.isfinite(out["pred_masks"]).all()


def test_importing_models_does_not_import_ray_or_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, vistr.models, vistr.checkpoint; print('ray' in sys.modules or 'mlflow' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_from_scratch_backbone_normalises_and_trains_every_layer():
    frozen = tiny().vistr.backbone[0].body
    scratch = build_model(load_config("tiny_cpu", {"model.backbone_norm": "group_norm"})).vistr.backbone[0].body
    assert not frozen.conv1.weight.requires_grad and frozen.layer2[0].conv1.weight.requires_grad
    assert all(p.requires_grad for p in scratch.parameters())
    assert isinstance(scratch.layer4[0].bn1, torch.nn.GroupNorm) and scratch.layer4[0].bn1.num_groups == 32
    # GroupNorm: every channel group of a layer's output has zero mean, whatever the input's offset
    x = torch.randn(2, 3, 64, 64) + 5.0
    y = scratch.layer1[0].bn1(scratch.layer1[0].conv1(scratch.maxpool(scratch.conv1(x))))
    assert y.view(2, 32, -1).mean(-1).abs().max() < 1e-4


def test_group_norm_backbone_refuses_pretrained_weights():
    with pytest.raises(ConfigError, match="backbone_norm=group_norm.*frozen_bn"):
        load_config("tiny_cpu", {"model.backbone_norm": "group_norm", "model.backbone_weights": "r18.pth"})


def _layer4_dilations(body: torch.nn.Module) -> list[set[int]]:
    """Per block of layer4: the dilations of its 3x3 convs."""
    return [{m.dilation[0] for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
            for block in body.layer4]


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_dilation_of_basic_block_resnets_follows_torchvision_bottleneck_rule(name):
    from vistr.models.backbone import ResNetBackbone

    plain = ResNetBackbone(name, True, dilation=False, norm="group_norm")
    dilated = ResNetBackbone(name, True, dilation=True, norm="group_norm")
    bottleneck = ResNetBackbone("resnet50", True, dilation=True)  # torchvision's own dilation
    # Weights are interchangeable: same names and shapes (pretrained ResNet-18 files still load).
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in dilated.state_dict().items()}
    # Same rule as torchvision's replace_stride_with_dilation: first block 1, later blocks 2.
    assert _layer4_dilations(dilated.body) == [{1}] + [{2}] * (len(dilated.body.layer4) - 1)
    assert _layer4_dilations(bottleneck.body) == [{1}] + [{2}] * (len(bottleneck.body.layer4) - 1)
    frames = torch.randn(2, 3, 64, 96)
    assert [f.shape[-2:] for f in plain(frames)][2:] == [(4, 6), (2, 3)]
    assert [f.shape[-2:] for f in dilated(frames)][2:] == [(4, 6), (4, 6)]  # layer4 at stride 16
