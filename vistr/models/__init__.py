"""The VisTR network (pure PyTorch). ``build_model(cfg)`` is the one entry point callers need."""

from __future__ import annotations

from vistr.config import Config, ModelConfig
from vistr.models.vistr import VisTR


def build_model(cfg: Config | ModelConfig, train_backbone: bool | None = None) -> VisTR:
    """Build VisTR from a run config.

    The backbone's layer2-4 train iff ``train.lr_backbone > 0`` (official rule; conv1 and layer1
    are always frozen). Pass a bare ``ModelConfig`` with ``train_backbone`` where no train section
    exists (e.g. importing a checkpoint for inference).
    """
    if isinstance(cfg, Config):
        model_cfg = cfg.model
        if train_backbone is None:
            train_backbone = cfg.train.lr_backbone > 0
    else:
        model_cfg = cfg
    return VisTR(model_cfg, train_backbone=True if train_backbone is None else train_backbone)


__all__ = ["VisTR", "build_model"]
