"""Speed of ``vistr.evaluation.evaluate`` against a naive re-implementation of the official code.

The case is the issue's: 300 videos × 36 frames of 100×180 px, 5 GT tracks (moving ellipses) and 10
predictions per video (jittered copies of the GT, some with a wrong class or missing frames, plus
false positives), once over 40 categories and once with everything in one category (every
prediction then meets every GT of its video, which is what makes the official code slow).

``official_style`` below is a straightforward transcription of the official algorithm
(ytvoseval.py: per-pair, per-frame ``mask.merge`` IoU, per-detection greedy loop, per-slice
accumulation), written from the spec; both must give identical stats. Writes
benchmarks/results/evaluate.json and prints a table.

    python benchmarks/evaluate.py [--videos 300] [--repeat 1]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
from pycocotools import mask as mu

from benchmarks.common import add_provenance_arguments, require_clean_tree, write_results
from vistr.evaluation import REC_THRS, STAT_NAMES, encode_track, evaluate

H, W, T = 100, 180, 36
GRID_Y, GRID_X = np.mgrid[0:H, 0:W]


def ellipse_track(rng: np.random.Generator, jitter_of: tuple | None = None) -> tuple[np.ndarray, tuple]:
    """A [T,H,W] moving ellipse; with ``jitter_of`` a noisy copy of that ellipse's parameters."""
    if jitter_of is None:
        params = (rng.uniform(15, 85), rng.uniform(20, 160), rng.uniform(6, 30), rng.uniform(8, 45),
                  *rng.normal(0, 1.2, 2))
    else:
        params = tuple(p + rng.normal(0, s) for p, s in zip(jitter_of, (2, 3, 2, 3, 0.05, 0.05), strict=False))
    cy, cx, ry, rx, vy, vx = params
    t = np.arange(T)[:, None, None]
    masks = ((GRID_Y - cy - vy * t) / max(ry, 2)) ** 2 + ((GRID_X - cx - vx * t) / max(rx, 2)) ** 2 <= 1
    return masks, params


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths, the way YouTube-VIS ground truth stores masks."""
    flat = mask.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": [H, W], "counts": ([0] + counts) if flat[0] else counts}


def make_case(n_videos: int, seed: int = 0) -> tuple[dict, list]:
    rng = np.random.default_rng(seed)
    videos, anns, results = [], [], []
    for v in range(1, n_videos + 1):
        videos.append({"id": v, "height": H, "width": W, "length": T,
                       "file_names": [f"{v}/{t:05d}.jpg" for t in range(T)]})
        gts = []
        for _ in range(5):
            masks, params = ellipse_track(rng)
            start, stop = sorted(rng.integers(0, T + 1, 2)) if rng.random() < 0.3 else (0, T)
            present = (np.arange(T) >= start) & (np.arange(T) < max(stop, start + 1)) & masks.any((1, 2))
            cat = int(rng.integers(1, 41))
            segs = [uncompressed_rle(m) if p else None for m, p in zip(masks, present, strict=False)]
            anns.append({"id": len(anns) + 1, "video_id": v, "category_id": cat, "iscrowd": int(rng.random() < 0.03),
                         "areas": [int(m.sum()) if p else None for m, p in zip(masks, present, strict=False)],
                         "segmentations": segs, "bboxes": [None] * T, "height": H, "width": W, "length": T})
            gts.append((params, present, cat))
        for k in range(10):
            if k < 7:
                params, present, cat = gts[k % 5]
                masks, _ = ellipse_track(rng, params)
                present = present & (rng.random(T) > 0.05)
                cat = cat if rng.random() < 0.8 else int(rng.integers(1, 41))
            else:
                masks, _ = ellipse_track(rng)
                present, cat = np.ones(T, bool), int(rng.integers(1, 41))
            results.append({"video_id": v, "category_id": cat, "score": float(rng.random()),
                            "segmentations": encode_track(masks, present)})
    gt = {"videos": videos, "annotations": anns,
          "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in range(1, 41)]}
    return gt, results


def one_category(gt: dict, results: list) -> tuple[dict, list]:
    gt = {**gt, "annotations": [{**a, "category_id": 1} for a in gt["annotations"]],
          "categories": gt["categories"][:1]}
    return gt, [{**r, "category_id": 1} for r in results]


def official_style(gt: dict, results: list) -> dict[str, float]:
    """The official algorithm, loop for loop (loadRes, _prepare, computeIoU, evaluateVid, accumulate)."""
    vids = {v["id"]: v for v in gt["videos"]}
    vid_ids, cat_ids = sorted(vids), sorted(c["id"] for c in gt["categories"])
    gts, dts = {}, {}
    for ann in gt["annotations"]:
        v = vids[ann["video_id"]]
        segs = []
        for s in ann["segmentations"]:
            if s and isinstance(s["counts"], list):
                s = mu.frPyObjects(s, v["height"], v["width"])
            segs.append(s if s else None)
        kept = [a for a in ann["areas"] if a]
        gts.setdefault((ann["video_id"], ann["category_id"]), []).append(
            {"id": ann["id"], "segs": segs, "crowd": ann["iscrowd"], "avg": np.array(kept).mean() if kept else 0})
    for i, r in enumerate(results):  # loadRes: area and bbox of every frame
        areas = [mu.area(s) if s else None for s in r["segmentations"]]
        r["bboxes"] = [mu.toBbox(s) if s else None for s in r["segmentations"]]
        kept = [a for a in areas if a]
        if r["category_id"] in cat_ids:
            dts.setdefault((r["video_id"], r["category_id"]), []).append(
                {"id": i + 1, "segs": r["segmentations"], "score": r["score"], "avg": np.array(kept).mean() if kept else 0})

    def iou_seq(ds, gs):
        i = u = 0.0
        for d, g in zip(ds, gs, strict=False):
            if d and g:
                i += mu.area(mu.merge([d, g], True))
                u += mu.area(mu.merge([d, g], False))
            elif g:
                u += mu.area(g)
            elif d:
                u += mu.area(d)
        return i / u if u > 0 else 0.0

    ious = {}
    for v in vid_ids:  # computeIoU for every (video, category), as the official evaluate() does
        for c in cat_ids:
            dt, g = dts.get((v, c), []), gts.get((v, c), [])
            if not dt and not g:
                ious[v, c] = []
                continue
            dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")][:100]
            ious[v, c] = np.array([[iou_seq(d["segs"], x["segs"]) for x in g] for d in dt]).reshape(len(dt), len(g))
    thrs = np.linspace(0.5, 0.95, 10)
    ranges = [[0, 1e10], [0, 128**2], [128**2, 256**2], [256**2, 1e10]]
    evals = {}
    for c in cat_ids:
        for a, rng_ in enumerate(ranges):
            for v in vid_ids:
                g, d = gts.get((v, c), []), dts.get((v, c), [])
                if not g and not d:
                    continue
                g_ig = [int(x["crowd"] or x["avg"] < rng_[0] or x["avg"] > rng_[1]) for x in g]
                gind = np.argsort(g_ig, kind="mergesort")
                g, g_ig = [g[i] for i in gind], [g_ig[i] for i in gind]
                d = [d[i] for i in np.argsort([-x["score"] for x in d], kind="mergesort")][:100]
                iou = ious[v, c][:, gind] if len(ious[v, c]) and len(g) else np.zeros((len(d), 0))
                gtm, dtm, dt_ig = np.zeros((10, len(g))), np.zeros((10, len(d))), np.zeros((10, len(d)))
                for ti, t in enumerate(thrs):
                    for di in range(len(d)):
                        best, m = min(t, 1 - 1e-10), -1
                        for gi in range(len(g)):
                            if gtm[ti, gi] > 0 and not g[gi]["crowd"]:
                                continue
                            if m > -1 and g_ig[m] == 0 and g_ig[gi] == 1:
                                break
                            if iou[di, gi] < best:
                                continue
                            best, m = iou[di, gi], gi
                        if m > -1:
                            dt_ig[ti, di], dtm[ti, di], gtm[ti, m] = g_ig[m], g[m]["id"], d[di]["id"]
                out = np.array([x["avg"] < rng_[0] or x["avg"] > rng_[1] for x in d]).reshape(1, -1)
                dt_ig = np.logical_or(dt_ig, np.logical_and(dtm == 0, np.repeat(out, 10, 0)))
                evals[c, a, v] = ([x["score"] for x in d], dtm, dt_ig, np.array(g_ig))
    precision, recall = -np.ones((10, 101, len(cat_ids), 4, 3)), -np.ones((10, len(cat_ids), 4, 3))
    for k, c in enumerate(cat_ids):
        for a in range(4):
            for mi, md in enumerate((1, 10, 100)):
                es = [evals.get((c, a, v)) for v in vid_ids]  # None where the official evaluateVid is None
                es = [e for e in es if e is not None]
                if not es:
                    continue
                scores = np.concatenate([e[0][:md] for e in es])
                inds = np.argsort(-scores, kind="mergesort")
                dtm = np.concatenate([e[1][:, :md] for e in es], axis=1)[:, inds]
                dt_ig = np.concatenate([e[2][:, :md] for e in es], axis=1)[:, inds]
                npig = np.count_nonzero(np.concatenate([e[3] for e in es]) == 0)
                if npig == 0:
                    continue
                tps = np.cumsum(np.logical_and(dtm, ~dt_ig), axis=1).astype(float)
                fps = np.cumsum(np.logical_and(~dtm.astype(bool), ~dt_ig), axis=1).astype(float)
                for t in range(10):
                    tp, fp, nd = tps[t], fps[t], len(tps[t])
                    rc, pr = tp / npig, (tp / (fp + tp + np.spacing(1))).tolist()
                    recall[t, k, a, mi] = rc[-1] if nd else 0
                    for i in range(nd - 1, 0, -1):
                        pr[i - 1] = max(pr[i - 1], pr[i])
                    q = [pr[i] if i < nd else 0.0 for i in np.searchsorted(rc, REC_THRS, side="left")]
                    precision[t, :, k, a, mi] = q

    def stat(s, thr=None, a=0, m=2):
        if thr is not None:
            s = s[np.where(thr == thrs)[0]]
        s = s[..., [a], [m]]
        return float(np.mean(s[s > -1])) if np.any(s > -1) else -1.0

    p, r = precision, recall
    vals = [stat(p), stat(p, 0.5), stat(p, 0.75), stat(p, a=1), stat(p, a=2), stat(p, a=3),
            stat(r, m=0), stat(r, m=1), stat(r), stat(r, a=1), stat(r, a=2), stat(r, a=3)]
    return dict(zip(STAT_NAMES, vals, strict=False))


def timed(fn, *args, repeat: int = 1) -> tuple[float, float, dict]:
    """Best wall and best CPU seconds of ``repeat`` runs on fresh copies (the official code mutates
    its inputs). CPU time is the steadier number when other processes share the cores."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        fresh = copy.deepcopy(args)
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*fresh)
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="report the best of N runs (the CPU may be shared)")
    parser.add_argument("--skip-official", action="store_true")
    add_provenance_arguments(parser)
    args = parser.parse_args()
    require_clean_tree(args.allow_dirty)
    gt40, res40 = make_case(args.videos)
    rows = []
    for name, (gt, res) in {"40 categories": (gt40, res40), "1 category": one_category(gt40, res40)}.items():
        ours_s, ours_cpu, ours = timed(evaluate, gt, res, repeat=args.repeat)
        row = {"case": name, "ours_s": round(ours_s, 3), "ours_cpu_s": round(ours_cpu, 3), "stats": ours}
        if not args.skip_official:
            off_s, off_cpu, off = timed(official_style, gt, res, repeat=args.repeat)
            row |= {"official_style_s": round(off_s, 3), "official_style_cpu_s": round(off_cpu, 3),
                    "speedup": round(off_s / ours_s, 2), "speedup_cpu": round(off_cpu / ours_cpu, 2),
                    "identical": all(ours[k] == off[k] for k in STAT_NAMES),
                    "max_abs_diff": max(abs(ours[k] - off[k]) for k in STAT_NAMES)}
        rows.append(row)
    out = write_results("evaluate", rows, {"videos": args.videos, "frames": T, "frame_size": [H, W],
                                           "gt_per_video": 5, "predictions_per_video": 10, "repeat": args.repeat})
    nan = float("nan")
    print(f"{'case':<15} {'ours wall/cpu [s]':>18} {'official-style wall/cpu [s]':>28} {'speedup wall/cpu':>17} "
          f"{'identical':>10}  AP")
    for r in rows:
        print(f"{r['case']:<15} {r['ours_s']:>9.3f}/{r['ours_cpu_s']:<8.3f} "
              f"{r.get('official_style_s', nan):>19.3f}/{r.get('official_style_cpu_s', nan):<8.3f} "
              f"{r.get('speedup', nan):>8.2f}/{r.get('speedup_cpu', nan):<8.2f} {str(r.get('identical', '-')):>10}  "
              f"{r['stats']['AP']:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
