"""Clip postprocess against a hand-computed example (FACTS.md §e); the streaming pipeline against a plain loop."""

import threading

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from vistr.config import load_config
from vistr.data.video_io import VideoDecodeError
from vistr.inference import (
    ClipPredictor,
    Stitcher,
    clip_tracks,
    plan_windows,
    select_tracks,
    tracks_to_results,
)
from vistr.predict import predict_stream

# 3 slots, 4 frames, classes {0,1,2} + no-object. Rows: per frame, probabilities of (0, 1, 2, none).
SLOT0 = [[0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.5, 0.2], [0.0002, 0.0005, 0.0001, 0.9992], [0.1, 0.2, 0.6, 0.1]]
SLOT1 = [[0.0, 0.1, 0.8, 0.1], [0.0, 0.7, 0.2, 0.1], [0.0, 0.9, 0.05, 0.05], [0.0, 0.1, 0.6, 0.3]]
SLOT2 = [[0.25, 0.25, 0.25, 0.25]] * 4


def _outputs() -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor([SLOT0, SLOT1, SLOT2], dtype=torch.float64)  # [n, T, C+1]
    logits = probs.clamp_min(1e-12).log().permute(1, 0, 2).reshape(12, 4)  # q = t*n + slot
    masks = torch.full((4, 3, 2, 2), -10.0)
    masks[:, 0] = 10.0  # slot 0: everywhere
    masks[:, 1, :, 0] = 10.0  # slot 1: left column
    masks[1, 1] = -10.0  # ... except frame 1, where it is empty
    # slot 2: empty in every frame -> skipped
    return logits, masks.reshape(12, 2, 2)


def test_scores_categories_and_null_frames_by_hand() -> None:
    logits, masks = _outputs()
    tracks = clip_tracks(logits, masks, num_slots=3, orig_size=(4, 6))
    assert len(tracks) == 2  # slot 2 had no foreground pixel in any frame
    t0, t1 = tracks
    # slot 0: per-frame best = 0.6 (1), 0.5 (2), 0.0005 (1), 0.6 (2) -> mean 0.425; votes 1,2,1,2 tie -> 1
    assert t0.score == pytest.approx((0.6 + 0.5 + 0.0005 + 0.6) / 4)
    assert t0.category_id == 1
    # slot 1: best = 0.8 (2), 0.7 (1), 0.9 (1), 0.6 (2) -> tie again -> 1; mean 0.75
    assert t1.score == pytest.approx(0.75)
    assert t1.category_id == 1

    results = tracks_to_results(tracks, video_id=7)
    assert [r["video_id"] for r in results] == [7, 7]
    segs0 = results[0]["segmentations"]
    assert segs0[2] is None  # frame score 0.0005 < 0.001
    full = mask_utils.decode(segs0[0])
    assert full.shape == (4, 6) and full.all()
    segs1 = results[1]["segmentations"]
    left = mask_utils.decode(segs1[0]).astype(bool)
    assert left[:, :3].all() and not left[:, 3:].any()  # column 0 of 2 upsamples to the left half
    # an empty frame of a kept slot is still an RLE (of zeros), as in the official code
    assert segs1[1] is not None and mask_utils.area(segs1[1]) == 0
    assert isinstance(segs1[0]["counts"], str)


def test_length_truncates_cycled_frames() -> None:
    logits, masks = _outputs()
    tracks = clip_tracks(logits, masks, num_slots=3, orig_size=(4, 6), length=2)
    assert all(t.masks.shape[0] == 2 for t in tracks)
    assert tracks[0].score == pytest.approx((0.6 + 0.5) / 2)
    assert tracks[0].category_id == 1  # votes 1, 2 -> tie -> smaller id


def test_padding_is_cropped_before_upsampling() -> None:
    # real content 4x4 padded to 4x8: mask logits [2,4]; the right half of the logits is padding
    logits = torch.zeros(2, 3)
    masks = torch.full((2, 2, 4), -10.0)
    masks[:, :, :2] = 10.0
    (track,) = clip_tracks(logits, masks, num_slots=1, orig_size=(8, 8), valid_size=(4, 4), padded_size=(4, 8))
    assert track.masks.all()  # without the crop, the right half would be empty


def test_select_tracks_threshold_and_top_k() -> None:
    logits, masks = _outputs()
    tracks = clip_tracks(logits, masks, num_slots=3, orig_size=(4, 6))
    assert [round(t.score, 4) for t in select_tracks(tracks, top_k=1)] == [0.75]
    assert select_tracks(tracks, score_threshold=0.5) == [tracks[1]]
    assert select_tracks(tracks) == [tracks[1], tracks[0]]  # nothing dropped, best score first


class _PixelModel(torch.nn.Module):
    """A stand-in for VisTR whose outputs follow the input: slot s's mask logit at frame t is the
    frame's pooled red channel minus s/2, its class scores depend on the frame's mean."""

    def __init__(self, frames: int, slots: int) -> None:
        super().__init__()
        self.frames, self.slots = frames, slots

    def forward(self, clip):
        pooled = torch.nn.functional.avg_pool2d(clip[0, :, 0], 4)  # [T, h/4, w/4]
        masks = torch.stack([pooled - s / 2 for s in range(self.slots)], 1)  # [T, n, h/4, w/4]
        mean = clip[0].mean((1, 2, 3))  # [T]
        logits = torch.stack([mean * c for c in range(6)], -1)[:, None].expand(-1, self.slots, -1)
        return {"pred_logits": logits.reshape(1, -1, 6), "pred_masks": masks.reshape(1, -1, *pooled.shape[-2:])}


def _frames(count: int) -> list:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return [np.roll(base, 3 * t, axis=1) for t in range(count)]


@pytest.mark.parametrize("concurrent", [True, False], ids=["threads", "inline"])
def test_streaming_pipeline_equals_a_plain_loop(concurrent):
    cfg = load_config("tiny_cpu")
    predictor = ClipPredictor(_PixelModel(cfg.model.num_frames, cfg.model.num_slots), cfg)
    frames = _frames(15)
    seen, tracks_seen, threads = [], [], set()

    def sink(owned, raws, tracks):
        seen.append((owned.first, len(raws)))
        tracks_seen.append(tracks)
        threads.add(threading.current_thread().name)

    stitcher = predict_stream(predictor, iter(frames), len(frames), overlap=2, sink=sink, concurrent=concurrent)
    assert threads == ({"vistr-sink"} if concurrent else {threading.current_thread().name})
    windows = plan_windows(len(frames), cfg.model.num_frames, 2)
    reference = Stitcher(windows)
    for start, stop in windows:
        reference.add(predictor(np.stack(frames[start:stop])))
    assert stitcher.results(3) == reference.results(3)
    results = stitcher.results(3)  # not a trivial comparison: several tracks, some across windows
    assert len(results) >= 2 and max(sum(f is not None for f in r["segmentations"]) for r in results) > 6
    assert seen == [(reference.bounds[w], reference.bounds[w + 1] - reference.bounds[w]) for w in range(len(windows))]
    # The sink sees each window's tracks as they stood when it was stitched, not later: the
    # labels it draws do not depend on how far the stitcher has run ahead of it.
    replay = Stitcher(windows)
    for (start, stop), tracks in zip(windows, tracks_seen, strict=True):
        owned = replay.add(predictor(np.stack(frames[start:stop])))
        assert tracks == {t: (replay.tracks[t].category_id, replay.tracks[t].score) for t in owned.masks}


@pytest.mark.parametrize("concurrent", [True, False], ids=["threads", "inline"])
def test_streaming_reports_a_short_video_and_postprocess_errors(concurrent):
    cfg = load_config("tiny_cpu")
    predictor = ClipPredictor(_PixelModel(cfg.model.num_frames, cfg.model.num_slots), cfg)
    with pytest.raises(VideoDecodeError, match="ended after 9 frames, 15 were expected"):
        predict_stream(predictor, iter(_frames(9)), 15, overlap=2, concurrent=concurrent)

    def broken_sink(*_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        predict_stream(predictor, iter(_frames(15)), 15, overlap=2, sink=broken_sink, concurrent=concurrent)

    def failing_decoder():
        yield from _frames(7)
        raise VideoDecodeError("clip.mp4: decoding stopped at frame 7")

    with pytest.raises(VideoDecodeError, match="frame 7"):
        predict_stream(predictor, failing_decoder(), 15, overlap=2, concurrent=concurrent)


def test_stages_overlap_only_when_the_model_leaves_a_core(monkeypatch):
    import vistr.predict as predict

    threads = torch.get_num_threads()
    monkeypatch.setattr(predict.os, "cpu_count", lambda: threads)
    assert not predict.stages_overlap("cpu")  # model's threads on every core: run stages inline
    assert predict.stages_overlap("cuda")  # GPU model: the CPU is free for decoding
    monkeypatch.setattr(predict.os, "cpu_count", lambda: threads + 1)
    assert predict.stages_overlap("cpu")


def test_overlay_writer_draws_in_parallel_but_writes_in_order(tmp_path):
    """draw_threads only changes who draws: the video and the contact sheet are frame for frame
    those of the sequential writer (a reordered frame would differ: each frame has its own content)."""
    from vistr.data.video_io import iter_frames
    from vistr.inference import OwnedFrames
    from vistr.predict import OverlayWriter

    frames = _frames(10)
    masks = torch.zeros(10, 48, 64, dtype=torch.bool)
    for t in range(10):
        masks[t, 10:30, 4 * t: 4 * t + 20] = True
    outputs = {}
    for threads in (1, 3):
        writer = OverlayWriter(tmp_path / f"o{threads}.mp4", 10.0, 10, sheet_frames=4, draw_threads=threads)
        for first in (0, 5):
            writer(OwnedFrames(first, 5, {7: masks[first: first + 5]}), frames[first: first + 5], {7: (2, 0.9)})
        writer.close(tmp_path / f"s{threads}.png")
        outputs[threads] = (list(iter_frames(tmp_path / f"o{threads}.mp4")), writer.sheet)
    (video1, sheet1), (video3, sheet3) = outputs[1], outputs[3]
    assert len(video1) == len(video3) == 10
    assert all(np.array_equal(a, b) for a, b in zip(video1, video3, strict=True))
    assert [i for i, _ in sheet1] == [i for i, _ in sheet3] == [0, 3, 6, 9]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(sheet1, sheet3, strict=True))
    assert not np.array_equal(video1[0], video1[9])  # frames differ, so order is tested
