"""Our checkpoints (exact round trip, atomic write, strict keys) and DETR initialisation."""

from __future__ import annotations

import pytest
import torch

from vistr.checkpoint import (
    CheckpointError,
    config_from_checkpoint,
    load_checkpoint,
    load_detr_init,
    load_state_dict_strict,
    model_from_checkpoint,
    save_checkpoint,
)
from vistr.config import load_config
from vistr.models import build_model


@pytest.fixture(scope="module")
def cfg():
    sizes = {"num_frames": 2, "num_slots": 4, "hidden_dim": 96, "enc_layers": 1, "dec_layers": 1}
    return load_config("tiny_cpu", {f"model.{k}": v for k, v in sizes.items()})


def make(cfg, seed: int):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def test_round_trip_gives_bit_identical_outputs_and_training_state(cfg, tmp_path):
    model = make(cfg, 0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x = torch.randn(1, 2, 3, 64, 64)
    model.train()
    model(x)["pred_boxes"].sum().backward()
    optimizer.step()
    scheduler.step()
    model.eval()
    path = save_checkpoint(
        tmp_path / "ckpt" / "last.pth",
        model,
        optimizer,
        scheduler,
        epoch=3,
        global_step=42,
        config=cfg,
        extra={"val_AP": 0.5},
    )
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]  # the temp file was renamed away

    restored = make(cfg, 1)
    opt2 = torch.optim.AdamW([p for p in restored.parameters() if p.requires_grad], lr=1e-3)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    payload = load_checkpoint(path, restored, opt2, sched2)
    assert (payload["epoch"], payload["global_step"], payload["extra"]) == (3, 42, {"val_AP": 0.5})
    assert config_from_checkpoint(payload) == cfg
    assert sched2.state_dict() == scheduler.state_dict()
    state, state2 = optimizer.state_dict()["state"], opt2.state_dict()["state"]
    assert state.keys() == state2.keys() and all(
        torch.equal(state[k]["exp_avg"], state2[k]["exp_avg"]) for k in state
    )
    with torch.no_grad():
        a, b = model(x), restored(x)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(a[key], b[key]), key
    rebuilt, cfg2 = model_from_checkpoint(path)
    assert cfg2 == cfg and not rebuilt.training
    with torch.no_grad():
        assert torch.equal(rebuilt(x)["pred_masks"], a["pred_masks"])


def test_strict_loading_names_missing_extra_and_misshapen_keys(cfg):
    model = make(cfg, 0)
    state = model.state_dict()
    state.pop("vistr.class_embed.bias")
    state["mask_head.lay5.weight"] = torch.zeros(3)
    state["vistr.query_embed.weight"] = torch.zeros(5, 96)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, state, "file.pth")
    message = str(info.value)
    assert "file.pth" in message
    assert "missing keys: vistr.class_embed.bias" in message
    assert "unexpected keys: mask_head.lay5.weight" in message
    assert "vistr.query_embed.weight (5, 96) vs model (8, 96)" in message


def test_load_checkpoint_refuses_foreign_files(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a vistr checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_detr_init_renames_prefix_and_reports_what_it_skipped(cfg, tmp_path):
    source = make(cfg, 0)
    detr = {
        ("detr." + k[len("vistr.") :] if k.startswith("vistr.") else k): v.clone()
        for k, v in source.state_dict().items()
    }
    for key in [k for k in detr if k.startswith(("insmask_head.", "mask_head.dcn", "mask_head.conv_offset"))]:
        del detr[key]  # DETR has no DCN and no 3-D head
    detr["mask_head.lay5.weight"] = torch.zeros(4, 8, 3, 3)
    detr["mask_head.out_lay.weight"] = torch.zeros(1, 4, 3, 3)
    detr["detr.class_embed.weight"] = torch.zeros(92, 96)  # COCO classes
    detr["detr.class_embed.bias"] = torch.zeros(92)
    detr["detr.query_embed.weight"] = torch.zeros(100, 96)
    path = tmp_path / "detr.pth"
    torch.save({"model": detr}, path)

    target = make(cfg, 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_detr_init(target, path)
    assert report.unexpected == ["mask_head.lay5.weight", "mask_head.out_lay.weight"]
    assert [m.split(" ")[0] for m in report.shape_mismatch] == [
        "vistr.class_embed.bias",
        "vistr.class_embed.weight",
        "vistr.query_embed.weight",
    ]
    assert "mask_head.dcn.weight" in report.missing and "insmask_head.0.weight" in report.missing
    after = target.state_dict()
    for key in report.loaded:
        assert torch.equal(after[key], source.state_dict()[key]), key
    for key in [
        "vistr.class_embed.weight",
        "vistr.query_embed.weight",
        "mask_head.dcn.weight",
        "insmask_head.0.weight",
    ]:
        assert torch.equal(after[key], before[key]), key
    assert "vistr.transformer.encoder.layers.0.self_attn.in_proj_weight" in report.loaded
