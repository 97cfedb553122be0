"""Instance *sequence* Hungarian matcher (paper §3.2, Eq. 2–6; official costs in FACTS.md §c).

Slot ``k`` of the decoder owns the queries ``{t·n + k}`` (frame-major), i.e. one box/class
sequence over the T frames. Each ground-truth instance is one sequence too, and the matching
is a bipartite assignment between the n slot sequences and the K instance sequences with

    C[k, i] = -w_class · mean_t p[k, t, c_{i,t}] + w_bbox · mean_{t,xywh} |b̂ - b| - w_iou · mean_t IoU

averaged over **all** T frames: an absent frame enters with its placeholder label 0 and zero box,
exactly as the official code computes it. Its "giou" weight is applied to plain IoU (official).

Deliberate difference from the official code (issue #80): when a sequence match is expanded to
per-frame pairs, the valid frames are those of the *matched target* (``valid[tgt_idx[j]]``), not
of the j-th target in sorted order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from vistr.box_ops import cxcywh_to_xyxy, elementwise_box_iou

Target = dict[str, Any]
Match = tuple[Tensor, Tensor]  # (slot indices, target instance indices), int64, one pair per instance


class FramePairs(NamedTuple):
    """Per-frame matched pairs over valid frames, flattened over the batch (all int64, same length)."""

    batch: Tensor  # clip index b
    query: Tensor  # query index t·n + slot in that clip's predictions
    instance: Tensor  # target instance index k within clip b
    frame: Tensor  # frame t


def check_targets(targets: list[Target], num_slots: int, num_frames: int, num_logits: int) -> None:
    """Refuse targets the matcher cannot match, naming the clip, before any cryptic index error."""
    no_object = num_logits - 1
    for b, tgt in enumerate(targets):
        video = tgt.get("video_id", f"<clip {b}>")
        missing = sorted({"labels", "boxes", "valid"} - set(tgt))
        if missing:
            raise ValueError(
                f"video {video}: target lacks {missing} (needs labels [K], boxes [K,T,4], valid [K,T])"
            )
        labels, boxes, valid = tgt["labels"], tgt["boxes"], tgt["valid"]
        k = labels.shape[0]
        if k > num_slots:
            raise ValueError(
                f"video {video}: {k} ground-truth instances but only num_slots={num_slots} instance "
                "sequences can be matched; raise model.num_slots or drop instances when building clips"
            )
        if tuple(boxes.shape) != (k, num_frames, 4) or tuple(valid.shape) != (k, num_frames):
            raise ValueError(
                f"video {video}: expected boxes [{k}, {num_frames}, 4] and valid [{k}, {num_frames}] "
                f"(K instances × T=model.num_frames), got {tuple(boxes.shape)} and {tuple(valid.shape)}"
            )
        if k and not ((labels >= 1) & (labels < no_object)).all():
            raise ValueError(
                f"video {video}: labels {labels.tolist()} must be raw category ids in [1, {no_object - 1}]; "
                f"index 0 is the absent-frame placeholder and {no_object} is no-object "
                f"(model.num_classes must exceed the largest category id)"
            )


class SequenceMatcher(nn.Module):
    """Hungarian matching of slot sequences to instance sequences, one scipy solve per clip."""

    def __init__(
        self,
        num_slots: int,
        num_frames: int,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_iou: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_slots, self.num_frames = num_slots, num_frames
        self.cost_class, self.cost_bbox, self.cost_iou = cost_class, cost_bbox, cost_iou

    @torch.no_grad()
    def cost_matrix(self, outputs: dict[str, Tensor], targets: list[Target]) -> Tensor:
        """``[B, n, ΣK]``: cost of every slot of every clip against every instance of the batch.

        Computing all clips against all instances at once keeps it one vectorized pass; the
        cross-clip blocks are simply never used.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        bs, num_queries, num_logits = logits.shape
        n, t = self.num_slots, self.num_frames
        if num_queries != n * t:
            raise ValueError(
                f"pred_logits has {num_queries} queries, expected num_slots·num_frames = {n}·{t}"
            )
        check_targets(targets, n, t, num_logits)
        # [B, T·n, ·] (frame-major) -> [B, n, T, ·]: one sequence per slot.
        prob = logits.float().softmax(-1).view(bs, t, n, num_logits).transpose(1, 2)
        out_boxes = boxes.float().view(bs, t, n, 4).transpose(1, 2)

        device = logits.device
        valid = torch.cat([tgt["valid"] for tgt in targets]).to(device, torch.bool)  # [ΣK, T]
        labels = torch.cat([tgt["labels"] for tgt in targets]).to(device, torch.int64)
        frame_labels = torch.where(valid, labels[:, None], 0)  # placeholder 0 on absent frames
        tgt_boxes = torch.cat([tgt["boxes"] for tgt in targets]).to(device, torch.float32)
        tgt_boxes = torch.where(valid[..., None], tgt_boxes, 0.0)  # placeholder zero box

        frames = torch.arange(t, device=device)[None, :]
        cost_class = -prob[:, :, frames, frame_labels].mean(-1)  # [B, n, ΣK]
        cost_bbox = torch.cdist(out_boxes.flatten(2), tgt_boxes.flatten(1)[None], p=1) / (t * 4)
        iou = elementwise_box_iou(
            cxcywh_to_xyxy(out_boxes)[:, :, None], cxcywh_to_xyxy(tgt_boxes)[None, None]
        )
        cost_iou = -iou.mean(-1)
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_iou * cost_iou

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[Target]) -> list[Match]:
        """Per clip: (slot indices sorted ascending, matched target instance indices)."""
        cost = self.cost_matrix(outputs, targets).cpu()
        sizes = [len(tgt["labels"]) for tgt in targets]
        matches = []
        for b, block in enumerate(cost.split(sizes, dim=-1)):
            if not torch.isfinite(block[b]).all():
                raise ValueError(
                    f"video {targets[b].get('video_id', f'<clip {b}>')}: matching cost is not finite; the "
                    "model's pred_logits/pred_boxes hold NaN/inf (training diverged: lower the lr or the "
                    "gradient clipping norm)"
                )
            slots, insts = linear_sum_assignment(block[b].numpy())
            matches.append(
                (torch.as_tensor(slots, dtype=torch.int64), torch.as_tensor(insts, dtype=torch.int64))
            )
        return matches


def frame_pairs(matches: list[Match], targets: list[Target], num_slots: int) -> FramePairs:
    """Expand sequence matches to per-frame (query, (instance, frame)) pairs over VALID frames.

    The valid frames of a pair come from its matched target instance (the #80 fix). Absent frames
    of a matched instance produce no pair, so their queries are trained as no-object.
    """
    parts = []
    for b, ((slots, insts), tgt) in enumerate(zip(matches, targets, strict=True)):
        valid = tgt["valid"].to(torch.bool).cpu()[insts]  # [M, T], row m belongs to insts[m]
        m, t = valid.nonzero(as_tuple=True)
        parts.append(torch.stack([torch.full_like(m, b), t * num_slots + slots[m], insts[m], t]))
    flat = torch.cat(parts, dim=1) if parts else torch.zeros(4, 0, dtype=torch.int64)
    return FramePairs(*flat)


def build_matcher(cfg: Any) -> SequenceMatcher:
    """Matcher with n, T from ``cfg.model`` and the cost weights from ``cfg.loss``."""
    return SequenceMatcher(
        num_slots=cfg.model.num_slots,
        num_frames=cfg.model.num_frames,
        cost_class=cfg.loss.set_cost_class,
        cost_bbox=cfg.loss.set_cost_bbox,
        cost_iou=cfg.loss.set_cost_giou,
    )
