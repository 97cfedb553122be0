"""Video instance segmentation AP/AR, numerically identical to the official YouTube-VIS evaluation.

The protocol (``ytvis_eval_spec.md``) is COCOeval lifted to videos: a detection is a track, its IoU
with a GT track is Σ_t I_t / Σ_t U_t, area ranges are 128²/256², maxDets are per (video, category).
We reproduce every number of the official code, but not its cost:

* IoU: one ``pycocotools.mask.iou`` call per (video, frame) over all detections and GT present in
  that frame yields I_t for every pair (I = o·(a+b)/(1+o), exact after rounding since I is an
  integer); U needs no mask work at all, U = Σ|d| + Σ|g| − I (absent frames have area 0, which
  is exactly the official "only one present" rule).
* Greedy matching runs once per detection rank, vectorised over (video, category) groups, area
  ranges and IoU thresholds; accumulation is vectorised over thresholds.
* Every results RLE string is validated (pycocotools loops forever on runs that do not sum to
  h·w) by one vectorised decode in cache-sized batches (:func:`vistr.eval_io.rle_string_stats`).

benchmarks/evaluate.py times this against a loop-for-loop transcription of the official code.

Deliberate differences from the official code (which crashes or silently truncates) are those of
the spec: empty results give 0 (or -1), results may be a list, malformed results are refused with
the entry named (``lenient=True`` reproduces the official numbers where it produces any), GT
annotation id 0 is an ordinary id, and missing ``areas``/``iscrowd`` are filled with a warning.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from vistr.eval_io import (
    GroundTruth,
    GroundTruthFormatError,
    ResultsFormatError,
    Tracks,
    encode_track,
    load_ground_truth,
    load_results,
    validate_results,
)

__all__ = ["evaluate", "validate_results", "encode_track", "load_ground_truth", "STAT_NAMES",
           "ResultsFormatError", "GroundTruthFormatError"]

IOU_THRS = np.linspace(0.5, 0.95, 10)
REC_THRS = np.linspace(0.0, 1.0, 101)
MAX_DETS = (1, 10, 100)
AREA_RANGES = ((0.0, 1e10), (0.0, 128.0**2), (128.0**2, 256.0**2), (256.0**2, 1e10))  # all, S, M, L
STAT_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR10", "AR100", "AR_S", "AR_M", "AR_L")


def _outside(avg_area: np.ndarray) -> np.ndarray:
    """[N, A] True where a track's mean area falls outside area range a (ranges inclusive)."""
    lo, hi = np.array(AREA_RANGES).T
    return (avg_area[:, None] < lo) | (avg_area[:, None] > hi)


@functools.lru_cache(maxsize=64)
def _empty_rle_cached(h: int, w: int) -> str:
    return mask_utils.frPyObjects({"size": [h, w], "counts": [h * w]}, h, w)["counts"].decode()


def _empty_rle(h: int, w: int) -> dict:
    """An all-zero compressed RLE (zero bbox, so pycocotools skips it without a run merge)."""
    return {"size": [h, w], "counts": _empty_rle_cached(h, w)}


def _pair_ious(dets: Tracks, di: np.ndarray, gts: Tracks, gi: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """Video IoU [len(di), len(gi)] of detections ``di`` vs GT ``gi`` of one n-frame h×w video.

    Follows ``zip(d, g)`` of the official code: detection frames past ``n`` are ignored, GT frames
    past a short detection list drop out of the union, and a present detection mask whose size is
    not the video's (lenient mode) adds nothing when the GT frame is present and |d| when it isn't.
    """
    nd, ng = len(di), len(gi)
    if dets.area.size == 0:  # lenient mode, every detection list empty: zip() yields nothing
        return np.zeros((nd, ng))
    frame = np.arange(n)
    d_len = np.minimum(np.diff(dets.offset)[di], n)
    d_in = frame < d_len[:, None]
    d_idx = np.where(d_in, dets.offset[di][:, None] + frame, 0)
    ad = np.where(d_in, dets.area[d_idx], 0)
    md = d_in & dets.mismatch[d_idx]
    g_idx = gts.offset[gi][:, None] + frame  # GT lists have exactly n frames
    ag, pg = gts.area[g_idx], gts.present[g_idx]
    ok_d, ok_g = (ad > 0) & ~md, ag > 0
    # Every call gets all detections and all GT, an empty mask standing in for absent frames, so
    # that the per-frame IoU matrices stack into one [frames, D, G] array.
    empty = _empty_rle(h, w)
    d_segs = [[dets.segs[f] if ok else empty for f, ok in zip(row, oks, strict=False)] for row, oks in zip(d_idx.T.tolist(), ok_d.T.tolist(), strict=False)]
    g_segs = [[gts.segs[f] if ok else empty for f, ok in zip(row, oks, strict=False)] for row, oks in zip(g_idx.T.tolist(), ok_g.T.tolist(), strict=False)]
    used = np.flatnonzero(ok_d.any(0) & ok_g.any(0))
    zeros = np.zeros(ng, np.uint8)
    inter = np.zeros((nd, ng))
    if len(used):
        o = np.stack([mask_utils.iou(d_segs[t], g_segs[t], zeros) for t in used.tolist()])
        a_sum = ad.T[used][:, :, None] + ag.T[used][:, None, :]
        inter = np.rint(o * a_sum / (1.0 + o)).sum(0)
    cum_g = np.concatenate([np.zeros((ng, 1), np.int64), np.cumsum(ag, 1)], 1)
    mismatch = (md * ad) @ pg.T.astype(np.int64) + md.astype(np.int64) @ ag.T
    union = ad.sum(1)[:, None] + cum_g[:, d_len].T - inter - mismatch
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _groups(gt: GroundTruth, dets: Tracks):
    """Sort detections by (video, category, -score, file order), keep 100 per group, compute IoUs.

    Returns the kept detections (indices into ``dets``, sorted), their rank and group, the number of
    detections per group, the padded IoU matrix [groups, D, G] and the GT index of each column
    (-1 = padding). GT columns keep file order, as the official ``_gts[v, c]`` lists.
    """
    order = np.lexsort((np.arange(len(dets.score)), -dets.score, dets.category, dets.video))
    key = dets.video[order] * len(gt.cat_ids) + dets.category[order]
    new = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    rank = np.arange(len(key)) - starts[group] if len(key) else np.zeros(0, np.int64)
    keep = rank < MAX_DETS[-1]
    order, rank, group, key = order[keep], rank[keep], group[keep], key[keep]
    n_groups = len(starts)
    gkey = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else np.zeros(0, np.int64)
    g_all = gt.tracks
    gt_key = g_all.video * len(gt.cat_ids) + g_all.category
    gt_order = np.lexsort((np.arange(len(gt_key)), gt_key))
    sk = gt_key[gt_order]
    lo, hi = np.searchsorted(sk, gkey, "left"), np.searchsorted(sk, gkey, "right")
    d_max = int(np.bincount(group).max()) if n_groups else 0  # ≤ 100
    g_max = max(1, int((hi - lo).max())) if n_groups else 1
    ious = np.full((n_groups, d_max, g_max), -1.0)
    gt_cols = np.full((n_groups, g_max), -1, np.int64)
    for j in range(n_groups):
        gt_cols[j, : hi[j] - lo[j]] = gt_order[lo[j] : hi[j]]
    n_dets = np.bincount(group, minlength=n_groups)
    det_start = np.concatenate([[0], np.cumsum(n_dets)])
    gvideo = gkey // len(gt.cat_ids)
    bounds = np.flatnonzero(np.r_[True, gvideo[1:] != gvideo[:-1], True]) if n_groups else [0]
    for b0, b1 in zip(bounds[:-1], bounds[1:], strict=False):  # the groups of one video
        gs = [j for j in range(b0, b1) if hi[j] > lo[j]]
        if not gs:
            continue
        d_idx = np.concatenate([np.arange(det_start[j], det_start[j + 1]) for j in gs])
        g_idx = np.concatenate([gt_order[lo[j] : hi[j]] for j in gs])
        v = gvideo[b0]
        m = _pair_ious(dets, order[d_idx], g_all, g_idx, int(gt.lengths[v]), int(gt.heights[v]), int(gt.widths[v]))
        r0 = c0 = 0
        for j in gs:
            nd, ng = n_dets[j], hi[j] - lo[j]
            ious[j, :nd, :ng] = m[r0 : r0 + nd, c0 : c0 + ng]
            r0, c0 = r0 + nd, c0 + ng
    return order, rank, group, n_dets, ious, gt_cols


def _match(ious: np.ndarray, gt_cols: np.ndarray, gts: Tracks, det_out: np.ndarray, n_dets: np.ndarray):
    """Official greedy matching, all groups × area ranges × thresholds at once, one rank at a time.

    For each detection (score order) the candidate GT are those not yet matched (crowd GT always
    are) with IoU ≥ min(t, 1-1e-10); non-ignored candidates win over ignored ones (the official loop
    stops at the first ignored GT once it holds a non-ignored match), and among equals the last GT
    in file order wins (the official ``>=`` update). Returns matched, ignored: [groups, D, A, T].
    """
    n_groups, d_max, g_max = ious.shape
    valid = gt_cols >= 0
    col = np.where(valid, gt_cols, 0)
    has_gt = len(gts.crowd) > 0
    crowd = (gts.crowd[col] if has_gt else np.zeros(col.shape, bool)) & valid
    area = gts.avg_area[col] if has_gt else np.zeros(col.shape)
    gt_ig = (_outside(area.ravel()).reshape(n_groups, g_max, len(AREA_RANGES)).transpose(0, 2, 1)
             | crowd[:, None, :] | ~valid[:, None, :])  # [groups, A, G]
    thr = np.minimum(IOU_THRS, 1 - 1e-10)[None, None, :, None]
    n_a, n_t = gt_ig.shape[1], len(IOU_THRS)
    taken = np.zeros((n_groups, n_a, n_t, g_max), bool)
    matched = np.zeros((n_groups, d_max, n_a, n_t), bool)
    ignored = np.zeros_like(matched)
    for r in range(d_max):
        act = np.flatnonzero(n_dets > r)
        iou = ious[act, r][:, None, None, :]
        ig = gt_ig[act][:, :, None, :]
        elig = (~taken[act] | crowd[act][:, None, None, :]) & (iou >= thr)
        prefer = elig & ~ig
        use = np.where(prefer.any(-1, keepdims=True), prefer, elig)
        vals = np.where(use, iou, -np.inf)
        best = use & (vals == vals.max(-1, keepdims=True))
        m = g_max - 1 - np.argmax(best[..., ::-1], axis=-1)
        ok = use.any(-1)
        m_ig = np.take_along_axis(np.broadcast_to(ig, use.shape), m[..., None], -1)[..., 0]
        matched[act, r] = ok
        ignored[act, r] = np.where(ok, m_ig, det_out[act, r][:, :, None])
        gi, ai, ti = np.nonzero(ok)
        taken[act[gi], ai, ti, m[gi, ai, ti]] = True
    return matched, ignored


def _accumulate(tp: np.ndarray, fp: np.ndarray, cat: np.ndarray, rank: np.ndarray, score: np.ndarray,
                npig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Official COCOeval.accumulate: precision [T,R,K,A,M] and recall [T,K,A,M], -1 where no GT.

    ``tp``/``fp`` [N, A, T] per kept detection, detections in (video, rank) order within a category.
    """
    n_t, n_r, (n_k, n_a), n_m = len(IOU_THRS), len(REC_THRS), npig.shape, len(MAX_DETS)
    precision = -np.ones((n_t, n_r, n_k, n_a, n_m))
    recall = -np.ones((n_t, n_k, n_a, n_m))
    for k in range(n_k):
        in_k = np.flatnonzero(cat == k)
        for mi, max_det in enumerate(MAX_DETS):
            sel = in_k[rank[in_k] < max_det]
            sel = sel[np.argsort(-score[sel], kind="mergesort")]
            tp_sum = np.cumsum(tp[sel], axis=0).astype(np.float64)
            fp_sum = np.cumsum(fp[sel], axis=0).astype(np.float64)
            nd = len(sel)
            for a in np.flatnonzero(npig[k]):
                tps, fps = tp_sum[:, a].T, fp_sum[:, a].T  # [T, nd]
                rc = tps / npig[k, a]
                pr = tps / (fps + tps + np.spacing(1))
                recall[:, k, a, mi] = rc[:, -1] if nd else 0
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                for t in range(n_t):
                    inds = np.searchsorted(rc[t], REC_THRS, side="left")
                    inside = inds < nd
                    precision[t, inside, k, a, mi] = pr[t, inds[inside]]
                    precision[t, ~inside, k, a, mi] = 0.0
    return precision, recall


def _summarize(precision: np.ndarray, recall: np.ndarray) -> dict[str, float]:
    """The 12 official stats; each is the mean of the entries > -1 of its slice, -1 if none."""

    def stat(ap: bool, thr: float | None = None, area: int = 0, max_det: int = 100) -> float:
        s = precision if ap else recall
        if thr is not None:
            s = s[np.where(thr == IOU_THRS)[0]]
        m = MAX_DETS.index(max_det)
        s = s[:, :, :, [area], [m]] if ap else s[:, :, [area], [m]]
        return float(np.mean(s[s > -1])) if np.any(s > -1) else -1.0

    values = [stat(True), stat(True, 0.5), stat(True, 0.75), stat(True, area=1), stat(True, area=2),
              stat(True, area=3), stat(False, max_det=1), stat(False, max_det=10), stat(False),
              stat(False, area=1), stat(False, area=2), stat(False, area=3)]
    return dict(zip(STAT_NAMES, values, strict=False))


def evaluate(gt: str | Path | dict | GroundTruth, results: str | Path | list, lenient: bool = False) -> dict[str, float]:
    """AP/AR of ``results`` (YouTube-VIS results list or JSON path) against ``gt`` (dict, path or
    :class:`GroundTruth`), as the 12 official stats in the official order."""
    # The inputs hold ~10⁵ containers and evaluation allocates many short-lived lists: cyclic-GC
    # passes over the inputs would cost about as much as the evaluation itself.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _evaluate(gt, results, lenient)
    finally:
        if was_enabled:
            gc.enable()


def _evaluate(gt: str | Path | dict | GroundTruth, results: str | Path | list, lenient: bool) -> dict[str, float]:
    gt = gt if isinstance(gt, GroundTruth) else load_ground_truth(gt)
    dets = load_results(results, gt, lenient)
    order, rank, group, n_dets, ious, gt_cols = _groups(gt, dets)
    det_out = np.zeros((len(ious), ious.shape[1], len(AREA_RANGES)), bool)
    det_out[group, rank] = _outside(dets.avg_area[order])
    matched, ignored = _match(ious, gt_cols, gt.tracks, det_out, n_dets)
    matched, ignored = matched[group, rank], ignored[group, rank]  # [N, A, T] per kept detection
    g = gt.tracks
    counted = ~_outside(g.avg_area) & ~g.crowd[:, None]
    npig = np.zeros((len(gt.cat_ids), len(AREA_RANGES)), np.int64)
    np.add.at(npig, g.category, counted.astype(np.int64))
    precision, recall = _accumulate(matched & ~ignored, ~matched & ~ignored, dets.category[order], rank,
                                    dets.score[order], npig)
    return _summarize(precision, recall)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, type=Path, help="YouTube-VIS ground-truth JSON")
    parser.add_argument("--results", required=True, type=Path, help="YouTube-VIS results JSON")
    parser.add_argument("--json", action="store_true", help="print the 12 stats as one JSON object")
    parser.add_argument("--lenient", action="store_true",
                        help="accept results the official code accepts (wrong frame counts or mask sizes, "
                             "unknown videos) and reproduce its numbers instead of refusing the file")


_LABELS = {"AP": "IoU=0.50:0.95 area=all", "AP50": "IoU=0.50", "AP75": "IoU=0.75", "AP_S": "area=small",
           "AP_M": "area=medium", "AP_L": "area=large", "AR1": "maxDets=1", "AR10": "maxDets=10",
           "AR100": "maxDets=100", "AR_S": "area=small", "AR_M": "area=medium", "AR_L": "area=large"}


def run(args: argparse.Namespace) -> int:
    try:
        stats = evaluate(args.gt, args.results, lenient=args.lenient)
    except (ResultsFormatError, GroundTruthFormatError, FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(stats))
    else:
        for name, value in stats.items():
            print(f"{name:<6} {_LABELS[name]:<24} {value:8.4f}")
    return 0
