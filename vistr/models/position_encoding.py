"""3-D sine positional encoding (paper Eq. 1, official layout in FACTS.md §b.2).

The transformer sees one flattened (t, y, x) sequence, so every token needs its temporal *and*
spatial position. Each axis gets d/3 channels of interleaved sin/cos of the normalized cumulative
position (cumsum of the non-padded mask, scaled to [0, 2π]); channels are ordered (z, y, x) as in
the official code, which the official checkpoints were trained with.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine3D(nn.Module):
    """Maps a padding mask [B, T, h, w] (True = padding) to an encoding [B, T, d, h, w]."""

    def __init__(self, hidden_dim: int, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        if hidden_dim % 3 != 0 or (hidden_dim // 3) % 2 != 0:
            raise ValueError(
                f"hidden_dim={hidden_dim}: the 3-D sine encoding needs d divisible by 3 with an even "
                "quotient (d/3 interleaved sin/cos channels per axis z, y, x), e.g. 96, 192, 384"
            )
        self.num_pos_feats = hidden_dim // 3
        self.temperature = temperature
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.dim() != 4:
            raise ValueError(f"position encoding expects a mask [B, T, h, w], got shape {tuple(mask.shape)}")
        not_mask = (~mask).to(torch.float32)
        eps = 1e-6
        axes = []
        for dim in (1, 2, 3):  # z (time), y, x
            cum = not_mask.cumsum(dim)
            last = cum.narrow(dim, cum.shape[dim] - 1, 1)
            axes.append(cum / (last + eps) * self.scale)
        k = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_pos_feats)
        encoded = []
        for pos in axes:
            angles = pos[..., None] / dim_t  # [B, T, h, w, F]
            # Interleave: even channels sin, odd channels cos (Eq. 1).
            encoded.append(torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=5).flatten(4))
        return torch.cat(encoded, dim=4).permute(0, 1, 4, 2, 3).contiguous()
