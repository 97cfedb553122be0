"""Sequence matcher vs. a loop-written cost and brute force over all assignments."""

import itertools

import pytest
import torch

from vistr.config import load_config
from vistr.matcher import SequenceMatcher, build_matcher, frame_pairs


def random_problem(g, bs, n, t, num_logits, sizes):
    """Random outputs and targets; instances are absent in random frames (some in all of them)."""
    outputs = {
        "pred_logits": torch.randn(bs, n * t, num_logits, generator=g) * 2,
        "pred_boxes": torch.rand(bs, n * t, 4, generator=g) * 0.6 + 0.2,
    }
    targets = []
    for b, k in enumerate(sizes):
        valid = torch.rand(k, t, generator=g) > 0.35
        boxes = (torch.rand(k, t, 4, generator=g) * 0.6 + 0.2) * valid[..., None]
        labels = torch.randint(1, num_logits - 1, (k,), generator=g)
        targets.append({"labels": labels, "boxes": boxes, "valid": valid, "video_id": 100 + b})
    return outputs, targets


def iou_xyxy(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return (inter + 1e-6) / (union + 1e-6)


def xyxy(cx, cy, w, h):
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def loop_cost(outputs, target, b, n, t, weights=(1.0, 5.0, 2.0)):
    """The official sequence cost written out frame by frame (FACTS.md §c)."""
    k_count = len(target["labels"])
    cost = torch.zeros(n, k_count, dtype=torch.float64)
    prob = outputs["pred_logits"][b].double().softmax(-1)
    for slot in range(n):
        for i in range(k_count):
            c_cls = c_l1 = c_iou = 0.0
            for f in range(t):
                q = f * n + slot  # frame-major queries
                visible = bool(target["valid"][i, f])
                label = int(target["labels"][i]) if visible else 0
                box = target["boxes"][i, f].tolist() if visible else [0.0, 0.0, 0.0, 0.0]
                pred = outputs["pred_boxes"][b, q].tolist()
                c_cls -= prob[q, label].item() / t
                c_l1 += sum(abs(p - v) for p, v in zip(pred, box, strict=True)) / (4 * t)
                c_iou -= iou_xyxy(xyxy(*pred), xyxy(*box)) / t
            cost[slot, i] = weights[0] * c_cls + weights[1] * c_l1 + weights[2] * c_iou
    return cost


def brute_force_min(cost):
    n, k = cost.shape
    return min(
        sum(cost[s, i].item() for i, s in enumerate(slots)) for slots in itertools.permutations(range(n), k)
    )


@pytest.mark.parametrize("seed", range(12))
def test_matcher_is_optimal_and_cost_matches_loops(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 7, (1,), generator=g))
    t = int(torch.randint(1, 5, (1,), generator=g))
    sizes = [int(torch.randint(0, n + 1, (1,), generator=g)) for _ in range(3)]
    outputs, targets = random_problem(g, 3, n, t, 6, sizes)
    matcher = SequenceMatcher(n, t)
    cost = matcher.cost_matrix(outputs, targets)
    matches = matcher(outputs, targets)
    offset = 0
    for b, (target, (slots, insts)) in enumerate(zip(targets, matches, strict=True)):
        k = sizes[b]
        reference = loop_cost(outputs, target, b, n, t)
        torch.testing.assert_close(cost[b, :, offset : offset + k].double(), reference, atol=1e-5, rtol=1e-5)
        offset += k
        assert len(slots) == len(insts) == k
        assert sorted(insts.tolist()) == list(range(k)) and len(set(slots.tolist())) == k
        assert slots.tolist() == sorted(slots.tolist())
        achieved = sum(reference[s, i].item() for s, i in zip(slots.tolist(), insts.tolist(), strict=True))
        assert achieved == pytest.approx(brute_force_min(reference), abs=1e-5)


def test_cost_weights_come_from_config():
    cfg = load_config(
        "tiny_cpu", {"loss.set_cost_class": 0.5, "loss.set_cost_bbox": 3.0, "loss.set_cost_giou": 7.0}
    )
    n, t = cfg.model.num_slots, cfg.model.num_frames
    outputs, targets = random_problem(
        torch.Generator().manual_seed(1), 1, n, t, cfg.model.num_classes + 1, [2]
    )
    matcher = build_matcher(cfg)
    assert (matcher.num_slots, matcher.num_frames) == (n, t)
    reference = loop_cost(outputs, targets[0], 0, n, t, weights=(0.5, 3.0, 7.0))
    torch.testing.assert_close(
        matcher.cost_matrix(outputs, targets)[0].double(), reference, atol=1e-5, rtol=1e-5
    )


def test_empty_targets():
    outputs, targets = random_problem(torch.Generator().manual_seed(2), 2, 3, 2, 5, [0, 0])
    matches = SequenceMatcher(3, 2)(outputs, targets)
    assert [(len(s), len(i)) for s, i in matches] == [(0, 0), (0, 0)]
    pairs = frame_pairs(matches, targets, 3)
    assert all(len(x) == 0 for x in pairs)


def test_more_instances_than_slots_is_refused_naming_the_video():
    outputs, targets = random_problem(torch.Generator().manual_seed(3), 2, 4, 2, 5, [2, 5])
    with pytest.raises(ValueError, match=r"video 101: 5 ground-truth instances .*num_slots=4"):
        SequenceMatcher(4, 2)(outputs, targets)


def test_bad_targets_are_refused_clearly():
    outputs, targets = random_problem(torch.Generator().manual_seed(4), 1, 3, 2, 5, [2])
    matcher = SequenceMatcher(3, 2)
    bad_label = [dict(targets[0], labels=torch.tensor([1, 4]))]  # 4 = no-object index
    with pytest.raises(ValueError, match="video 100: labels .* no-object"):
        matcher(outputs, bad_label)
    bad_frames = [dict(targets[0], boxes=targets[0]["boxes"][:, :1])]
    with pytest.raises(ValueError, match=r"video 100: expected boxes \[2, 2, 4\]"):
        matcher(outputs, bad_frames)
    with pytest.raises(ValueError, match="expected num_slots"):
        SequenceMatcher(4, 2)(outputs, targets)


def test_non_finite_predictions_are_reported_not_passed_to_scipy():
    outputs, targets = random_problem(torch.Generator().manual_seed(5), 2, 3, 2, 5, [1, 2])
    outputs["pred_boxes"][1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match="video 101: matching cost is not finite"):
        SequenceMatcher(3, 2)(outputs, targets)


def test_frame_pairs_use_the_matched_targets_valid_frames():
    """Issue #80: frames must come from valid[tgt_idx[j]], not valid[j]."""
    n, t = 3, 4
    valid = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)  # inst 0 early, inst 1 late
    boxes = (
        torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])[:, None].repeat(1, t, 1) * valid[..., None]
    )
    target = {"labels": torch.tensor([1, 2]), "boxes": boxes, "valid": valid, "video_id": 7}
    logits = torch.zeros(1, n * t, 4)
    pred_boxes = torch.full((1, n * t, 4), 0.1)
    for f in range(t):  # slot 0 tracks instance 1, slot 2 tracks instance 0
        pred_boxes[0, f * n + 0] = torch.tensor([0.7, 0.7, 0.2, 0.2])
        pred_boxes[0, f * n + 2] = torch.tensor([0.3, 0.3, 0.2, 0.2])
        logits[0, f * n + 0, 2] = logits[0, f * n + 2, 1] = 5.0
    matches = SequenceMatcher(n, t)({"pred_logits": logits, "pred_boxes": pred_boxes}, [target])
    assert matches[0][0].tolist() == [0, 2] and matches[0][1].tolist() == [1, 0]
    pairs = frame_pairs(matches, [target], n)
    got = sorted(zip(pairs.query.tolist(), pairs.instance.tolist(), pairs.frame.tolist(), strict=True))
    # slot 0 ↔ instance 1 on frames 2, 3 (queries 2·3+0, 3·3+0); slot 2 ↔ instance 0 on frames 0, 1.
    assert got == [(2, 0, 0), (5, 0, 1), (6, 1, 2), (9, 1, 3)]
    assert pairs.batch.tolist() == [0, 0, 0, 0]


def test_frame_pairs_batch_and_query_layout():
    valid0 = torch.tensor([[True, False, True]])
    valid1 = torch.tensor([[True, True, True], [False, False, False]])
    targets = [{"valid": valid0}, {"valid": valid1}]
    matches = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([0, 3]), torch.tensor([1, 0]))]
    pairs = frame_pairs(matches, targets, num_slots=4)
    got = sorted(zip(*(x.tolist() for x in pairs), strict=True))
    expected = [(0, 1, 0, 0), (0, 2 * 4 + 1, 0, 2)] + [(1, f * 4 + 3, 0, f) for f in range(3)]
    assert got == sorted(expected)  # instance 1 of clip 1 is never visible: no pairs for slot 0
