"""Optimizer and learning-rate schedule as the paper trains (§4.1, FACTS.md §a).

AdamW with two parameter groups (the backbone at its own, 10x smaller learning rate) and a
step decay once per epoch. Kept apart from the engine so Ray Train, Tune and the plain loop
build exactly the same optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from vistr.config import TrainConfig


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters split by whether their name contains ``backbone`` (official rule)."""
    model = getattr(model, "module", model)  # unwrap DDP
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (backbone if "backbone" in name else rest).append(param)
    groups = [{"params": rest, "lr": cfg.lr, "name": "transformer"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr_backbone, "name": "backbone"})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.StepLR:
    """x``lr_gamma`` every ``lr_drop`` epochs; the caller steps it once per epoch."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_drop, gamma=cfg.lr_gamma)
