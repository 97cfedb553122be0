"""ResNet backbone with frozen BatchNorm (or GroupNorm from scratch), named like the official checkpoints.

Key layout ``backbone.0.body.{conv1,bn1,layer1..4}`` comes from DETR's ``Joiner`` (a Sequential of
backbone and position encoding) around torchvision's ``IntermediateLayerGetter``; keeping that
layout lets official VisTR / DETR checkpoints load by name. BatchNorm is frozen (statistics and
affine are buffers) because one clip per GPU makes batch statistics meaningless.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from vistr.models.group_norm import AccurateGroupNorm
from vistr.models.position_encoding import PositionEmbeddingSine3D

# Channels of layer1..layer4 (strides 4, 8, 16, 32).
CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
TRAINABLE_LAYERS = ("layer2", "layer3", "layer4")
# ResNet channel counts are multiples of 32, so GroupNorm(32, c) fits every layer.
# AccurateGroupNorm: the inference copy runs the backbone channels-last (see group_norm.py).
NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "group_norm": lambda channels: AccurateGroupNorm(32, channels)}


class ResNetBackbone(nn.Module):
    """torchvision ResNet returning layer1..layer4 feature maps (the mask head needs all four)."""

    def __init__(self, name: str, train_backbone: bool, dilation: bool = False, weights: str | None = None,
                 norm: str = "frozen_bn"):  # fmt: skip
        super().__init__()
        if name not in CHANNELS:
            raise ValueError(f"backbone {name!r} unknown; expected one of {sorted(CHANNELS)}")
        if norm not in NORM_LAYERS:
            raise ValueError(f"backbone norm {norm!r} unknown; expected one of {sorted(NORM_LAYERS)}")
        basic_blocks = name in ("resnet18", "resnet34")  # torchvision refuses to dilate BasicBlock
        resnet = getattr(models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation and not basic_blocks],
            norm_layer=NORM_LAYERS[norm],
        )  # fmt: skip
        if dilation and basic_blocks:
            _dilate_basic_layer(resnet.layer4)
        if weights is not None:
            _load_resnet_weights(resnet, weights)
        # Official rule: conv1 and layer1 stay frozen always (they hold pretrained low-level
        # filters); the rest trains iff lr_backbone > 0. A from-scratch (group_norm) backbone trains all.
        from_scratch = norm == "group_norm"
        for pname, param in resnet.named_parameters():
            if not train_backbone or not (from_scratch or any(layer in pname for layer in TRAINABLE_LAYERS)):
                param.requires_grad_(False)
        self.body = IntermediateLayerGetter(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)})
        self.num_channels = CHANNELS[name]

    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        out = self.body(frames)
        return [out[str(i)] for i in range(4)]


class Joiner(nn.Sequential):
    """(0) ResNet, (1) 3-D position encoding; a Sequential only for the official key names."""

    def __init__(self, backbone: ResNetBackbone, position: PositionEmbeddingSine3D | None):
        super().__init__(backbone, position if position is not None else nn.Identity())
        self.use_position = position is not None

    def forward(  # type: ignore[override]
        self, frames: torch.Tensor, pad_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """frames [B·T,3,H,W], pad_mask [B,T,H,W] -> (layer1..4, layer4 mask [B,T,h,w], pos [B,T,d,h,w])."""
        feats = self[0](frames)
        batch, frames_per_clip = pad_mask.shape[:2]
        mask = F.interpolate(pad_mask.flatten(0, 1)[None].float(), size=feats[-1].shape[-2:]).bool()[0]
        mask = mask.view(batch, frames_per_clip, *mask.shape[-2:])
        pos = self[1](mask).to(feats[-1].dtype) if self.use_position else None
        return feats, mask, pos


def _dilate_basic_layer(layer: nn.Sequential) -> None:
    """Trade ``layer``'s stride 2 for dilation 2, as torchvision's ``replace_stride_with_dilation``
    does for bottleneck blocks: the first block keeps dilation 1 with stride 1, later blocks'
    3x3 convs dilate by 2. Same parameters, twice the output resolution (DC5 for ResNet-18/34:
    a 64-pixel frame gives a 4x4 map instead of 2x2)."""
    first, *rest = layer
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for block in rest:
        for conv in (block.conv1, block.conv2):
            conv.dilation, conv.padding = (2, 2), (2, 2)


def _load_resnet_weights(resnet: nn.Module, path: str) -> None:
    """Load a torchvision ResNet state dict (ImageNet weights) from a local file; fc is ignored."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"model.backbone_weights: {path} does not exist (nothing is downloaded; give a local file)"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = {
        k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    expected = {k for k in resnet.state_dict() if not k.startswith("fc.")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"model.backbone_weights {path}: not a matching torchvision ResNet state dict; "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    resnet.load_state_dict(state, strict=False)
