"""Hungarian loss terms vs. loop-written references, invariances, aux layers, gradients, num_boxes."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from vistr.config import load_config
from vistr.losses import SetCriterion, build_criterion, count_num_boxes, dice_loss
from vistr.matcher import SequenceMatcher

N, T, C = 3, 3, 4  # slots, frames, num_classes (logits C + 1, no-object = C)
WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask": 1.0, "loss_dice": 1.0}


def make_criterion(eos=0.1):
    return SetCriterion(C, SequenceMatcher(N, T), WEIGHTS, eos_coef=eos)


def make_outputs(g, bs=2, aux_layers=1, mask_hw=(2, 3)):
    def layer():
        return {
            "pred_logits": torch.randn(bs, N * T, C + 1, generator=g),
            "pred_boxes": torch.rand(bs, N * T, 4, generator=g) * 0.5 + 0.25,
        }

    out = layer()
    out["pred_masks"] = torch.randn(bs, N * T, *mask_hw, generator=g) * 2
    out["aux_outputs"] = [layer() for _ in range(aux_layers)]
    return out


def make_targets(g, sizes=(2, 1), mask_sizes=((8, 12), (6, 10))):
    """Clip-size masks (different per clip), instances absent in some frames."""
    targets = []
    for b, (k, hw) in enumerate(zip(sizes, mask_sizes, strict=True)):
        valid = torch.ones(k, T, dtype=torch.bool)
        if k:
            valid[0, 1] = False
        boxes = (torch.rand(k, T, 4, generator=g) * 0.5 + 0.25) * valid[..., None]
        masks = (torch.rand(k, T, *hw, generator=g) > 0.6) & valid[..., None, None]
        targets.append(
            {
                "labels": torch.randint(1, C, (k,), generator=g),
                "boxes": boxes,
                "valid": valid,
                "masks": masks,
                "video_id": b,
            }
        )
    return targets


def xyxy(box):
    cx, cy, w, h = box
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def giou(a, b):
    a, b = xyxy(a), xyxy(b)
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return (inter + 1e-6) / (union + 1e-6) - (hull - union + 1e-6) / (hull + 1e-6)


def reference_losses(outputs, targets, matches, eos=0.1, alpha=0.25, gamma=2.0):
    """Every term written as loops over clips, queries, pairs and pixels (FACTS.md §c)."""
    num_boxes = max(1.0, sum(len(t["labels"]) * T for t in targets))
    pairs = []  # (b, query, instance, frame) over valid frames of the MATCHED instance
    for b, (slots, insts) in enumerate(matches):
        for slot, inst in zip(slots.tolist(), insts.tolist(), strict=True):
            pairs += [(b, f * N + slot, inst, f) for f in range(T) if targets[b]["valid"][inst, f]]
    classes = {(b, q): int(targets[b]["labels"][i]) for b, q, i, _ in pairs}
    ce_num = ce_den = 0.0
    for b in range(len(targets)):
        for q in range(N * T):
            c = classes.get((b, q), C)
            row = outputs["pred_logits"][b, q].double()
            w = eos if c == C else 1.0
            ce_num += w * (math.log(row.exp().sum().item()) - row[c].item())
            ce_den += w
    l1 = sum(
        abs(p - v)
        for b, q, i, f in pairs
        for p, v in zip(outputs["pred_boxes"][b, q].tolist(), targets[b]["boxes"][i, f].tolist(), strict=True)
    )
    g = sum(
        1 - giou(outputs["pred_boxes"][b, q].tolist(), targets[b]["boxes"][i, f].tolist())
        for b, q, i, f in pairs
    )
    height = max(t["masks"].shape[-2] for t in targets)
    width = max(t["masks"].shape[-1] for t in targets)
    focal = dice = 0.0
    for b, q, i, f in pairs:
        y = torch.zeros(height, width, dtype=torch.float64)
        m = targets[b]["masks"][i, f]
        y[: m.shape[0], : m.shape[1]] = m.double()  # zero padding to the batch max
        x = F.interpolate(
            outputs["pred_masks"][b, q][None, None].double(),
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )[0, 0]
        p = 1 / (1 + torch.exp(-x))
        ce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
        p_t = p * y + (1 - p) * (1 - y)
        focal += ((alpha * y + (1 - alpha) * (1 - y)) * ce * (1 - p_t) ** gamma).mean().item()
        dice += 1 - (2 * (p * y).sum().item() + 1) / (p.sum().item() + y.sum().item() + 1)
    return {
        "loss_ce": ce_num / ce_den,
        "loss_bbox": l1 / num_boxes,
        "loss_giou": g / num_boxes,
        "loss_mask": focal / num_boxes,
        "loss_dice": dice / num_boxes,
    }


def test_each_term_equals_loop_reference():
    g = torch.Generator().manual_seed(0)
    outputs, targets = make_outputs(g), make_targets(g)
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    reference = reference_losses(outputs, targets, criterion.matcher(outputs, targets))
    for key, value in reference.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert losses["loss"].item() == pytest.approx(
        sum(
            WEIGHTS[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] * v.item()
            for k, v in losses.items()
            if k.startswith("loss_")
        ),
        rel=1e-6,
    )


def test_masks_at_padded_batch_size_and_eos_weight():
    g = torch.Generator().manual_seed(1)
    outputs = make_outputs(g, mask_hw=(3, 4))
    targets = make_targets(g, mask_sizes=((12, 16), (12, 16)))
    criterion = make_criterion(eos=0.3)
    losses = criterion(outputs, targets)
    reference = reference_losses(outputs, targets, criterion.matcher(outputs, targets), eos=0.3)
    for key, value in reference.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_absent_frames_of_matched_instance_are_no_object():
    """Bug #80 scenario in the loss: instances visible in different frames."""
    valid = torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    boxes = (
        torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])[:, None].repeat(1, T, 1) * valid[..., None]
    )
    target = {
        "labels": torch.tensor([1, 2]),
        "boxes": boxes,
        "valid": valid,
        "masks": torch.zeros(2, T, 4, 4, dtype=torch.bool),
        "video_id": 9,
    }
    pred_boxes = torch.full((1, N * T, 4), 0.5)
    logits = torch.zeros(1, N * T, C + 1)
    logits[..., 1] = 2.0  # every query prefers class 1: CE depends on which queries are matched
    for f in range(T):  # slot 0 follows instance 1 (0.1 off), slot 2 follows instance 0 exactly
        pred_boxes[0, f * N + 0] = torch.tensor([0.8, 0.7, 0.2, 0.2])
        pred_boxes[0, f * N + 2] = torch.tensor([0.3, 0.3, 0.2, 0.2])
    outputs = {"pred_logits": logits, "pred_boxes": pred_boxes, "pred_masks": torch.zeros(1, N * T, 2, 2)}
    losses = make_criterion()(outputs, [target])
    # Fixed: slot 0 ↔ instance 1 on frame 2 only → L1 = 0.1; slot 2 ↔ instance 0 frames 0, 1 → 0.
    assert losses["loss_bbox"].item() == pytest.approx(0.1 / (2 * T), rel=1e-5)
    # Matched (valid) pairs: queries 2, 5 (slot 2, frames 0-1, label 1) and 6 (slot 0, frame 2, label 2);
    # the other 6 queries, including slot 0 on instance 1's absent frames, are no-object (weight 0.1).
    # The official bug would instead label queries 0, 3 as 2 and query 8 as 1.
    lse = math.log(math.exp(2.0) + C)
    expected = (2 * (lse - 2) + lse + 6 * 0.1 * lse) / (3 + 6 * 0.1)
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-6)
    assert losses["class_error"].item() == pytest.approx(100 / 3, rel=1e-6)  # label 2 predicted as 1


def test_empty_masks_and_empty_targets_are_finite():
    g = torch.Generator().manual_seed(2)
    outputs = make_outputs(g)
    outputs["pred_masks"] = torch.full_like(outputs["pred_masks"], -30.0).requires_grad_()
    targets = make_targets(g)
    for t in targets:
        t["masks"].zero_()
    losses = make_criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_dice"].item() == pytest.approx(0.0, abs=1e-6)  # empty vs ~empty: (0+1)/(0+0+1)
    assert dice_loss(torch.full((1, 5), 30.0), torch.zeros(1, 5)).item() == pytest.approx(1 - 1 / 6, rel=1e-6)

    empty = make_targets(g, sizes=(0, 0))
    losses = make_criterion()(outputs, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    for key in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert losses[key].item() == 0.0
    expected_ce = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), torch.full((2, N * T), C))
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)  # all no-object
    losses["loss"].backward()  # the graph stays connected with nothing matched


def permute_slots(outputs, perm):
    """Slot k moves to slot perm[k] in every frame: query t·n + k → t·n + perm[k]."""
    index = torch.empty(N * T, dtype=torch.int64)
    for f in range(T):
        for k in range(N):
            index[f * N + perm[k]] = f * N + k

    def apply(layer):
        return {key: value[:, index] for key, value in layer.items() if key != "aux_outputs"}

    out = apply(outputs)
    out["aux_outputs"] = [apply(a) for a in outputs["aux_outputs"]]
    return out


def test_total_invariant_to_slot_permutation():
    g = torch.Generator().manual_seed(3)
    outputs, targets = make_outputs(g, aux_layers=2), make_targets(g)
    criterion = make_criterion()
    base = criterion(outputs, targets)
    permuted = criterion(permute_slots(outputs, [2, 0, 1]), targets)
    assert base.keys() == permuted.keys()
    for key in base:
        assert permuted[key].item() == pytest.approx(base[key].item(), rel=1e-5, abs=1e-7), key


def test_aux_layers_matched_independently_and_without_masks():
    g = torch.Generator().manual_seed(4)
    outputs, targets = make_outputs(g, aux_layers=2), make_targets(g)
    last = {k: outputs[k] for k in ("pred_logits", "pred_boxes")}
    outputs["aux_outputs"][1] = permute_slots({**last, "aux_outputs": []}, [1, 2, 0])
    del outputs["aux_outputs"][1]["aux_outputs"]
    losses = make_criterion()(outputs, targets)
    expected = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")}
    assert set(losses) == expected | {"loss_mask", "loss_dice", "class_error", "loss"}
    for key in ("loss_ce", "loss_bbox", "loss_giou"):  # a slot-permuted copy of the last layer
        assert losses[f"{key}_1"].item() == pytest.approx(losses[key].item(), rel=1e-5)
        assert losses[f"{key}_0"].item() != pytest.approx(losses[key].item(), rel=1e-3)


def test_gradients_reach_logits_boxes_masks():
    g = torch.Generator().manual_seed(5)
    outputs, targets = make_outputs(g), make_targets(g)
    leaves = [
        outputs["pred_logits"],
        outputs["pred_boxes"],
        outputs["pred_masks"],
        outputs["aux_outputs"][0]["pred_logits"],
        outputs["aux_outputs"][0]["pred_boxes"],
    ]
    for leaf in leaves:
        leaf.requires_grad_()
    make_criterion()(outputs, targets)["loss"].backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_low_precision_outputs_give_float32_losses_close_to_fp32():
    """Under autocast (AMP), half-precision outputs are promoted: terms are float32 and near fp32."""
    g = torch.Generator().manual_seed(8)
    outputs, targets = make_outputs(g), make_targets(g)
    criterion = make_criterion()
    reference = criterion(outputs, targets)
    low = {k: v.bfloat16() for k, v in outputs.items() if k != "aux_outputs"}
    low["aux_outputs"] = [{k: v.bfloat16() for k, v in a.items()} for a in outputs["aux_outputs"]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = criterion(low, targets)
    for key, value in losses.items():
        assert value.dtype == torch.float32, key
        assert value.item() == pytest.approx(reference[key].item(), rel=2e-2, abs=1e-3), key


def test_shape_errors_surface():
    g = torch.Generator().manual_seed(6)
    outputs, targets = make_outputs(g), make_targets(g)
    targets[1]["masks"] = targets[1]["masks"][:, :2]
    with pytest.raises(ValueError, match=r"video 1: masks must be \[K, T, H, W\]"):
        make_criterion()(outputs, targets)
    targets = make_targets(g)
    del outputs["pred_masks"]
    with pytest.raises(ValueError, match="pred_masks"):
        make_criterion()(outputs, targets)


def test_build_criterion_from_config():
    cfg = load_config("tiny_cpu", {"loss.eos_coef": 0.2, "loss.giou_loss_coef": 3.0})
    criterion = build_criterion(cfg)
    assert criterion.num_classes == cfg.model.num_classes
    assert criterion.empty_weight[-1].item() == pytest.approx(0.2) and criterion.empty_weight[:-1].eq(1).all()
    assert criterion.weight_dict["loss_giou"] == 3.0
    assert (criterion.matcher.num_slots, criterion.matcher.num_frames) == (
        cfg.model.num_slots,
        cfg.model.num_frames,
    )


def test_num_boxes_counts_absent_frames_and_clamps():
    g = torch.Generator().manual_seed(7)
    assert count_num_boxes(make_targets(g, sizes=(2, 1))) == 3 * T  # one instance-frame is absent
    assert count_num_boxes(make_targets(g, sizes=(0, 0))) == 1.0


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from vistr.losses import count_num_boxes
    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    k = [3, 0][rank]  # rank 0: one clip of 3 instances; rank 1: one empty clip
    targets = [{"labels": torch.ones(k), "valid": torch.ones(k, 5, dtype=torch.bool)}]
    print(count_num_boxes(targets))
    dist.destroy_process_group()
""")


def test_num_boxes_is_averaged_over_workers(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(r), str(tmp_path / "store")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert [float(out.strip()) for out, _ in results] == [7.5, 7.5]  # (3·5 + 0) / 2 on both workers
