"""Hungarian loss of VisTR (paper Eq. 7–9; the official terms and normalization in FACTS.md §c).

After the sequence matching, every (matched slot, VALID frame of its instance) is one pair:

* ``loss_ce``   cross-entropy over all queries; target = no-object except on pairs, the no-object
  class down-weighted by ``eos_coef``; weighted mean, as ``F.cross_entropy(weight=...)`` reduces.
  Absent frames of a matched instance are therefore trained as no-object (official behaviour).
* ``loss_bbox`` / ``loss_giou``: L1 and 1 − GIoU summed over pairs.
* ``loss_mask`` / ``loss_dice``: sigmoid focal loss (mean over pixels) and dice, summed over pairs,
  on predicted masks bilinearly upsampled to the (batch-padded) target mask size. Last layer only.

Box and mask terms are divided by ``num_boxes`` = K·T instance×frame slots of the batch, absent
frames included, averaged over workers (official). Every decoder layer in ``aux_outputs`` is
matched on its own and gets copies of the class/box terms with suffix ``_i``.

Unlike the official code, the mask loss has no bare ``try/except`` that swaps the target for the
prediction: a shape mismatch is an error, never a silently zero loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from vistr.box_ops import cxcywh_to_xyxy, elementwise_generalized_box_iou
from vistr.matcher import FramePairs, SequenceMatcher, Target, build_matcher, frame_pairs


def count_num_boxes(targets: list[Target], device: torch.device | str = "cpu") -> float:
    """Instance×frame slots (K·T per clip, absent frames included), averaged over workers, ≥ 1."""
    total = torch.tensor([float(sum(tgt["valid"].numel() for tgt in targets))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        world = dist.get_world_size()
    return torch.clamp(total / world, min=1).item()


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per row: ``1 − (2Σpy + 1) / (Σp + Σy + 1)``; the +1 keeps empty masks finite."""
    prob = logits.sigmoid()
    return 1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)


def _instance_offsets(targets: list[Target], device: torch.device) -> Tensor:
    """Start of each clip's instances in the batch-concatenated target tensors."""
    sizes = torch.tensor([0] + [len(tgt["labels"]) for tgt in targets], device=device)
    return sizes.cumsum(0)[:-1]


def _matched_target_masks(targets: list[Target], pairs: FramePairs) -> Tensor:
    """``[P, Hm, Wm]`` float target masks of the pairs, zero-padded (bottom/right) to the batch max."""
    for b, tgt in enumerate(targets):
        if "masks" not in tgt:
            raise ValueError(
                f"video {tgt.get('video_id', b)}: target has no 'masks' but the mask loss is enabled"
            )
        if tgt["masks"].dim() != 4 or tgt["masks"].shape[:2] != tgt["valid"].shape:
            raise ValueError(
                f"video {tgt.get('video_id', b)}: masks must be [K, T, H, W] with K, T as in valid "
                f"{tuple(tgt['valid'].shape)}, got {tuple(tgt['masks'].shape)}"
            )
    height = max(tgt["masks"].shape[-2] for tgt in targets)
    width = max(tgt["masks"].shape[-1] for tgt in targets)
    out = []
    for b, tgt in enumerate(targets):
        sel = pairs.batch == b
        masks = tgt["masks"][
            pairs.instance[sel].to(tgt["masks"].device), pairs.frame[sel].to(tgt["masks"].device)
        ]
        masks = masks.to(pairs.batch.device, torch.float32)
        out.append(F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2])))
    return torch.cat(out)


class SetCriterion(nn.Module):
    """Matches each decoder layer's outputs, then sums named loss terms (one ``loss_*`` per group)."""

    def __init__(
        self,
        num_classes: int,
        matcher: SequenceMatcher,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        losses: tuple[str, ...] = ("labels", "boxes", "masks"),
    ) -> None:
        super().__init__()
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, dict(weight_dict)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        unknown = set(losses) - {"labels", "boxes", "masks"}
        if unknown:
            raise ValueError(
                f"SetCriterion: unknown loss group(s) {sorted(unknown)}; use labels, boxes, masks"
            )
        self.losses = tuple(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef  # the no-object class is the last logit
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(
        self,
        outputs: dict[str, Tensor],
        targets: list[Target],
        pairs: FramePairs,
        num_boxes: float,
        log: bool = True,
    ) -> dict[str, Tensor]:
        logits = outputs["pred_logits"].float()
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"pred_logits has {logits.shape[-1]} classes, expected model.num_classes + 1 = "
                f"{self.num_classes + 1}"
            )
        labels = torch.cat([tgt["labels"] for tgt in targets]).to(logits.device, torch.int64)
        matched = labels[_instance_offsets(targets, logits.device)[pairs.batch] + pairs.instance]
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[pairs.batch, pairs.query] = matched
        out = {
            "loss_ce": F.cross_entropy(
                logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.device)
            )
        }
        if log:  # log-only: % of matched pairs whose arg-max class is wrong (0 when nothing matched)
            with torch.no_grad():
                pred = logits[pairs.batch, pairs.query].argmax(-1)
                wrong = (pred != matched).float()
                out["class_error"] = 100 * wrong.mean() if len(wrong) else logits.new_zeros(())
        return out

    def loss_boxes(
        self, outputs: dict[str, Tensor], targets: list[Target], pairs: FramePairs, num_boxes: float
    ) -> dict[str, Tensor]:
        src = outputs["pred_boxes"][pairs.batch, pairs.query].float()
        boxes = torch.cat([tgt["boxes"] for tgt in targets]).to(src.device, torch.float32)
        tgt = boxes[_instance_offsets(targets, src.device)[pairs.batch] + pairs.instance, pairs.frame]
        giou = elementwise_generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt))
        return {
            "loss_bbox": F.l1_loss(src, tgt, reduction="sum") / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }

    def loss_masks(
        self, outputs: dict[str, Tensor], targets: list[Target], pairs: FramePairs, num_boxes: float
    ) -> dict[str, Tensor]:
        if "pred_masks" not in outputs:
            raise ValueError("mask loss enabled but the model outputs have no 'pred_masks'")
        tgt = _matched_target_masks(targets, pairs)
        src = outputs["pred_masks"][pairs.batch, pairs.query].float()
        src = F.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        src, tgt = src.flatten(1), tgt.flatten(1)
        focal = sigmoid_focal_loss(src, tgt, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        return {
            "loss_mask": focal.mean(1).sum() / num_boxes,
            "loss_dice": dice_loss(src, tgt).sum() / num_boxes,
        }

    def get_loss(
        self,
        name: str,
        outputs: dict[str, Tensor],
        targets: list[Target],
        pairs: FramePairs,
        num_boxes: float,
        **kwargs: Any,
    ) -> dict[str, Tensor]:
        loss_fn = {"labels": self.loss_labels, "boxes": self.loss_boxes, "masks": self.loss_masks}[name]
        return loss_fn(outputs, targets, pairs, num_boxes, **kwargs)

    def forward(self, outputs: dict[str, Any], targets: list[Target]) -> dict[str, Tensor]:
        """Named terms (aux copies suffixed ``_i``), ``class_error`` (log-only) and the weighted ``loss``."""
        device = outputs["pred_logits"].device
        num_boxes = count_num_boxes(targets, device)
        layers = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        result: dict[str, Tensor] = {}
        total = outputs["pred_logits"].new_zeros((), dtype=torch.float32)
        for suffix, layer in layers:
            matches = self.matcher(layer, targets)
            pairs = FramePairs(*(x.to(device) for x in frame_pairs(matches, targets, self.matcher.num_slots)))
            for name in self.losses:
                if suffix and name == "masks":  # aux layers have no masks (official)
                    continue
                kwargs = {"log": not suffix} if name == "labels" else {}
                for key, value in self.get_loss(name, layer, targets, pairs, num_boxes, **kwargs).items():
                    result[key + suffix] = value
                    if key in self.weight_dict:
                        total = total + self.weight_dict[key] * value
        result["loss"] = total
        return result


def build_criterion(cfg: Any) -> SetCriterion:
    """Criterion with the config's loss weights; aux layers reuse the last layer's weights."""
    loss = cfg.loss
    weight_dict = {
        "loss_ce": loss.ce_loss_coef,
        "loss_bbox": loss.bbox_loss_coef,
        "loss_giou": loss.giou_loss_coef,
        "loss_mask": loss.mask_loss_coef,
        "loss_dice": loss.dice_loss_coef,
    }
    return SetCriterion(
        cfg.model.num_classes,
        build_matcher(cfg),
        weight_dict,
        eos_coef=loss.eos_coef,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
    )
