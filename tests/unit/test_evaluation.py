"""Tests of vistr.evaluation / vistr.eval_io against hand-computed values and a brute-force
implementation of the official YouTube-VIS protocol written here with plain loops."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mu

from vistr.cli import main as cli_main
from vistr.eval_io import EvaluationWarning, GroundTruthFormatError, ResultsFormatError, rle_string_stats
from vistr.evaluation import IOU_THRS, REC_THRS, STAT_NAMES, encode_track, evaluate, validate_results

# ----------------------------------------------------------------------------------------------
# builders


def rect(t: int, h: int, w: int, boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """[t,h,w] masks; ``boxes[frame] = (y0, x0, y1, x1)``, frames not listed are empty."""
    m = np.zeros((t, h, w), bool)
    for f, (y0, x0, y1, x1) in boxes.items():
        m[f, y0:y1, x0:x1] = True
    return m


def gt_ann(aid: int, vid: int, cat: int, masks: np.ndarray, crowd: int = 0) -> dict:
    present = masks.any((1, 2))
    return {"id": aid, "video_id": vid, "category_id": cat, "iscrowd": crowd,
            "areas": [int(m.sum()) if p else None for m, p in zip(masks, present, strict=False)],
            "segmentations": encode_track(masks, present)}


def det(vid: int, cat: int, score: float, masks: np.ndarray, present=None) -> dict:
    present = masks.any((1, 2)) if present is None else present
    return {"video_id": vid, "category_id": cat, "score": score, "segmentations": encode_track(masks, present)}


def dataset(videos: list[tuple[int, int, int, int]], anns: list[dict], cats=(1,)) -> dict:
    """videos: (id, height, width, length)."""
    return {"videos": [{"id": v, "height": h, "width": w, "length": n} for v, h, w, n in videos],
            "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cats]}


def close(stats: dict, **expected: float) -> None:
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, abs=1e-12), key


SQ = {0: (0, 0, 10, 10)}  # a 10×10 square in frame 0


# ----------------------------------------------------------------------------------------------
# hand-computed cases


def test_perfect_predictions_and_inclusive_area_bounds():
    # Video 1: a 10×10 square (area 100, small). Video 2: a 128×128 square, area exactly 128² =
    # 16384, which lies in BOTH the small and the medium range (bounds are inclusive).
    # Every GT is found with IoU 1, so precision is 1 (up to the official eps: 1/(1+2.2e-16)).
    a = rect(2, 140, 140, {0: (0, 0, 10, 10), 1: (2, 2, 12, 12)})
    b = rect(2, 140, 140, {0: (0, 0, 128, 128), 1: (5, 5, 133, 133)})
    gt = dataset([(1, 140, 140, 2), (2, 140, 140, 2)], [gt_ann(1, 1, 1, a), gt_ann(2, 2, 2, b)], cats=(1, 2))
    stats = evaluate(gt, [det(1, 1, 0.9, a), det(2, 2, 0.8, b)])
    assert list(stats) == list(STAT_NAMES)
    close(stats, AP=1, AP50=1, AP75=1, AP_S=1, AP_M=1, AP_L=-1, AR1=1, AR10=1, AR100=1, AR_S=1, AR_M=1, AR_L=-1)


def test_missed_instance():
    # Two GT (two videos), one perfect detection: recall 1/2, precision 1. Precision at the 101
    # recall thresholds is 1 for thr ≤ 0.5 (51 of them: 0.00 .. 0.50) and 0 above: AP = 51/101.
    m = rect(1, 20, 20, SQ)
    gt = dataset([(1, 20, 20, 1), (2, 20, 20, 1)], [gt_ann(1, 1, 1, m), gt_ann(2, 2, 1, m)])
    close(evaluate(gt, [det(1, 1, 0.9, m)]), AP=51 / 101, AP50=51 / 101, AR1=0.5, AR100=0.5)


def test_false_positive_above_true_positive():
    # Scores: FP (no overlap) 0.9, TP 0.8. Cumulative tp=[0,1], fp=[1,1]: recall [0,1],
    # precision [0, 0.5] → made monotone [0.5, 0.5]; every recall threshold picks 0.5: AP = 0.5.
    # With maxDets=1 only the FP is kept in the video: AR1 = 0.
    gt_m, fp_m = rect(1, 40, 40, SQ), rect(1, 40, 40, {0: (20, 20, 30, 30)})
    gt = dataset([(1, 40, 40, 1)], [gt_ann(1, 1, 1, gt_m)])
    close(evaluate(gt, [det(1, 1, 0.9, fp_m), det(1, 1, 0.8, gt_m)]), AP=0.5, AP75=0.5, AR1=0, AR10=1)


def test_instance_absent_in_some_frames():
    # GT present in frames 0,1 (absent in 2); the detection matches in 0,1 and adds a 100-px mask
    # in frame 2 where only it is present: IoU = (100+100)/(100+100+100) = 2/3, which passes the
    # thresholds .50 .55 .60 .65 (4 of 10): AP = 0.4, AP50 = 1, AP75 = 0.
    g = rect(3, 20, 20, {0: (0, 0, 10, 10), 1: (0, 0, 10, 10)})
    d = rect(3, 20, 20, {0: (0, 0, 10, 10), 1: (0, 0, 10, 10), 2: (5, 5, 15, 15)})
    gt = dataset([(1, 20, 20, 3)], [gt_ann(1, 1, 1, g)])
    close(evaluate(gt, [det(1, 1, 0.5, d)]), AP=0.4, AP50=1, AP75=0, AR100=0.4)


@pytest.mark.parametrize("n_frames, n_pred, n_matched", [(4, 2, 1), (4, 3, 6), (10, 9, 9)])
def test_null_prediction_frames_and_iou_exactly_at_threshold(n_frames, n_pred, n_matched):
    # GT present in all frames (100 px each); the prediction equals it in the first n_pred frames
    # and is null after: IoU = n_pred/n_frames exactly = 0.5, 0.75, 0.9. IoU == t matches, so
    # 0.5 passes 1 threshold, 0.75 passes 6 (.50–.75) and 0.9 passes 9 (the 9th threshold is
    # 0.8999999999999999): AP = n_matched / 10.
    boxes = {f: (0, 0, 10, 10) for f in range(n_frames)}
    g = rect(n_frames, 20, 20, boxes)
    present = np.arange(n_frames) < n_pred
    gt = dataset([(1, 20, 20, n_frames)], [gt_ann(1, 1, 1, g)])
    close(evaluate(gt, [det(1, 1, 0.5, g, present)]), AP=n_matched / 10, AP50=1, AP75=float(n_matched >= 6))


def test_equal_iou_goes_to_the_last_gt():
    # GT A = cols 0-9, B = cols 10-19 (100 px each, file order A, B). D1 (0.9) = A∪B has IoU
    # exactly 0.5 with both; the official ">=" update hands it the LAST, B. D2 (0.8) = A then
    # matches A. At t=0.5: TP, TP → AP50 = 1. At t > 0.5 D1 is an FP before the TP D2:
    # recall [0, .5], precision [0, .5] → 0.5 at the 51 thresholds ≤ 0.5: AP_t = 25.5/101.
    a, b = rect(1, 10, 20, {0: (0, 0, 10, 10)}), rect(1, 10, 20, {0: (0, 10, 10, 20)})
    gt = dataset([(1, 10, 20, 1)], [gt_ann(1, 1, 1, a), gt_ann(2, 1, 1, b)])
    stats = evaluate(gt, [det(1, 1, 0.9, a | b), det(1, 1, 0.8, a)])
    close(stats, AP50=1, AP75=25.5 / 101, AP=(1 + 9 * 25.5 / 101) / 10, AR100=(1 + 9 * 0.5) / 10)


def test_crowd_gt_is_ignored_and_matches_many_detections():
    # GT A (normal) and B (crowd) of one category. Detections by score: B, B, A. Both B hits
    # match the crowd GT (a crowd GT may be matched again) and are ignored, A is a TP and the
    # only counted GT: AP = 1. (Counting the 2nd B hit as FP would give precision 0.5.)
    a, b = rect(1, 40, 40, SQ), rect(1, 40, 40, {0: (20, 20, 30, 30)})
    gt = dataset([(1, 40, 40, 1)], [gt_ann(1, 1, 1, a), gt_ann(2, 1, 1, b, crowd=1)])
    close(evaluate(gt, [det(1, 1, 0.9, b), det(1, 1, 0.8, b), det(1, 1, 0.7, a)]), AP=1, AR100=1)


def test_recall_grid_quirk():
    # 20 GT (one per video), 7 perfect detections: final recall 7/20 = 0.35. np.linspace(0,1,101)
    # puts its 36th threshold at 0.35000000000000003 > 0.35, so only thresholds 0..34 find a
    # precision (1); AP = 35/101, not the 36/101 that k/100 thresholds would give.
    assert REC_THRS[35] > 0.35
    m = rect(1, 8, 8, {0: (0, 0, 4, 4)})
    gt = dataset([(v, 8, 8, 1) for v in range(1, 21)], [gt_ann(v, v, 1, m) for v in range(1, 21)])
    close(evaluate(gt, [det(v, 1, 0.5, m) for v in range(1, 8)]), AP=35 / 101, AR100=0.35)


def test_two_gt_of_one_category_in_one_video():
    # Perfect detections of both; maxDets=1 keeps one detection per (video, category): AR1 = 0.5.
    a, b = rect(1, 40, 40, SQ), rect(1, 40, 40, {0: (20, 20, 30, 30)})
    gt = dataset([(1, 40, 40, 1)], [gt_ann(1, 1, 1, a), gt_ann(2, 1, 1, b)])
    close(evaluate(gt, [det(1, 1, 0.9, a), det(1, 1, 0.8, b)]), AP=1, AR1=0.5, AR10=1)


def test_empty_results_give_zero_or_minus_one():
    # No detections: 0 wherever a range has GT (here only "small"), -1 where it has none.
    gt = dataset([(1, 20, 20, 1)], [gt_ann(1, 1, 1, rect(1, 20, 20, SQ))])
    close(evaluate(gt, []), AP=0, AP50=0, AP_S=0, AP_M=-1, AP_L=-1, AR1=0, AR100=0, AR_S=0, AR_M=-1, AR_L=-1)


def test_gt_id_zero_is_an_ordinary_id():
    # Deliberate difference: the official code stores the match as dtMatches = 0 = "unmatched".
    m = rect(1, 20, 20, SQ)
    gt = dataset([(1, 20, 20, 1)], [gt_ann(0, 1, 1, m)])
    close(evaluate(gt, [det(1, 1, 0.5, m)]), AP=1)


# ----------------------------------------------------------------------------------------------
# format errors, lenient mode, warnings


def _one_video():
    m = rect(2, 20, 30, {0: (0, 0, 10, 10), 1: (0, 0, 10, 10)})
    return dataset([(7, 20, 30, 2)], [gt_ann(1, 7, 1, m)]), m


def _bad_entries(m):
    good = det(7, 1, 0.5, m)
    wrong_size = encode_track(np.zeros((2, 21, 30), bool))
    truncated = {"size": [20, 30], "counts": good["segmentations"][0]["counts"][:-1]}
    return {
        "unknown video": ({**good, "video_id": 99}, "video_id 99"),
        "frame count": ({**good, "segmentations": good["segmentations"][:1]}, "1 segmentations for a 2-frame"),
        "bad chars": ({**good, "segmentations": [{"size": [20, 30], "counts": "~~ \n"}, None]}, "invalid compressed RLE"),
        "truncated RLE": ({**good, "segmentations": [truncated, None]}, "invalid compressed RLE"),
        "size": ({**good, "segmentations": wrong_size}, "differs from the video size"),
        "uncompressed": ({**good, "segmentations": [{"size": [20, 30], "counts": [600]}, None]}, "compressed string"),
        "not a dict": ({**good, "segmentations": [[1, 2, 3, 4, 5, 6], None]}, "expected null or a compressed RLE"),
        "score": ({**good, "score": float("nan")}, "score must be a finite number"),
    }


@pytest.mark.parametrize("case", list(_bad_entries(_one_video()[1])))
def test_format_errors_name_the_entry(case):
    gt, m = _one_video()
    bad, fragment = _bad_entries(m)[case]
    with pytest.raises(ResultsFormatError) as err:
        validate_results(gt, [det(7, 1, 0.9, m), bad])
    message = str(err.value)
    assert "results entry #1 (video_id " in message and fragment in message
    assert "#0" not in message


def test_ground_truth_errors_name_the_annotation():
    gt, m = _one_video()
    gt["annotations"][0]["segmentations"][1] = {"size": [20, 30], "counts": [500, 50]}  # sums to 550 ≠ 600
    with pytest.raises(GroundTruthFormatError, match=r"GT annotation #0 \(id 1, video_id 7\): frame 1: .*600"):
        evaluate(gt, [])
    gt["annotations"][0]["segmentations"].append(None)
    with pytest.raises(GroundTruthFormatError, match="3 segmentations for a 2-frame video"):
        evaluate(gt, [])


def test_lenient_reproduces_official_truncation_and_size_mismatch():
    g = rect(4, 20, 20, {f: (0, 0, 10, 10) for f in range(4)})
    gt = dataset([(1, 20, 20, 4)], [gt_ann(1, 1, 1, g)])
    short = det(1, 1, 0.5, g[:2])
    # zip() stops after the 2 predicted frames: IoU = 200/200 = 1 (not 200/400) → AP = 1.
    close(evaluate(gt, [short], lenient=True), AP=1)
    # Frame 1 has the wrong size: the official merge yields nothing there (I=U=0), frames 2,3 are
    # null (U += 100 each): IoU = 100/(100+0+100+100) = 1/3 < 0.5 → AP = 0.
    segs = encode_track(g)[:1] + encode_track(np.ones((1, 20, 21), bool)) + [None, None]
    mismatched = {"video_id": 1, "category_id": 1, "score": 0.5, "segmentations": segs}
    close(evaluate(gt, [mismatched], lenient=True), AP=0)
    # With frame 1 correct instead, IoU = 200/400 = 0.5 → AP50 = 1.
    segs[1] = encode_track(g)[1]
    close(evaluate(gt, [mismatched], lenient=True), AP50=1)
    with pytest.warns(EvaluationWarning, match="unknown video_id"):
        close(evaluate(gt, [{**short, "video_id": 5}, det(1, 1, 0.4, g)], lenient=True), AP=1)


def test_unknown_category_dropped_with_warning_and_missing_gt_fields_filled():
    m = rect(1, 20, 20, SQ)
    gt = dataset([(1, 20, 20, 1)], [{k: v for k, v in gt_ann(1, 1, 1, m).items() if k not in ("areas", "iscrowd")}])
    with pytest.warns(EvaluationWarning) as record:
        stats = evaluate(gt, [det(1, 1, 0.5, m), det(1, 42, 0.9, m)])
    messages = " ".join(str(w.message) for w in record)
    assert "1 results with a category_id not in the GT" in messages and "lack 'areas'" in messages
    close(stats, AP=1, AP_S=1)


def test_rle_string_stats_matches_pycocotools():
    rng = np.random.default_rng(3)
    masks = rng.random((40, 37, 53)) < rng.random((40, 1, 1))
    masks[:3] = False
    masks[3:5] = True
    masks[10:20] = np.cumsum(rng.random((10, 37, 53)) < 0.01, axis=1) % 2 == 1  # long runs
    rles = encode_track(masks)
    valid, area = rle_string_stats([r["counts"] for r in rles], np.full(len(rles), 37 * 53))
    assert valid.all() and area.tolist() == masks.sum((1, 2)).tolist()
    broken = [rles[5]["counts"][:-2], rles[6]["counts"] + "1", "\x7f", rles[7]["counts"]]
    valid, _ = rle_string_stats(broken, np.full(4, 37 * 53))
    assert valid.tolist() == [False, False, False, True]


def test_encode_track_round_trip():
    masks = rect(3, 12, 9, {0: (1, 2, 5, 7), 2: (0, 0, 12, 9)})
    segs = encode_track(masks, [True, False, True])
    assert segs[1] is None and all(isinstance(s["counts"], str) for s in (segs[0], segs[2]))
    assert segs[0]["size"] == [12, 9]
    assert np.array_equal(mu.decode(segs[2]), masks[2]) and np.array_equal(mu.decode(segs[0]), masks[0])
    with pytest.raises(ValueError, match=r"\[T,H,W\]"):
        encode_track(masks[0])


def test_cli_json_and_error(tmp_path, capsys):
    gt, m = _one_video()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([det(7, 1, 0.9, m)]))
    assert cli_main(["evaluate-results", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "res.json"),
                     "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert list(stats) == list(STAT_NAMES) and stats["AP"] == pytest.approx(1, abs=1e-12)
    (tmp_path / "bad.json").write_text(json.dumps([{**det(7, 1, 0.9, m), "video_id": 3}]))
    assert cli_main(["evaluate-results", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "bad.json")]) == 2
    assert "results entry #0 (video_id 3)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# random cases vs brute force


def random_case(seed: int, n_videos: int = 4, n_frames: int = 3, crowded: bool = False):
    """GT in all three encodings (polygon, uncompressed, compressed) with areas in all ranges,
    crowd GT, null frames; detections: jittered GT copies and random boxes, tied scores."""
    rng = np.random.default_rng(seed)
    h, w = 300, 280
    spans = [(4, 60), (130, 200), (262, 280)]  # small, medium, large squares-ish

    def box_track(base=None):
        masks = np.zeros((n_frames, h, w), bool)
        lo, hi = spans[rng.integers(3)]
        for f in range(n_frames):
            if base is not None:
                ys, xs = np.nonzero(base[f])
                if len(ys) == 0 or rng.random() < 0.15:
                    continue
                dy, dx = rng.integers(-6, 7, 2)
                masks[f, max(ys.min() + dy, 0) : ys.max() + 1 + dy, max(xs.min() + dx, 0) : xs.max() + 1 + dx] = True
            elif rng.random() > 0.2:
                bh, bw = rng.integers(lo, hi + 1, 2)
                y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
                masks[f, y0 : y0 + bh, x0 : x0 + bw] = True
        masks[0, :2, :2] |= not masks.any()  # at least one pixel
        return masks

    anns, results, videos = [], [], []
    for v in range(1, n_videos + 1):
        videos.append((v * 3, h, w, n_frames))
        tracks = []
        for _ in range(int(rng.integers(1, 5))):
            masks, cat = box_track(), int(rng.integers(1, 4))
            if tracks and rng.random() < 0.4:  # overlapping GT: detections then compete for two GT
                masks, cat = box_track(tracks[-1][0]), tracks[-1][1]
            a = gt_ann(len(anns) + 1, v * 3, cat, masks, crowd=int(rng.random() < 0.15))
            form = rng.integers(3)
            for f, seg in enumerate(a["segmentations"]):
                if seg and form == 1:
                    a["segmentations"][f] = {"size": [h, w], "counts": _runs(masks[f])}
                elif seg and form == 2:
                    ys, xs = np.nonzero(masks[f])
                    y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
                    a["segmentations"][f] = [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1),
                                              float(x0), float(y1)]]
            if rng.random() < 0.2:
                a["areas"] = [None if x is None else x + 0.5 for x in a["areas"]]
            anns.append(a)
            tracks.append((masks, cat))
        n_dets = 110 if crowded and v == 1 else int(rng.integers(0, 7))
        for _ in range(n_dets):
            if tracks and rng.random() < 0.6:
                base, cat = tracks[rng.integers(len(tracks))]
                masks = box_track(base)
                cat = cat if rng.random() < 0.8 else int(rng.integers(1, 4))
            else:
                masks, cat = box_track(), int(rng.integers(1, 4))
            results.append(det(v * 3, cat, float(rng.choice([0.2, 0.5, 0.8])), masks))
    return dataset(videos, anns, cats=(1, 2, 3)), results


def _runs(mask: np.ndarray) -> list[int]:
    flat = mask.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs


def brute_force(gt: dict, results: list) -> dict[str, float]:
    """The official protocol with plain loops and decoded numpy masks (spec steps 1–7)."""
    vids = {v["id"]: v for v in gt["videos"]}
    vid_ids, cat_ids = sorted(vids), sorted(c["id"] for c in gt["categories"])

    def decode(seg, h, w):
        if not seg:
            return None
        if isinstance(seg, list):
            return mu.decode(mu.merge(mu.frPyObjects(seg, h, w))).astype(bool)
        if isinstance(seg["counts"], list):
            seg = mu.frPyObjects(seg, h, w)
        return mu.decode(seg).astype(bool)

    def mean_truthy(xs):
        xs = [x for x in xs if x]
        return float(np.mean(xs)) if xs else 0.0

    gts, dts = {}, {}
    for a in gt["annotations"]:
        v = vids[a["video_id"]]
        gts.setdefault((a["video_id"], a["category_id"]), []).append(
            {"masks": [decode(s, v["height"], v["width"]) for s in a["segmentations"]], "crowd": a["iscrowd"],
             "area": mean_truthy(a["areas"])})
    for r in results:
        masks = [decode(s, 0, 0) for s in r["segmentations"]]
        dts.setdefault((r["video_id"], r["category_id"]), []).append(
            {"masks": masks, "score": r["score"], "area": mean_truthy([m.sum() if m is not None else None for m in masks])})

    def iou(d, g):
        i = u = 0
        for md, mg in zip(d["masks"], g["masks"], strict=False):
            if md is not None and mg is not None:
                i, u = i + (md & mg).sum(), u + (md | mg).sum()
            elif mg is not None:
                u += mg.sum()
            elif md is not None:
                u += md.sum()
        return i / u if u > 0 else 0.0

    ranges = [(0, 1e10), (0, 128**2), (128**2, 256**2), (256**2, 1e10)]
    thrs = [float(t) for t in IOU_THRS]
    per = {}  # (cat, range, video) -> (scores, tp[t][d], ignored[t][d], n counted GT)
    for c in cat_ids:
        for v in vid_ids:
            g = gts.get((v, c), [])
            d = sorted(dts.get((v, c), []), key=lambda x: -x["score"])[:100]  # sorted() is stable
            ious = [[iou(x, y) for y in g] for x in d]
            for ai, (lo, hi) in enumerate(ranges):
                ig = [bool(x["crowd"]) or not lo <= x["area"] <= hi for x in g]
                order = [j for j in range(len(g)) if not ig[j]] + [j for j in range(len(g)) if ig[j]]
                tp = [[False] * len(d) for _ in thrs]
                dig = [[False] * len(d) for _ in thrs]
                for ti, t in enumerate(thrs):
                    taken = set()
                    for di, x in enumerate(d):
                        best, m = min(t, 1 - 1e-10), None
                        for j in order:
                            if j in taken and not g[j]["crowd"]:
                                continue
                            if m is not None and not ig[m] and ig[j]:
                                break
                            value = ious[di][j]
                            if value >= best:
                                best, m = value, j
                        if m is not None:
                            taken.add(m)
                            tp[ti][di], dig[ti][di] = True, ig[m]
                        else:
                            dig[ti][di] = not lo <= x["area"] <= hi
                per[c, ai, v] = ([x["score"] for x in d], tp, dig, ig.count(False))

    precision = np.full((10, 101, len(cat_ids), 4, 3), -1.0)
    recall = np.full((10, len(cat_ids), 4, 3), -1.0)
    for k, c in enumerate(cat_ids):
        for ai in range(4):
            npig = sum(per[c, ai, v][3] for v in vid_ids)
            if npig == 0:
                continue
            for mi, md in enumerate((1, 10, 100)):
                items = [(per[c, ai, v][0][i], v, i) for v in vid_ids for i in range(min(md, len(per[c, ai, v][0])))]
                items.sort(key=lambda x: -x[0])  # stable: video order, then rank
                for ti in range(10):
                    ntp = nfp = 0
                    rc, pr = [], []
                    for _, v, i in items:
                        if per[c, ai, v][2][ti][i]:
                            continue
                        ntp, nfp = ntp + per[c, ai, v][1][ti][i], nfp + (not per[c, ai, v][1][ti][i])
                        rc.append(ntp / npig)
                        pr.append(ntp / (ntp + nfp + np.spacing(1)))
                    recall[ti, k, ai, mi] = rc[-1] if rc else 0
                    for i in range(len(pr) - 2, -1, -1):
                        pr[i] = max(pr[i], pr[i + 1])
                    for ri, r in enumerate(REC_THRS):
                        hit = [i for i in range(len(rc)) if rc[i] >= r]
                        precision[ti, ri, k, ai, mi] = pr[hit[0]] if hit else 0.0

    def mean(s):
        s = s[s > -1]
        return float(s.mean()) if s.size else -1.0

    p, r = precision, recall
    return dict(zip(STAT_NAMES, [
        mean(p[..., 0, 2]), mean(p[0, ..., 0, 2]), mean(p[5, ..., 0, 2]), mean(p[..., 1, 2]), mean(p[..., 2, 2]),
        mean(p[..., 3, 2]), mean(r[..., 0, 0]), mean(r[..., 0, 1]), mean(r[..., 0, 2]), mean(r[..., 1, 2]),
        mean(r[..., 2, 2]), mean(r[..., 3, 2])], strict=False))


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_cases(seed):
    gt, results = random_case(seed)
    ours, reference = evaluate(gt, results), brute_force(gt, results)
    assert len({r["score"] for r in results}) < len(results)  # ties present
    for key in STAT_NAMES:
        assert ours[key] == pytest.approx(reference[key], abs=1e-12), key


def test_matches_brute_force_beyond_100_detections_per_video_and_category():
    gt, results = random_case(11, n_videos=2, n_frames=2, crowded=True)
    ours, reference = evaluate(gt, results), brute_force(gt, results)
    for key in STAT_NAMES:
        assert ours[key] == pytest.approx(reference[key], abs=1e-12), key


def test_round_trip_results_from_gt_score_perfectly():
    gt, _ = random_case(5, n_videos=5)
    results = []
    for a in [a for a in gt["annotations"] if not a["iscrowd"]]:  # crowd GT: a hit would be ignored anyway
        h, w = 300, 280
        segs = [None if not s else (mu.merge(mu.frPyObjects(s, h, w)) if isinstance(s, list)
                                    else mu.frPyObjects(s, h, w) if isinstance(s["counts"], list) else s)
                for s in a["segmentations"]]
        segs = [s if s is None else {"size": list(s["size"]), "counts": s["counts"] if isinstance(s["counts"], str)
                                     else s["counts"].decode()} for s in segs]
        results.append({"video_id": a["video_id"], "category_id": a["category_id"], "score": 0.5, "segmentations": segs})
    stats = evaluate(gt, results)
    close(stats, AP=1, AP50=1, AP75=1, AR10=1, AR100=1)
    # area ranges: 1 where the range has GT, -1 where it has none (AR1 < 1 with 2 GT per video+class)
    assert all(stats[k] == pytest.approx(1, abs=1e-12) or stats[k] == -1 for k in STAT_NAMES if k != "AR1"), stats
