"""Engine mechanics on a toy model: optimizer groups, schedule, clipping, NaN detection.

The "it learns" test on the real model and synthetic clips lives in test_learning.py.
"""

import pytest
import torch
from torch import nn

from vistr.config import TrainConfig
from vistr.engine import NonFiniteLossError, evaluate, train_one_epoch
from vistr.optim import build_optimizer, build_scheduler


class Toy(nn.Module):
    """A 'backbone' and a head, so the two learning-rate groups can be told apart."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.head = nn.Linear(3, 1)

    def forward(self, frames: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict:
        return {"y": self.head(self.backbone(frames) + self.frozen(frames))}


class MSE(nn.Module):
    def __init__(self, poison_after: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.poison_after = poison_after

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        self.calls += 1
        target = torch.stack([t["y"] for t in targets])
        loss = ((outputs["y"] - target) ** 2).mean()
        if self.poison_after is not None and self.calls > self.poison_after:
            loss = loss * float("nan")
        return {"loss": loss, "loss_mse": loss.detach()}


def _batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(2, 3, generator=g)
        y = x.sum(-1, keepdim=True)
        out.append({"frames": x, "pad_mask": None, "targets": [{"y": y[j], "video_id": 10 * i + j} for j in range(2)]})
    return out


def test_param_groups_use_backbone_lr_and_skip_frozen() -> None:
    model = Toy()
    opt = build_optimizer(model, TrainConfig(lr=1e-3, lr_backbone=1e-5, weight_decay=0.5))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["backbone"]["lr"] == 1e-5 and by_name["transformer"]["lr"] == 1e-3
    assert {id(p) for p in by_name["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in by_name["transformer"]["params"]} == {id(p) for p in model.head.parameters()}
    assert all(g["weight_decay"] == 0.5 for g in opt.param_groups)


def test_step_decay_once_per_epoch() -> None:
    model = Toy()
    cfg = TrainConfig(lr=1.0, lr_backbone=0.1, lr_drop=3, lr_gamma=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])


def test_train_one_epoch_reduces_loss_and_counts_steps() -> None:
    torch.manual_seed(0)
    model, crit = Toy(), MSE()
    opt = build_optimizer(model, TrainConfig(lr=0.02, lr_backbone=0.02, weight_decay=0.0))
    data = _batches(20)
    first = evaluate(model, crit, data, torch.device("cpu")).losses["loss"]
    logged = []
    stats = None
    step = 5
    for epoch in range(5):
        stats = train_one_epoch(
            model, crit, data, opt, torch.device("cpu"), epoch=epoch, global_step=step,
            log_every=10, on_log=lambda rec, s: logged.append((s, rec)),
        )
        step = stats.global_step
    assert stats.steps == 20 and stats.samples == 40
    assert step == 5 + 5 * 20
    assert [s for s, _ in logged] == list(range(10, 106, 10))
    assert "train/loss" in logged[0][1] and "lr/transformer" in logged[0][1]
    last = evaluate(model, crit, data, torch.device("cpu")).losses["loss"]
    assert last < 0.1 * first


def test_clip_max_norm_bounds_the_update() -> None:
    torch.manual_seed(0)
    model, crit = Toy(), MSE()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    data = [{"frames": torch.full((2, 3), 100.0), "pad_mask": None,
             "targets": [{"y": torch.zeros(1), "video_id": 0}] * 2}]
    train_one_epoch(model, crit, data, opt, torch.device("cpu"), clip_max_norm=0.1)
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    assert delta == pytest.approx(0.1, rel=1e-4)  # SGD lr 1: the update is exactly the clipped gradient


def test_max_steps_stops_early() -> None:
    model, crit = Toy(), MSE()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_one_epoch(model, crit, _batches(10), opt, torch.device("cpu"), max_steps=3)
    assert stats.steps == 3 and crit.calls == 3


def test_nan_loss_stops_with_video_ids() -> None:
    model, crit = Toy(), MSE(poison_after=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteLossError, match=r"epoch 4 step 2 on videos \[20, 21\]"):
        train_one_epoch(model, crit, _batches(5), opt, torch.device("cpu"), epoch=4,
                        before_step=lambda s: None)
    before = [p.detach().clone() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in before)  # the poisoned step never touched the weights


class SqrtOfNothing(nn.Module):
    """A finite (zero) loss with NaN gradients: the unselected branch of ``where`` is sqrt(x < 0)."""

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        shifted = outputs["y"] - 1e6
        loss = torch.where(shifted > 0, torch.sqrt(shifted), torch.zeros_like(shifted)).sum()
        return {"loss": loss}


def test_nan_gradient_with_finite_loss_stops_before_the_update() -> None:
    model = Toy()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm at epoch 0 step 0 on videos \[0, 1\]"):
        train_one_epoch(model, SqrtOfNothing(), _batches(2), opt, torch.device("cpu"), clip_max_norm=0.1)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_resolve_device_refuses_cuda_without_a_gpu(monkeypatch):
    from vistr.engine import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda:1' asked for, but torch sees no CUDA GPU"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
