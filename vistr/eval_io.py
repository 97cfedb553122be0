"""Reading and validating YouTube-VIS ground truth and results for :mod:`vistr.evaluation`.

Everything here turns JSON into flat per-track records whose per-frame masks are compressed
RLE dicts (``counts`` as ``str``) plus per-frame pixel areas. The areas and the validity of every
RLE string come from one vectorised decode of all strings at once (:func:`rle_string_stats`): the
official code never checks RLE strings, and pycocotools reads past buffers on malformed ones, so a
bad results file must be caught here, with the offending entry named.
"""

from __future__ import annotations

import json
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


class ResultsFormatError(ValueError):
    """A results file that the evaluator refuses; the message names each offending entry."""


class GroundTruthFormatError(ValueError):
    """A ground-truth file that is not well-formed YouTube-VIS."""


class EvaluationWarning(UserWarning):
    """Input the evaluator accepts but treats differently from a literal reading."""


@dataclass
class Tracks:
    """Instance tracks (GT annotations or detections) in file order, frames stored flat.

    Track i owns flat frames ``offset[i]:offset[i+1]``; ``segs[f]`` is a compressed RLE dict
    (``counts`` str) or ``None`` for an absent frame, ``area[f]`` its pixel count (0 when absent),
    ``mismatch[f]`` marks a present mask whose size is not the video's (lenient mode only).
    """

    video: np.ndarray  # int: index into GroundTruth.video_ids
    category: np.ndarray  # int: index into GroundTruth.cat_ids
    score: np.ndarray  # float: detection score (0 for GT)
    crowd: np.ndarray  # bool: iscrowd (False for detections)
    avg_area: np.ndarray  # float: official avg_area, mean of the truthy per-frame areas, 0 if none
    offset: np.ndarray  # int [N+1]
    segs: list[dict | None]
    area: np.ndarray  # int [frames]
    present: np.ndarray  # bool [frames]
    mismatch: np.ndarray  # bool [frames]


@dataclass
class GroundTruth:
    video_ids: list[int]  # sorted, as the official Params.vidIds
    heights: np.ndarray
    widths: np.ndarray
    lengths: np.ndarray  # frames per video
    cat_ids: list[int]  # sorted, as the official Params.catIds
    tracks: Tracks


def _load_json(source: str | Path | Any, what: str) -> Any:
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        with path.open() as f:
            return json.load(f)
    return source


def rle_string_stats(strings: list[str], pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode many compressed-RLE ``counts`` strings at once; return (valid, area) per string.

    Why vectorised: a Python-level decode per frame would cost more than the whole evaluation, and
    pycocotools has no validating decoder. The format is pycocotools' (``rleFrString``): each value
    is little-endian 5-bit groups stored as ``chr(48 + group | 0x20 if more follow)``, sign-extended
    from bit 4 of its last group; run m > 2 is stored as a delta to run m-2. A string is valid when
    its chars are in range, no value spans strings or has more than 7 groups, and its runs sum to
    h·w (``pixels``). Runs are never materialised: with L values x_j, Σ runs = x_0 + Σ_{j≥1} x_j·w_j, where
    w_j = ⌊(L-1-j)/2⌋ + 1 counts the later runs of j's parity that include x_j; the area sums the
    odd j only.
    """
    # Batches of ~64k chars keep every temporary in L2 cache: ~3x faster than one pass over all.
    chars = np.cumsum(np.fromiter(map(len, strings), np.int64, len(strings)))
    cuts = np.unique(np.searchsorted(chars, np.arange(1, chars[-1] // 65536 + 1) * 65536)) if len(strings) else []
    edges = [0, *[int(c) for c in cuts if 0 < c < len(strings)], len(strings)]
    parts = [_rle_stats_vectorized(strings[a:b], pixels[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    stats = None if any(p is None for p in parts) else (
        np.concatenate([p[0] for p in parts] or [np.zeros(0, bool)]),
        np.concatenate([p[1] for p in parts] or [np.zeros(0, np.int64)]))
    if stats is None:  # some string is garbage: find which, one by one (error path only)
        stats = [_rle_stats_vectorized([s], pixels[i : i + 1]) for i, s in enumerate(strings)]
        valid = np.array([st is not None and bool(st[0][0]) for st in stats], bool)
        area = np.array([st[1][0] if st is not None else 0 for st in stats], np.int64)
        return valid, area
    return stats


def _rle_stats_vectorized(strings: list[str], pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(valid, area) as described in :func:`rle_string_stats`; None on any char-level problem."""
    n = len(strings)
    lens = np.fromiter(map(len, strings), np.int64, n)
    str_end = np.cumsum(lens)
    try:
        c = np.frombuffer("".join(strings).encode("ascii"), np.uint8) - np.uint8(48)
    except UnicodeEncodeError:
        return None
    if c.size == 0:
        return pixels == 0, np.zeros(n, np.int64)
    is_end = (c & 32) == 0
    if (c > 63).any() or not is_end[str_end[lens > 0] - 1].all():
        return None
    end_pos = np.flatnonzero(is_end).astype(np.int32)
    start = np.empty_like(end_pos)
    start[0], start[1:] = 0, end_pos[:-1] + 1
    extra = end_pos - start  # groups after the first
    longest = int(extra.max())
    if longest >= 7:
        return None
    # group values, the last group of each value read as signed 5-bit (bit 4 = sign)
    group = (c & 31).astype(np.int16) - 32 * ((c & 48) == 16)
    x = group[start].astype(np.int64)
    sel = np.flatnonzero(extra)
    for j in range(1, longest + 1):
        sel = sel[extra[sel] >= j]
        x[sel] += group[start[sel] + j].astype(np.int64) << (5 * j)
    per_str = np.diff(np.concatenate([[0], np.cumsum(is_end, dtype=np.int32)[str_end[lens > 0] - 1]]))
    if len(per_str) < n:  # empty strings own no values
        full = np.zeros(n, np.int32)
        full[lens > 0] = per_str
        per_str = full
    bounds = np.concatenate([[0], np.cumsum(per_str)]).astype(np.int32)
    first = bounds[:-1]
    # q = values after this one in its string; m = L-1-q is the value's index in the string
    q = np.repeat(bounds[1:] - 1, per_str) - np.arange(end_pos.size, dtype=np.int32)
    w = (q >> 1) + 1
    w[first[per_str > 0]] = 1
    xw = x * w
    total = np.diff(np.concatenate([[0], np.cumsum(xw)])[bounds])
    odd = ((np.repeat(per_str, per_str) - q) & 1) == 0  # m = L-1-q odd
    area = np.diff(np.concatenate([[0], np.cumsum(np.where(odd, xw, 0))])[bounds])
    return total == pixels, area


def _gt_frames_to_rle(frames: list, h: int, w: int) -> tuple[list, list]:
    """One GT track's frames (polygons, uncompressed or compressed RLE, falsy) as compressed RLE
    dicts or None, as the official ``annToRLE`` converts them (polygons/uncompressed at the video's
    h, w), plus each frame's area where the uncompressed runs already give it (else None).
    Uncompressed frames, YouTube-VIS's GT format, go through one ``frPyObjects`` call per track."""
    out = [None if not seg else seg for seg in frames]
    known: list[int | None] = [None] * len(out)
    plain = [t for t, seg in enumerate(out) if isinstance(seg, dict) and isinstance(seg.get("counts"), list)]
    for t in plain:
        runs = out[t]["counts"]
        if sum(runs) != h * w:
            raise GroundTruthFormatError(f"frame {t}: uncompressed RLE runs must sum to h·w = {h * w}")
        known[t] = sum(runs[1::2])
    if plain:
        try:
            rles = mask_utils.frPyObjects([out[t] for t in plain], h, w)
        except (OverflowError, ValueError, TypeError) as err:
            raise GroundTruthFormatError(f"uncompressed RLE runs must be non-negative integers ({err})") from None
        for t, rle in zip(plain, rles, strict=True):
            out[t] = {"size": [h, w], "counts": rle["counts"].decode()}
    for t, seg in enumerate(out):
        if isinstance(seg, list):
            try:
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            except (TypeError, ValueError, IndexError) as err:
                raise GroundTruthFormatError(f"frame {t}: bad polygon ({err})") from None
            out[t] = {"size": [h, w], "counts": rle["counts"].decode()}
    return out, known


def _mean_truthy(values: list) -> float:
    """Official ``avg_area``: mean of the truthy entries (None and 0 dropped), 0 if none."""
    kept = [a for a in values if a]
    return float(np.array(kept).mean()) if kept else 0.0


def _flat_frames(tracks: list[list], hw: np.ndarray, name, error_cls: type, lenient: bool,
                 known: list[list] | None = None):
    """Validate every frame of every track and flatten them: (offset, segs, area, present, mismatch).

    ``hw[i]`` is the (h, w) of track i's video; ``name(i, t)`` names frame t of track i in errors;
    ``known[i][t]``, where not None, is the already validated area of that frame.
    Structure is checked with list comprehensions and all RLE strings are checked and measured in
    one :func:`rle_string_stats` call: per-frame Python work would dominate the evaluation.
    """
    lengths = np.fromiter(map(len, tracks), np.int64, len(tracks))
    offset = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    segs = [seg if seg else None for frames in tracks for seg in frames]
    pos = [f for f, seg in enumerate(segs) if seg is not None]
    owner = np.repeat(np.arange(len(tracks)), lengths)[pos]

    def where(j: int) -> str:
        return name(int(owner[j]), pos[j] - int(offset[owner[j]]))

    problems = []
    strings, sizes = [], np.zeros((0, 2), np.int64)
    try:
        strings = [segs[f]["counts"] for f in pos]
        sizes = np.array([segs[f]["size"] for f in pos], np.int64).reshape(len(pos), 2)
    except (TypeError, KeyError, ValueError, IndexError):
        for j, f in enumerate(pos):
            seg = segs[f]
            if not (isinstance(seg, dict) and "counts" in seg and isinstance(seg.get("size"), list | tuple)
                    and len(seg["size"]) == 2 and all(isinstance(x, numbers.Integral) for x in seg["size"])):
                problems.append(f"{where(j)}: expected null or a compressed RLE {{'size': [h, w], 'counts': str}}")
        raise error_cls("\n".join(problems[:10]) or "malformed segmentations") from None
    for j in [j for j, c in enumerate(strings) if type(c) is not str]:
        if isinstance(strings[j], bytes):  # pycocotools' own output, accepted from Python callers
            strings[j] = strings[j].decode("ascii", "replace")
            segs[pos[j]] = {"size": segs[pos[j]]["size"], "counts": strings[j]}
        else:
            problems.append(f"{where(j)}: RLE counts must be a compressed string, got {type(strings[j]).__name__}")
    mismatch = np.any(sizes != hw[owner], axis=1) if pos else np.zeros(0, bool)
    if not lenient:
        problems += [f"{where(j)}: mask size {sizes[j].tolist()} differs from the video size {hw[owner[j]].tolist()}"
                     for j in np.flatnonzero(mismatch)[:10]]
    if not problems:
        flat_known = [a for frames in known for a in frames] if known is not None else [None] * len(segs)
        todo = [j for j, f in enumerate(pos) if flat_known[f] is None]
        area = np.array([flat_known[f] or 0 for f in pos], np.int64)
        valid, area[todo] = rle_string_stats([strings[j] for j in todo], (sizes[:, 0] * sizes[:, 1])[todo])
        problems += [f"{where(todo[j])}: invalid compressed RLE (counts {strings[todo[j]][:40]!r})"
                     for j in np.flatnonzero(~valid)]
    if problems:
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise error_cls("\n".join(problems[:10]) + more)
    flat_area, present, flat_mismatch = np.zeros(len(segs), np.int64), np.zeros(len(segs), bool), np.zeros(len(segs), bool)
    flat_area[pos], present[pos], flat_mismatch[pos] = area, True, mismatch
    return offset, segs, flat_area, present, flat_mismatch


def _avg_of_nonzero(area: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Per-track mean of the nonzero frame areas, 0 if none (exact: areas are integers)."""
    total = np.diff(np.concatenate([[0], np.cumsum(area)])[offset])
    count = np.diff(np.concatenate([[0], np.cumsum(area > 0)])[offset])
    return np.divide(total, count, out=np.zeros(len(total)), where=count > 0)


def load_ground_truth(source: str | Path | dict) -> GroundTruth:
    """Parse a YouTube-VIS GT file/dict; errors name the annotation index and id.

    Annotations of categories not listed in ``categories`` are dropped, as the official code does.
    """
    data = _load_json(source, "ground-truth")
    if not isinstance(data, dict) or not {"videos", "annotations", "categories"} <= data.keys():
        raise GroundTruthFormatError("ground truth must be a dict with 'videos', 'annotations', 'categories'")
    videos = {v["id"]: v for v in data["videos"]}
    video_ids = sorted(videos)
    vindex = {vid: i for i, vid in enumerate(video_ids)}
    cat_ids = sorted({c["id"] for c in data["categories"]})
    cindex = {cid: i for i, cid in enumerate(cat_ids)}
    anns = [a for a in data["annotations"] if a.get("category_id") in cindex]
    lengths = np.array([videos[v].get("length") or len(videos[v].get("file_names") or []) for v in video_ids], np.int64)
    heights = np.array([videos[v]["height"] for v in video_ids], np.int64)
    widths = np.array([videos[v]["width"] for v in video_ids], np.int64)
    missing = {"iscrowd": 0, "areas": 0}
    tracks, known = [], []
    for i, ann in enumerate(anns):
        where = f"GT annotation #{i} (id {ann.get('id')}, video_id {ann.get('video_id')})"
        if ann.get("video_id") not in vindex:
            raise GroundTruthFormatError(f"{where}: video_id not among the GT videos")
        v = vindex[ann["video_id"]]
        frames = ann.get("segmentations")
        if not isinstance(frames, list):
            raise GroundTruthFormatError(f"{where}: 'segmentations' must be a list")
        lengths[v] = lengths[v] or len(frames)
        if len(frames) != lengths[v]:
            raise GroundTruthFormatError(f"{where}: {len(frames)} segmentations for a {lengths[v]}-frame video")
        try:
            converted, areas = _gt_frames_to_rle(frames, int(heights[v]), int(widths[v]))
        except GroundTruthFormatError as err:
            raise GroundTruthFormatError(f"{where}: {err}") from None
        tracks.append(converted)
        known.append(areas)
        missing["iscrowd"] += "iscrowd" not in ann
        missing["areas"] += "areas" not in ann
    for key, count in missing.items():
        if count:
            what = "iscrowd=0 assumed" if key == "iscrowd" else "areas computed from the masks"
            warnings.warn(f"{count} GT annotations lack '{key}' ({what}; the official code raises KeyError)",
                          EvaluationWarning, stacklevel=2)
    video = np.array([vindex[a["video_id"]] for a in anns], np.int64)
    hw = np.stack([heights[video], widths[video]], 1) if anns else np.zeros((0, 2), np.int64)
    offset, segs, area, present, mismatch = _flat_frames(
        tracks, hw, lambda i, t: f"GT annotation #{i} (id {anns[i].get('id')}) frame {t}", GroundTruthFormatError,
        False, known)
    from_masks = _avg_of_nonzero(area, offset)
    avg = [_mean_truthy(a["areas"]) if "areas" in a else from_masks[i] for i, a in enumerate(anns)]
    return GroundTruth(video_ids, heights, widths, lengths, cat_ids, Tracks(
        video=video, category=np.array([cindex[a["category_id"]] for a in anns], np.int64), score=np.zeros(len(anns)),
        crowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], bool), avg_area=np.array(avg, np.float64),
        offset=offset, segs=segs, area=area, present=present, mismatch=mismatch))


def load_results(source: str | Path | list, gt: GroundTruth, lenient: bool = False) -> Tracks:
    """Parse and validate a results list/file against ``gt``; raise ResultsFormatError naming entries.

    Strict (default): unknown video ids, segmentation lists whose length differs from the video's,
    masks whose size differs from the video's and malformed RLE are errors. ``lenient=True``
    reproduces the official numbers for the first three: unknown videos are dropped (the official
    code asserts), lists are zipped with the GT lists (truncation), mismatched masks intersect
    nothing. Detections of categories not in the GT are dropped with a warning in both modes.
    """
    entries = _load_json(source, "results")
    if not isinstance(entries, list):
        raise ResultsFormatError("results must be a JSON list of {video_id, category_id, score, segmentations}")
    vindex = {vid: i for i, vid in enumerate(gt.video_ids)}
    cindex = {cid: i for i, cid in enumerate(gt.cat_ids)}
    problems: list[str] = []
    kept: list[int] = []
    dropped = {"category": 0, "video": 0}
    for i, e in enumerate(entries):
        problem = _entry_problem(e, vindex, gt, lenient)
        if problem == "unknown video_id" and lenient:
            dropped["video"] += 1
        elif problem:
            problems.append(f"{_entry_name(i, e)}: {problem}")
        elif e["category_id"] not in cindex:
            dropped["category"] += 1
        else:
            kept.append(i)
    if problems:
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ResultsFormatError("\n".join(problems[:10]) + more)
    if dropped["category"]:
        warnings.warn(f"{dropped['category']} results with a category_id not in the GT categories were dropped",
                      EvaluationWarning, stacklevel=2)
    if dropped["video"]:
        warnings.warn(f"lenient: {dropped['video']} results with an unknown video_id were dropped "
                      "(the official code raises AssertionError)", EvaluationWarning, stacklevel=2)
    dets = [entries[i] for i in kept]
    video = np.array([vindex[e["video_id"]] for e in dets], np.int64)
    hw = np.stack([gt.heights[video], gt.widths[video]], 1) if dets else np.zeros((0, 2), np.int64)
    offset, segs, area, present, mismatch = _flat_frames(
        [e["segmentations"] for e in dets], hw, lambda j, t: f"{_entry_name(kept[j], dets[j])} frame {t}",
        ResultsFormatError, lenient)
    return Tracks(video=video, category=np.array([cindex[e["category_id"]] for e in dets], np.int64),
                  score=np.array([float(e["score"]) for e in dets], np.float64), crowd=np.zeros(len(dets), bool),
                  avg_area=_avg_of_nonzero(area, offset), offset=offset, segs=segs, area=area, present=present,
                  mismatch=mismatch)


def _entry_name(i: int, e: Any) -> str:
    return f"results entry #{i} (video_id {e.get('video_id') if isinstance(e, dict) else '?'})"


def _entry_problem(e: Any, vindex: dict, gt: GroundTruth, lenient: bool) -> str | None:
    """The first structural problem of one results entry (frames are checked later, in bulk)."""
    if not isinstance(e, dict):
        return "not a dict"
    missing = [k for k in ("video_id", "category_id", "score", "segmentations") if k not in e]
    if missing:
        return f"missing keys {missing}"
    if e["video_id"] not in vindex:
        return "unknown video_id"
    score = e["score"]
    if isinstance(score, bool) or not isinstance(score, numbers.Real) or not np.isfinite(score):
        return f"score must be a finite number, got {score!r}"
    frames = e["segmentations"]
    if not isinstance(frames, list):
        return "'segmentations' must be a list (one RLE or null per frame)"
    n = int(gt.lengths[vindex[e["video_id"]]])
    if len(frames) != n and not lenient:
        return f"{len(frames)} segmentations for a {n}-frame video (--lenient gives the official truncation)"
    return None


def validate_results(gt: str | Path | dict | GroundTruth, results: str | Path | list, lenient: bool = False) -> None:
    """Raise ResultsFormatError (naming entries) if ``results`` cannot be evaluated against ``gt``."""
    load_results(results, gt if isinstance(gt, GroundTruth) else load_ground_truth(gt), lenient)


def encode_track(masks: np.ndarray, present: np.ndarray | None = None) -> list[dict | None]:
    """Binary masks [T,H,W] to YouTube-VIS ``segmentations`` (compressed RLE, counts as str).

    Frames where ``present`` is False become ``None``; by default every frame is written, as the
    official VisTR inference does (a slot is dropped only when it is empty in every frame).
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_track expects masks [T,H,W], got shape {masks.shape}")
    present = np.ones(len(masks), bool) if present is None else np.asarray(present, bool)
    if present.shape != (len(masks),):
        raise ValueError(f"present must have shape ({len(masks)},), got {present.shape}")
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode()} if p else None
            for r, p in zip(rles, present, strict=False)]
