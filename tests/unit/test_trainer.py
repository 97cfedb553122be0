"""Single-process fit: checkpoints every epoch and resumes with step and schedule intact."""

from pathlib import Path

import pytest
import torch

from vistr.checkpoint import load_checkpoint
from vistr.config import load_config
from vistr.models import build_model
from vistr.trainer import build_state, fit


def test_fit_resumes_where_it_stopped(synth_root: Path, tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", overrides={
        "train.epochs": 1, "train.max_steps_per_epoch": 2, "train.lr_drop": 1, "train.batch_size": 1,
        "model.enc_layers": 1, "model.dec_layers": 1,
    })
    logged: list[int] = []
    first = fit(cfg, synth_root, tmp_path, on_log=lambda rec, step: logged.append(step),
                validate=lambda model, epoch: {"val_AP": 0.5 + epoch})
    assert (first.epochs_done, first.global_step) == (1, 2)
    assert first.history[0]["val_AP"] == 0.5

    again = fit(cfg.with_overrides({"train.epochs": 2}), synth_root, tmp_path,
                validate=lambda model, epoch: {"val_AP": 0.5 + epoch})
    assert (again.epochs_done, again.global_step) == (2, 4)  # continued, not restarted
    assert [h["epoch"] for h in again.history] == [0, 1]
    payload = load_checkpoint(again.checkpoint)
    assert payload["epoch"] == 1 and payload["global_step"] == 4
    # StepLR(step_size=1, gamma=0.1) stepped once per epoch across the restart: lr x 0.01
    assert payload["scheduler"]["_last_lr"][0] == pytest.approx(cfg.train.lr * 0.01, rel=1e-9)

    # a finished run does nothing more
    done = fit(cfg.with_overrides({"train.epochs": 2}), synth_root, tmp_path)
    assert done.global_step == 4 and len(done.history) == 2


def test_init_weights_loads_a_detr_checkpoint_where_shapes_fit(tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", overrides={"model.enc_layers": 1, "model.dec_layers": 1})
    torch.manual_seed(123)
    source = build_model(cfg.with_overrides({"model.num_classes": 3}))  # class head of another width
    state = {"detr." + k[len("vistr."):] if k.startswith("vistr.") else k: v for k, v in source.state_dict().items()}
    torch.save({"model": state}, tmp_path / "detr.pth")
    model = build_state(cfg.with_overrides({"train.init_weights": str(tmp_path / "detr.pth")}),
                        torch.device("cpu")).model
    plain = build_state(cfg, torch.device("cpu")).model
    ours, theirs = model.state_dict(), source.state_dict()
    assert torch.equal(ours["vistr.input_proj.weight"], theirs["vistr.input_proj.weight"])
    assert torch.equal(ours["mask_head.lay1.weight"], theirs["mask_head.lay1.weight"])
    # the class head did not fit: it keeps the fresh initialisation
    assert torch.equal(ours["vistr.class_embed.weight"], plain.state_dict()["vistr.class_embed.weight"])
