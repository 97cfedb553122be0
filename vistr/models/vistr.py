"""VisTR: backbone -> 3-D transformer -> per-query class/box heads + instance-sequence masks.

Module tree and parameter names are the official ones (``vistr.*``, ``bbox_attention.*``,
``mask_head.*``, ``insmask_head.*``; FACTS.md "State dict"), so official checkpoints load
unchanged. Query index q = t·n + slot (frame-major): queries [t·n, (t+1)·n) are frame t, slot k
is the same instance sequence in every frame. Sizes come from ``ModelConfig``; nothing is fixed
to 36 frames or 10 slots, and B > 1 clips per forward gives per clip exactly the B = 1 result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vistr.config import ModelConfig
from vistr.models.backbone import Joiner, ResNetBackbone
from vistr.models.position_encoding import PositionEmbeddingSine3D
from vistr.models.segmentation import (
    MaskHeadSmallConv,
    MHAttentionMap,
    apply_sequence_head,
    default_mask_dims,
    instance_sequence_head,
)
from vistr.models.transformer import Transformer


class MLP(nn.Module):
    """Linear layers with ReLU between (none after): DETR's box head, key names ``layers.N``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def num_query_embeddings(cfg: ModelConfig) -> int:
    """Learned query embeddings per Table 1b level (n·T, n, T or 1)."""
    return {
        "prediction": cfg.num_queries,
        "instance": cfg.num_slots,
        "frame": cfg.num_frames,
        "video": 1,
    }[cfg.query_level]


class VisTRDetector(nn.Module):
    """The ``vistr.`` submodule: backbone, transformer and the class/box heads (official names)."""

    def __init__(self, cfg: ModelConfig, train_backbone: bool):
        super().__init__()
        d = cfg.hidden_dim
        body = ResNetBackbone(cfg.backbone, train_backbone, cfg.dilation, cfg.backbone_weights, cfg.backbone_norm)
        position = PositionEmbeddingSine3D(d) if cfg.position_encoding else None
        self.backbone = Joiner(body, position)
        self.transformer = Transformer(
            d, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.dropout, cfg.pre_norm
        )
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(num_query_embeddings(cfg), d)
        self.input_proj = nn.Conv2d(body.num_channels[-1], d, kernel_size=1)


class VisTR(nn.Module):
    """``forward(clip[B,T,3,H,W] or [T,3,H,W], pad_mask=None)`` -> dict of predictions.

    Returns ``pred_logits`` [B, n·T, C+1] (no-object last), ``pred_boxes`` [B, n·T, 4] (sigmoid
    cx, cy, w, h), ``pred_masks`` [B, n·T, H/4, W/4] (logits) and ``aux_outputs`` (one
    {pred_logits, pred_boxes} per earlier decoder layer; empty when ``aux_loss`` is off).
    ``pad_mask`` [B, T, H, W] is True on padded pixels.
    """

    def __init__(self, cfg: ModelConfig, train_backbone: bool = True):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_dim
        mask_dims = list(cfg.mask_dims) if cfg.mask_dims is not None else default_mask_dims(d)
        seq_dim = cfg.seq_head_dim if cfg.seq_head_dim is not None else max(mask_dims[-1] // 2, 1)
        self.vistr = VisTRDetector(cfg, train_backbone)
        fpn_dims = self.vistr.backbone[0].num_channels[2::-1]  # layer3, layer2, layer1
        self.bbox_attention = MHAttentionMap(d, d, cfg.nheads)
        self.mask_head = MaskHeadSmallConv(d + cfg.nheads, fpn_dims, mask_dims)
        if cfg.mask_head == "3d":
            self.insmask_head: nn.Module = instance_sequence_head(mask_dims[-1], seq_dim)
        else:  # Table 1f baseline: one 2-D conv per frame and slot.
            self.insmask_head = nn.Conv2d(mask_dims[-1], 1, 3, padding=1)

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def num_slots(self) -> int:
        return self.config.num_slots

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    def query_positions(self) -> torch.Tensor:
        """[n·T, d] decoder query embeddings for q = t·n + slot at the configured Table 1b level."""
        weight = self.vistr.query_embed.weight
        level, n, frames = self.config.query_level, self.num_slots, self.num_frames
        if level == "instance":
            return weight.repeat(frames, 1)
        if level == "frame":
            return weight.repeat_interleave(n, dim=0)
        if level == "video":
            return weight.expand(n * frames, -1)
        return weight

    def _check_input(
        self, clip: torch.Tensor, pad_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        frames = self.num_frames
        if clip.dim() not in (4, 5):
            raise ValueError(
                f"VisTR expects a clip [B, T, 3, H, W] or [T, 3, H, W] with T={frames}, got shape {tuple(clip.shape)}"
            )
        unbatched = clip.dim() == 4
        if unbatched:
            clip = clip.unsqueeze(0)
        if clip.shape[1] != frames:
            raise ValueError(
                f"clip has {clip.shape[1]} frames but the model is configured for T={frames} "
                "(model.num_frames); sample clips of exactly T frames"
            )
        if clip.shape[2] != 3:
            raise ValueError(f"clip must have 3 (RGB) channels at dim -3, got shape {tuple(clip.shape)}")
        expected = (clip.shape[0], frames, *clip.shape[-2:])
        if pad_mask is None:
            return clip, torch.zeros(expected, dtype=torch.bool, device=clip.device)
        if unbatched and pad_mask.dim() == 3:
            pad_mask = pad_mask.unsqueeze(0)
        if tuple(pad_mask.shape) != expected:
            raise ValueError(
                f"pad_mask must have shape {list(expected)} (B, T, H, W), got {tuple(pad_mask.shape)}"
            )
        return clip, pad_mask.to(device=clip.device, dtype=torch.bool)

    def forward(self, clip: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict:
        clip, pad_mask = self._check_input(clip, pad_mask)
        batch, frames = clip.shape[:2]
        feats, mask, pos = self.vistr.backbone(clip.flatten(0, 1), pad_mask)
        src = self.vistr.input_proj(feats[-1])  # [B·T, d, h, w]
        d, h, w = src.shape[1:]

        def tokens(x: torch.Tensor) -> torch.Tensor:  # [B·T, d, h, w] -> [B, T·h·w, d] in (t, y, x) order
            return x.view(batch, frames, d, h, w).permute(0, 1, 3, 4, 2).reshape(batch, frames * h * w, d)

        pad = mask.flatten(1) if bool(mask.any()) else None
        pos_tokens = tokens(pos.flatten(0, 1)) if pos is not None else None
        hs, memory = self.vistr.transformer(tokens(src), pad, self.query_positions(), pos_tokens)

        logits = self.vistr.class_embed(hs)
        boxes = self.vistr.bbox_embed(hs).sigmoid()
        out = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": (
                [
                    {"pred_logits": lg, "pred_boxes": bx}
                    for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
                ]
                if self.config.aux_loss
                else []
            ),
        }
        # Mask branch, all frames at once: frame t's n queries attend to frame t's features only.
        memory_frames = (
            memory.view(batch, frames, h, w, d).permute(0, 1, 4, 2, 3).reshape(batch * frames, d, h, w)
        )
        queries = hs[-1].reshape(batch * frames, self.num_slots, d)
        frame_pad = mask.flatten(0, 1) if pad is not None else None
        attn = self.bbox_attention(queries, memory_frames, frame_pad)
        # Table 1e: fuse the encoder output E (default) or the CNN features O into the mask head.
        fused = memory_frames if self.config.mask_features == "transformer" else src
        mask_feats = self.mask_head(fused, attn, [feats[2], feats[1], feats[0]])
        out["pred_masks"] = apply_sequence_head(
            self.insmask_head, mask_feats, batch, frames, self.config.mask_head == "3d"
        )
        return out
