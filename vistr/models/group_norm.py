"""GroupNorm that keeps float32 accuracy on channels-last CPU tensors.

Why this exists: PyTorch's CPU GroupNorm has two kernels. The one for contiguous (NCHW) inputs
computes each group's moments with Welford updates over cascaded partial sums and is accurate to
a few ulps. The one for channels-last inputs adds every element and its square into one float32
accumulator per channel, row after row, and takes var = E[x²] − E[x]². Both steps lose digits
as a group grows; the error grows about linearly with the group's size (measured against
float64: ~6e-7 relative at 3·10⁴ elements per group, ~4e-5 at 10⁶, where the contiguous kernel
stays at ~5e-8). The 3-D mask head at 300×540, T=36 has 10⁶-element groups. It runs
channels-last because oneDNN's Conv3d is ~2x faster there, so the fix belongs in the
normalisation, not the layout.

``AccurateGroupNorm`` is an ``nn.GroupNorm`` (same parameters, same state-dict names, so official
checkpoints load). For a float32 channels-last CPU input with large groups it computes the
moments itself, in the input's own memory order, so nothing is copied into another layout:

* the tensor is read as rows [N, M, groups, C/groups], a free view (channels are the fastest
  dimension of a channels-last tensor);
* ``torch.var_mean`` over (M, C/groups) gives each group's mean and variance with Welford
  updates in float64 on CPU: one pass, no cancellation, no float32 accumulation error;
* normalisation and affine are one fused ``addcmul`` with per-(sample, channel) scale and shift,
  which keeps the channels-last layout for the next convolution.

Small groups (below ``CAREFUL_MIN_GROUP_SIZE`` elements) keep PyTorch's kernel: its error there
is under ~1e-6 and it is the faster one. Everything else (contiguous inputs, float64, other
devices — CUDA's kernel makes its input contiguous first) goes to ``F.group_norm`` unchanged.
The careful path is plain differentiable tensor code, so training gets it through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Group size from which PyTorch's channels-last kernel drifts past ~1e-6 relative (see above).
CAREFUL_MIN_GROUP_SIZE = 1 << 16


class AccurateGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that computes channels-last float32 CPU inputs with contiguous-kernel accuracy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_careful_moments(x, self.num_groups):
            return channels_last_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def needs_careful_moments(x: torch.Tensor, groups: int) -> bool:
    """True where PyTorch would use its CPU channels-last kernel on groups large enough to drift."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 3
        and x[0].numel() // groups >= CAREFUL_MIN_GROUP_SIZE
        and not x.is_contiguous()
        and x.movedim(1, -1).is_contiguous()
    )


def channels_last_group_norm(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``F.group_norm`` for an input whose channels are its fastest dimension; output in x's layout."""
    n, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {groups} groups")
    per_group = c // groups
    rows = x.movedim(1, -1).reshape(n, -1, groups, per_group)  # a view for such an input
    var, mean = torch.var_mean(rows, dim=(1, 3), correction=0)  # [n, groups]
    scale = (var + eps).rsqrt().repeat_interleave(per_group, dim=1)  # [n, c]
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if weight is not None:
        scale = scale * weight
        shift = shift * weight
    if bias is not None:
        shift = shift + bias
    shape = (n, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))
