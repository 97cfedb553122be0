"""DETR's encoder-decoder transformer (post-norm by default), with the official parameter names.

VisTR runs it unchanged on a clip: the encoder sequence is every (t, y, x) position of the clip
and the decoder has n·T queries. ``nn.MultiheadAttention`` is used because its packed
``in_proj_weight`` (rows q|k|v) is what the official checkpoints store. Tensors are batch-first.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, dim_ff: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d, dim_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_ff, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: torch.Tensor, pad: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = self.norm1(src)
            qk = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(qk, qk, x, key_padding_mask=pad, need_weights=False)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        qk = _with_pos(src, pos)
        src = self.norm1(
            src + self.dropout1(self.self_attn(qk, qk, src, key_padding_mask=pad, need_weights=False)[0])
        )
        return self.norm2(src + self.dropout2(self._ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, dim_ff: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d, dim_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_ff, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pad: torch.Tensor | None,
        pos: torch.Tensor | None,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        def self_block(x: torch.Tensor) -> torch.Tensor:
            q = x + query_pos
            return self.dropout1(self.self_attn(q, q, x, need_weights=False)[0])

        def cross_block(x: torch.Tensor) -> torch.Tensor:
            out = self.multihead_attn(
                x + query_pos, _with_pos(memory, pos), memory, key_padding_mask=pad, need_weights=False
            )[0]
            return self.dropout2(out)

        def ff_block(x: torch.Tensor) -> torch.Tensor:
            return self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))

        if self.pre_norm:
            tgt = tgt + self_block(self.norm1(tgt))
            tgt = tgt + cross_block(self.norm2(tgt))
            return tgt + ff_block(self.norm3(tgt))
        tgt = self.norm1(tgt + self_block(tgt))
        tgt = self.norm2(tgt + cross_block(tgt))
        return self.norm3(tgt + ff_block(tgt))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int, norm: nn.LayerNorm | None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src: torch.Tensor, pad: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pad, pos)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, d: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pad: torch.Tensor | None,
        pos: torch.Tensor | None,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """Returns every layer's normalized output stacked: [layers, B, Q, d] (aux losses need them)."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pad, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    def __init__(
        self,
        d: int = 384,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
    ):
        super().__init__()
        enc = EncoderLayer(d, nheads, dim_feedforward, dropout, pre_norm)
        self.encoder = Encoder(enc, enc_layers, nn.LayerNorm(d) if pre_norm else None)
        self.decoder = Decoder(DecoderLayer(d, nheads, dim_feedforward, dropout, pre_norm), dec_layers, d)
        self.d_model = d
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: torch.Tensor, pad: torch.Tensor | None, query_embed: torch.Tensor, pos: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """src/pos [B, L, d] (L = T·h·w in (t, y, x) order), pad [B, L] or None, query_embed [Q, d].

        Returns hs [layers, B, Q, d] and memory [B, L, d].
        """
        memory = self.encoder(src, pad, pos)
        query_pos = query_embed.unsqueeze(0).expand(src.shape[0], -1, -1)
        hs = self.decoder(torch.zeros_like(query_pos), memory, pad, pos, query_pos)
        return hs, memory
