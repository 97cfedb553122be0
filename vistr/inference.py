"""Turning model outputs into YouTube-VIS results, as the official inference does (FACTS.md §e).

For one clip: instance score = mean over frames of the best class probability (no-object
excluded), category = per-frame majority vote (ties to the smaller id), mask logits upsampled
bilinearly straight to the original size and thresholded at 0.5 after sigmoid, a null
segmentation where a frame's best probability is < 0.001, slots whose mask is empty in every
frame skipped. The optional score threshold / top-k are off by default, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vistr.evaluation import encode_track

NULL_FRAME_SCORE = 1e-3  # official: a frame whose best class probability is below this is null


@dataclass
class Track:
    """One predicted instance sequence over ``L`` frames at the original resolution."""

    masks: torch.Tensor  # bool [L, H, W]
    frame_scores: torch.Tensor  # float [L]: best class probability per frame
    frame_labels: torch.Tensor  # int64 [L]: arg-best class per frame

    @property
    def score(self) -> float:
        return float(self.frame_scores.mean())

    @property
    def category_id(self) -> int:
        # bincount + argmax returns the smallest id among ties, like the official code.
        return int(torch.bincount(self.frame_labels).argmax())


def clip_tracks(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    num_slots: int,
    orig_size: tuple[int, int],
    length: int | None = None,
    valid_size: tuple[int, int] | None = None,
    padded_size: tuple[int, int] | None = None,
) -> list[Track]:
    """Tracks of one clip from its outputs ``pred_logits [n·T, C+1]`` and ``pred_masks [n·T, h, w]``.

    ``length`` keeps the first frames only (a short video cycled up to T). When the clip was padded
    to ``padded_size`` and its real content is ``valid_size``, the padding is cropped from the mask
    logits before upsampling; without padding this is exactly the official computation.
    """
    queries, _ = pred_logits.shape
    if queries % num_slots:
        raise ValueError(f"{queries} queries are not a multiple of num_slots={num_slots}")
    frames = queries // num_slots
    length = frames if length is None else min(length, frames)
    prob = pred_logits.float().softmax(-1)[:, :-1].reshape(frames, num_slots, -1)[:length]
    frame_scores, frame_labels = prob.max(-1)  # [L, n]
    masks = pred_masks.float().reshape(frames, num_slots, *pred_masks.shape[-2:])[:length]
    if valid_size is not None and padded_size is not None and tuple(valid_size) != tuple(padded_size):
        h = round(masks.shape[-2] * valid_size[0] / padded_size[0])
        w = round(masks.shape[-1] * valid_size[1] / padded_size[1])
        masks = masks[..., :h, :w]
    masks = F.interpolate(masks, size=tuple(orig_size), mode="bilinear", align_corners=False).sigmoid() > 0.5
    tracks = []
    for slot in range(num_slots):
        slot_masks = masks[:, slot]
        if not slot_masks.any():
            continue
        tracks.append(Track(slot_masks, frame_scores[:, slot], frame_labels[:, slot]))
    return tracks


def select_tracks(tracks: list[Track], score_threshold: float | None = None, top_k: int | None = None) -> list[Track]:
    """Optional user filtering (off by default, matching the official output)."""
    kept = [t for t in tracks if score_threshold is None or t.score >= score_threshold]
    kept.sort(key=lambda t: t.score, reverse=True)
    return kept if top_k is None else kept[:top_k]


def tracks_to_results(tracks: list[Track], video_id: int) -> list[dict]:
    """YouTube-VIS results entries (compressed RLE, null where the frame score < 0.001)."""
    return [
        {
            "video_id": int(video_id),
            "score": track.score,
            "category_id": track.category_id,
            "segmentations": encode_track(track.masks, track.frame_scores >= NULL_FRAME_SCORE),
        }
        for track in tracks
    ]
