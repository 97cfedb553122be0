"""Deformable convolution v1 (the official VisTR mask head's DCN).

Placeholder until the fast CPU path lands: delegates to ``torchvision.ops.deform_conv2d``, which
FACTS.md §f shows is numerically equivalent to the official CUDA kernel.
"""

from __future__ import annotations

import torch
from torchvision.ops import deform_conv2d as _tv_deform_conv2d


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> torch.Tensor:
    return _tv_deform_conv2d(input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation)
