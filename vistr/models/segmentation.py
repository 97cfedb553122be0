"""Mask branch: attention maps, per-frame FPN-style mask head with a DCN, instance-sequence 3-D head.

Layout and names follow the official VisTR (FACTS.md §b.7-8), so official checkpoints load. Unlike
the official per-frame Python loop, every module here runs on all B·T frames (and all n slots)
at once: frames are just batch entries for the 2-D parts; the 3-D head regroups them per clip
and slot so its GroupNorm statistics are per (clip, slot) over (channels, T, h, w), exactly the
official B=1 statistics, for any B.

Channel widths: the official head derives them from d=384 (392 -> 192 -> 96 -> 48 -> DCN 24, 3-D
head 24 -> 12) with GroupNorm(8, ·) / GroupNorm(4, 12). For a small d those widths are not
divisible by 8 (d=96 gives 12 and 6), so widths come from ``mask_dims`` / ``seq_head_dim`` and the
group count is gcd(official groups, channels): identical to the official head at d=384, valid
for any width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vistr.models.deform_conv import deform_conv2d
from vistr.models.group_norm import AccurateGroupNorm


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with gcd(max_groups, channels) groups (= max_groups for the official widths).

    An ``AccurateGroupNorm``: the heads run channels-last, where PyTorch's own CPU GroupNorm
    loses float32 precision on large groups (see ``vistr.models.group_norm``).
    """
    return AccurateGroupNorm(math.gcd(max_groups, channels), channels)


def default_mask_dims(hidden_dim: int) -> list[int]:
    """Official widths of lay2, lay3, lay4 and the DCN output: d/2, d/4, d/8, d/16."""
    return [max(hidden_dim // 2**i, 1) for i in (1, 2, 3, 4)]


class MHAttentionMap(nn.Module):
    """Per-query multi-head attention *maps* over one frame's feature map (no values).

    The softmax runs jointly over (heads, h, w), as in DETR/VisTR, not per head.
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5
        for lin in (self.q_linear, self.k_linear):
            nn.init.zeros_(lin.bias)
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [N, n, d], k [N, d, h, w], mask [N, h, w] (True = padding) -> [N, n, heads, h, w]."""
        q = self.q_linear(q)
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        heads = self.num_heads
        qh = q.view(q.shape[0], q.shape[1], heads, -1)
        kh = k.view(k.shape[0], heads, -1, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        return F.softmax(weights.flatten(2), dim=-1).view(weights.shape)


class MaskHeadSmallConv(nn.Module):
    """DETR's MaskHeadSmallConv with VisTR's deformable last layer (conv_offset + DCN v1 + GN)."""

    def __init__(self, dim: int, fpn_dims: tuple[int, int, int], mask_dims: list[int]):
        super().__init__()
        c2, c3, c4, c5 = mask_dims
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = group_norm(dim, 8)
        self.lay2 = nn.Conv2d(dim, c2, 3, padding=1)
        self.gn2 = group_norm(c2, 8)
        self.lay3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.gn3 = group_norm(c3, 8)
        self.lay4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.gn4 = group_norm(c4, 8)
        self.gn5 = group_norm(c5, 8)
        self.conv_offset = nn.Conv2d(c4, 18, 1)  # (Δy, Δx) per tap of the 3x3 DCN
        self.dcn = nn.Conv2d(c4, c5, 3, padding=1, bias=False)  # weight only; applied via deform_conv2d
        self.adapter1 = nn.Conv2d(fpn_dims[0], c2, 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], c3, 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], c4, 1)
        self.out_channels = c5
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Official init: the DCN starts as a plain conv (zero offsets), kaiming(relu) weights.
        nn.init.kaiming_uniform_(self.dcn.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @staticmethod
    def _add_fpn(x: torch.Tensor, fpn: torch.Tensor) -> torch.Tensor:
        """fpn [N, c, H, W] (per frame) + nearest-upsampled x [N·n, c, h, w] (per frame and slot)."""
        per_frame = x.shape[0] // fpn.shape[0]
        up = F.interpolate(x, size=fpn.shape[-2:], mode="nearest")
        return (fpn.unsqueeze(1) + up.view(fpn.shape[0], per_frame, *up.shape[1:])).flatten(0, 1)

    def _lay1(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``lay1(cat(x repeated per slot, attn))`` without building the concatenation.

        The official head convolves the frame features again for each of the n slots. A
        convolution is linear in its input channels, so split lay1's weight at channel d:
        ``conv(cat(x, a)) = conv(x, W[:, :d]) + conv(a, W[:, d:])``; the first term is computed
        once per frame and broadcast over the slots: 392/(384/10 + 8) = 8.4x fewer FLOPs for this
        layer at d=384, n=10 (169 -> 20 GFLOP at 300×540). Same parameter; only rounding differs.
        """
        n, d = attn.shape[1], x.shape[1]
        per_frame = F.conv2d(x, self.lay1.weight[:, :d], self.lay1.bias, padding=self.lay1.padding)
        per_slot = F.conv2d(attn.flatten(0, 1), self.lay1.weight[:, d:], None, padding=self.lay1.padding)
        return (per_frame.unsqueeze(1) + per_slot.view(x.shape[0], n, *per_slot.shape[1:])).flatten(0, 1)

    def forward(self, x: torch.Tensor, attn: torch.Tensor, fpns: list[torch.Tensor]) -> torch.Tensor:
        """x [N, d, h, w] per frame, attn [N, n, heads, h, w], fpns = (layer3, layer2, layer1) per frame.

        Returns [N·n, c5, H/4, W/4] ordered (frame, slot).
        """
        x = F.relu(self.gn1(self._lay1(x, attn)))
        x = F.relu(self.gn2(self.lay2(x)))
        x = self._add_fpn(x, self.adapter1(fpns[0]))
        x = F.relu(self.gn3(self.lay3(x)))
        x = self._add_fpn(x, self.adapter2(fpns[1]))
        x = F.relu(self.gn4(self.lay4(x)))
        x = self._add_fpn(x, self.adapter3(fpns[2]))
        # In float32: under mixed precision x, offsets and weight arrive in different dtypes, and
        # no DCN kernel takes half precision on every device.
        offset = self.conv_offset(x).float()
        x = deform_conv2d(
            x.float(), offset, self.dcn.weight.float(), None, stride=1, padding=1, dilation=1
        ).to(x.dtype)
        return F.relu(self.gn5(x))


def instance_sequence_head(in_dim: int, hidden: int) -> nn.Sequential:
    """Paper §3.3: 3 x [Conv3d k3 dil2 pad2 -> GN -> ReLU] + Conv3d 1x1x1 -> 1 mask logit per (t, y, x)."""
    layers: list[nn.Module] = []
    for i in range(3):
        layers += [
            nn.Conv3d(in_dim if i == 0 else hidden, hidden, 3, padding=2, dilation=2),
            group_norm(hidden, 4),
            nn.ReLU(inplace=True),
        ]
    layers.append(nn.Conv3d(hidden, 1, 1))
    return nn.Sequential(*layers)


def apply_sequence_head(
    head: nn.Module, feats: torch.Tensor, batch: int, frames: int, three_d: bool
) -> torch.Tensor:
    """feats [B·T·n, c, h, w] ordered (clip, frame, slot) -> mask logits [B, T·n, h, w] (q = t·n + slot).

    With the 3-D head every (clip, slot) is one sample [c, T, h, w]; the 2-D ablation head
    (a single Conv2d) runs per frame and slot.
    """
    if not three_d:
        out = head(feats)
        return out.view(batch, -1, *out.shape[-2:])
    c, h, w = feats.shape[1:]
    seq = feats.view(batch, frames, -1, c, h, w).permute(0, 2, 3, 1, 4, 5).flatten(0, 1)  # [B·n, c, T, h, w]
    # Channels-last 3-D layout: oneDNN's Conv3d runs ~2x faster on it than on NCDHW (same math).
    out = head(seq.contiguous(memory_format=torch.channels_last_3d))  # [B·n, 1, T, h, w]
    return out.reshape(batch, -1, frames, h, w).transpose(1, 2).flatten(1, 2)
