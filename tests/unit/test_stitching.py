"""Long-video inference: window planning, cross-window stitching (fed per-window tracks, no model)
and the short-clip cycling of the official inference."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from vistr.config import load_config
from vistr.data.transforms import MEAN, STD
from vistr.evaluation import encode_track, evaluate
from vistr.inference import ClipPredictor, Stitcher, Track, owned_bounds, plan_windows

T, K = 6, 2  # window, overlap
LENGTH = 20  # > 3 T: windows (0,6) (4,10) (8,14) (12,18) (14,20)
H, W = 32, 48
# (category, first frame, stop frame, row): discs moving right, in separate rows so they never touch
OBJECTS = [(1, 0, 20, 6), (3, 5, 15, 16), (2, 9, 20, 26)]


@pytest.mark.parametrize("length,window,overlap", [(1, 6, 2), (6, 6, 2), (7, 6, 2), (20, 6, 2), (37, 36, 8),
                                                   (100, 10, 0), (50, 8, 7), (23, 5, 3)])
def test_windows_cover_the_video_and_each_frame_has_one_owner(length, window, overlap):
    windows = plan_windows(length, window, overlap)
    bounds = owned_bounds(windows)
    assert windows[0][0] == 0 and windows[-1][1] == length
    assert all(b - a == min(window, length) for a, b in windows)
    for (a0, b0), (a1, b1) in zip(windows[:-1], windows[1:], strict=True):
        assert a0 < a1 and b0 < b1 and b0 - a1 >= overlap
    owners = [[w for w in range(len(windows)) if bounds[w] <= f < bounds[w + 1]] for f in range(length)]
    assert all(len(o) == 1 for o in owners)
    assert all(windows[o[0]][0] <= f < windows[o[0]][1] for f, o in enumerate(owners))


def test_bad_window_settings_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(10, 4, 4)
    with pytest.raises(ValueError, match="length"):
        plan_windows(0, 4, 1)


def _video() -> np.ndarray:
    """bool [N, LENGTH, H, W] ground-truth masks of OBJECTS."""
    yy, xx = np.mgrid[0:H, 0:W]
    masks = np.zeros((len(OBJECTS), LENGTH, H, W), bool)
    for k, (_, start, stop, row) in enumerate(OBJECTS):
        for t in range(start, stop):
            cx = 4 + 2 * t
            masks[k, t] = (yy - row) ** 2 + (xx - cx) ** 2 <= 16
    return masks


def _ground_truth(masks: np.ndarray) -> dict:
    anns = []
    for k, (cat, *_rest) in enumerate(OBJECTS):
        present = masks[k].any((1, 2))
        anns.append({"id": k + 1, "video_id": 1, "category_id": cat, "iscrowd": 0, "height": H, "width": W,
                     "segmentations": encode_track(masks[k], present), "areas": [int(a) or None for a in masks[k].sum((1, 2))]})
    return {"videos": [{"id": 1, "height": H, "width": W, "length": LENGTH, "file_names": [f"{t}.jpg" for t in range(LENGTH)]}],
            "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)], "annotations": anns}


def _window_tracks(masks: np.ndarray, start: int, stop: int, rng: np.random.Generator) -> list[Track]:
    """Oracle predictions for one window: GT cut to the window, instance order shuffled."""
    tracks = []
    for k in rng.permutation(len(OBJECTS)):
        window = torch.from_numpy(masks[k, start:stop])
        if window.any():
            scores = torch.where(window.flatten(1).any(1), 0.9, 0.3)
            tracks.append(Track(window, scores, torch.full((stop - start,), OBJECTS[k][0])))
    return tracks


def _stitch(window_masks: list[np.ndarray], min_iou: float) -> Stitcher:
    windows = plan_windows(LENGTH, T, K)
    stitcher = Stitcher(windows, min_iou=min_iou)
    rng = np.random.default_rng(0)
    for masks, (start, stop) in zip(window_masks, windows, strict=True):
        stitcher.add(_window_tracks(masks, start, stop, rng))
    return stitcher


def test_oracle_windows_reproduce_the_ground_truth_tracks():
    masks = _video()
    windows = plan_windows(LENGTH, T, K)
    assert len(windows) == 5
    stitcher = _stitch([masks] * len(windows), min_iou=0.5)
    results = stitcher.results(video_id=1)
    assert len(results) == len(OBJECTS)
    gt = _ground_truth(masks)
    assert evaluate(gt, results)["AP"] == pytest.approx(1.0)
    for result in results:
        decoded = np.stack([mask_utils.decode(s).astype(bool) if s is not None else np.zeros((H, W), bool)
                            for s in result["segmentations"]])
        (k,) = [k for k in range(len(OBJECTS)) if (masks[k] == decoded).all()]  # exactly one GT track
        assert result["category_id"] == OBJECTS[k][0]
        # score: mean of the per-frame scores over the covered frames (0.9 present, 0.3 absent)
        covered = [s is not None for s in result["segmentations"]]
        first, stop = covered.index(True), len(covered) - covered[::-1].index(True)
        present = masks[k, first:stop].any((1, 2))
        assert result["score"] == pytest.approx(np.where(present, 0.9, 0.3).mean())


def test_owned_frames_are_streamed_in_order_with_consistent_ids():
    masks = _video()
    windows = plan_windows(LENGTH, T, K)
    stitcher = Stitcher(windows)
    rng = np.random.default_rng(1)
    seen = []
    for start, stop in windows:
        owned = stitcher.add(_window_tracks(masks, start, stop, rng))
        seen += range(owned.first, owned.first + owned.count)
        for tid, m in owned.masks.items():
            k = [o[0] for o in OBJECTS].index(stitcher.tracks[tid].category_id)  # categories are unique
            assert (m.numpy() == masks[k, owned.first:owned.first + owned.count]).all()
    assert seen == list(range(LENGTH))
    with pytest.raises(ValueError, match="already added"):
        stitcher.add([])


def _noisy(masks: np.ndarray, shifts: np.ndarray) -> list[np.ndarray]:
    """Per window, each instance's masks shifted right by its own number of pixels."""
    return [np.stack([np.roll(masks[k], int(shifts[w, k]), axis=-1) for k in range(len(OBJECTS))])
            for w in range(len(shifts))]


def _border_ious(noisy: list[np.ndarray]) -> list[float]:
    """Brute force: IoU over the shared frames of each instance present there, per window border."""
    windows = plan_windows(LENGTH, T, K)
    ious = []
    for w in range(len(windows) - 1):
        a, b = windows[w + 1][0], windows[w][1]
        for k in range(len(OBJECTS)):
            old, new = noisy[w][k, a:b], noisy[w + 1][k, a:b]
            in_old, in_new = noisy[w][k, windows[w][0]:b].any(), noisy[w + 1][k, a:windows[w + 1][1]].any()
            if in_old and in_new:
                ious.append((old & new).sum() / (old | new).sum() if (old | new).any() else 0.0)
    return ious


def test_noisy_tracks_stay_whole_above_the_iou_threshold_and_break_below():
    masks = _video()
    shifts = np.random.default_rng(5).integers(0, 5, size=(5, len(OBJECTS)))
    noisy = _noisy(masks, shifts)
    ious = np.array(_border_ious(noisy))
    assert ious.min() < 0.999 and len(np.unique(ious.round(6))) > 2  # the noise does change the overlaps
    assert len(_stitch(noisy, min_iou=ious.min() - 1e-6).tracks) == len(OBJECTS)
    for threshold in (float(np.median(ious)), float(np.sort(ious)[-2]) + 1e-6):
        broken = int((ious < threshold).sum())  # each border whose overlap IoU is below breaks a track
        assert broken > 0
        assert len(_stitch(noisy, min_iou=threshold).tracks) == len(OBJECTS) + broken


class _RecordingModel(torch.nn.Module):
    """Returns a mask logit equal to each frame's input id, and records the clip it was given."""

    def __init__(self, frames: int, slots: int) -> None:
        super().__init__()
        self.frames, self.slots = frames, slots

    @staticmethod
    def frame_ids(clip):
        """The uint8 value each input frame was filled with, undoing the predictor's normalisation."""
        return ((clip[0, :, 0, 0, 0] * STD[0] + MEAN[0]) * 255).round()

    def forward(self, clip):
        self.clip = clip
        ids = self.frame_ids(clip)  # [T]
        masks = (ids[:, None, None, None] - 0.5).expand(self.frames, self.slots, 4, 4).reshape(1, -1, 4, 4)
        logits = torch.zeros(1, self.frames * self.slots, 6)
        return {"pred_logits": logits, "pred_masks": masks}


def test_short_clips_are_cycled_and_truncated_like_the_official_code():
    cfg = load_config("tiny_cpu")
    model = _RecordingModel(cfg.model.num_frames, cfg.model.num_slots)
    predictor = ClipPredictor(model, cfg)
    inputs = [torch.full((3, 8, 8), i, dtype=torch.uint8) for i in range(4)]  # 4 < T = 6 frames, input i = id i
    outputs = predictor.forward(inputs)
    assert model.frame_ids(model.clip).tolist() == [0, 1, 2, 3, 0, 1]
    assert model.clip[0, 1, 0, 0, 0].item() == pytest.approx((1 / 255 - MEAN[0]) / STD[0])  # normalised
    tracks = predictor.postprocess(outputs, length=4, orig_size=(8, 8))
    assert len(tracks) == cfg.model.num_slots and all(t.masks.shape == (4, 8, 8) for t in tracks)
    # frame 0 has logit -0.5 (empty), frames 1..3 positive (full)
    assert [bool(m.all()) for m in tracks[0].masks] == [False, True, True, True]
