"""Box helpers: hand-computed values, torchvision agreement, empty/degenerate inputs."""

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou

from vistr.box_ops import (
    cxcywh_to_xyxy,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    masks_to_normalized_cxcywh,
)


def test_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # inter 1, union 4 + 4 - 1 = 7, enclosing box 3×3 = 9; official eps 1e-6 everywhere.
    iou = (1 + 1e-6) / (7 + 1e-6)
    assert elementwise_box_iou(a, b).item() == pytest.approx(iou, rel=1e-6)
    giou = iou - (9 - 7 + 1e-6) / (9 + 1e-6)
    assert elementwise_generalized_box_iou(a, b).item() == pytest.approx(giou, rel=1e-6)


def test_disjoint_boxes_giou_is_negative():
    a = torch.tensor([0.0, 0.0, 1.0, 1.0])
    b = torch.tensor([2.0, 0.0, 3.0, 1.0])
    # inter 0, union 2, enclosing 3 → iou = 1e-6/2, giou ≈ -1/3
    assert elementwise_generalized_box_iou(a, b).item() == pytest.approx(
        1e-6 / 2 - (1 + 1e-6) / (3 + 1e-6), abs=1e-7
    )


def test_elementwise_matches_torchvision_pairwise_diagonal():
    g = torch.Generator().manual_seed(0)
    cxcywh1 = torch.rand(50, 4, generator=g) * 0.5 + 0.25
    cxcywh2 = torch.rand(50, 4, generator=g) * 0.5 + 0.25
    b1, b2 = cxcywh_to_xyxy(cxcywh1), cxcywh_to_xyxy(cxcywh2)
    # The eps differs from torchvision's, so agreement is to ~1e-5, not bitwise.
    torch.testing.assert_close(elementwise_box_iou(b1, b2), box_iou(b1, b2).diagonal(), atol=2e-5, rtol=0)
    torch.testing.assert_close(
        elementwise_generalized_box_iou(b1, b2), generalized_box_iou(b1, b2).diagonal(), atol=2e-5, rtol=0
    )


def test_iou_broadcasts_and_zero_target_box_is_near_zero():
    pred = cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.4]]))  # [2, 4]
    zero = torch.zeros(3, 1, 4)  # absent-frame placeholder
    iou = elementwise_box_iou(pred, zero)
    assert iou.shape == (3, 2)
    assert torch.isfinite(iou).all() and (iou < 1e-4).all()


def test_giou_refuses_degenerate_boxes_but_propagates_nan():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="boxes2 has degenerate"):
        elementwise_generalized_box_iou(good, torch.tensor([[0.5, 0.0, 0.2, 1.0]]))
    # NaN must reach the loss (the training loop reports non-finite losses with their batch).
    assert torch.isnan(
        elementwise_generalized_box_iou(torch.tensor([[float("nan"), 0.0, 1.0, 1.0]]), good)
    ).all()


def test_masks_to_normalized_cxcywh_whole_pixels_and_empty():
    masks = torch.zeros(2, 10, 20, dtype=torch.bool)
    masks[0, 2:5, 3:8] = True  # rows 2..4, cols 3..7 → pixel extent x 3..8, y 2..5
    boxes = masks_to_normalized_cxcywh(masks)
    torch.testing.assert_close(boxes[0], torch.tensor([5.5 / 20, 3.5 / 10, 5 / 20, 3 / 10]))
    assert boxes[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_masks_to_normalized_cxcywh_uint8_and_full_frame():
    boxes = masks_to_normalized_cxcywh(torch.ones(1, 4, 6, dtype=torch.uint8))
    torch.testing.assert_close(boxes[0], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        masks_to_normalized_cxcywh(torch.ones(4, 6))
