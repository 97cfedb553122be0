"""Box utilities that torchvision.ops does not provide.

Conversions and pairwise IoU/GIoU come from ``torchvision.ops`` (``box_convert``, ``box_iou``,
``generalized_box_iou``, ``masks_to_boxes``). What is here is missing there:

* *elementwise* IoU / GIoU (matched pairs, not all pairs) with the official VisTR epsilons
  ``(inter + 1e-6) / (union + 1e-6)``: torchvision's ``generalized_box_iou_loss`` puts its eps
  elsewhere, and the official values keep an absent frame's zero box at IoU ≈ 0 instead of NaN;
* masks → normalized ``cx, cy, w, h`` that tolerates empty masks (torchvision's
  ``masks_to_boxes`` returns garbage extents for an empty mask).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert

EPS = 1e-6  # the official VisTR epsilon (FACTS.md §c)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area1 + area2 - inter


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of corresponding xyxy boxes (shapes broadcast over ``[..., 4]``), official eps.

    This is the matcher's "giou" cost term, which the official code computes as plain IoU.
    """
    inter, union = _inter_union(boxes1, boxes2)
    return (inter + EPS) / (union + EPS)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of corresponding xyxy boxes with the official eps (the GIoU loss term).

    Boxes with x2 < x1 or y2 < y1 make GIoU meaningless; they are refused rather than silently
    producing a wrong loss. NaN is let through: it makes the loss NaN, which the training loop's
    finiteness check reports with the batch that caused it.
    """
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if (boxes[..., 2:] < boxes[..., :2]).any():
            raise ValueError(
                f"elementwise_generalized_box_iou: {name} has degenerate boxes (x2 < x1 or y2 < y1)"
            )
    inter, union = _inter_union(boxes1, boxes2)
    iou = (inter + EPS) / (union + EPS)
    lt = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    area_c = wh[..., 0] * wh[..., 1]
    return iou - (area_c - union + EPS) / (area_c + EPS)


def mask_pixel_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel-edge xyxy boxes of ``[..., H, W]`` masks and a non-empty flag (``[..., 4]``, ``[...]``).

    A box covers whole pixels: the last foreground pixel index + 1 is the right/bottom edge, the
    same extent pycocotools' ``toBbox`` reports. Empty masks get a meaningless box and False.
    """
    masks = masks.bool()
    rows, cols = masks.any(-1), masks.any(-2)
    height, width = rows.shape[-1], cols.shape[-1]
    y0 = rows.float().argmax(-1)
    y1 = height - rows.flip(-1).float().argmax(-1)
    x0 = cols.float().argmax(-1)
    x1 = width - cols.flip(-1).float().argmax(-1)
    return torch.stack([x0, y0, x1, y1], -1).float(), rows.any(-1)


def masks_to_normalized_cxcywh(masks: Tensor) -> Tensor:
    """``[N, H, W]`` masks → ``[N, 4]`` boxes (cx, cy, w, h) normalized by (W, H); zeros if empty
    (the all-zero box the target contract uses for absent frames)."""
    if masks.dim() != 3:
        raise ValueError(
            f"masks_to_normalized_cxcywh: expected [N, H, W] masks, got shape {tuple(masks.shape)}"
        )
    h, w = masks.shape[-2:]
    xyxy, nonempty = mask_pixel_boxes(masks)
    xyxy = xyxy / torch.tensor([w, h, w, h], dtype=torch.float32, device=masks.device)
    cxcywh = box_convert(xyxy, in_fmt="xyxy", out_fmt="cxcywh")
    return torch.where(nonempty[:, None], cxcywh, torch.zeros_like(cxcywh))
