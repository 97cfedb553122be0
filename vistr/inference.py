"""Turning model outputs into YouTube-VIS results, as the official inference does (FACTS.md §e).

For one clip: instance score = mean over frames of the best class probability (no-object
excluded), category = per-frame majority vote (ties to the smaller id), mask logits upsampled
bilinearly straight to the original size and thresholded at 0.5 after sigmoid, a null
segmentation where a frame's best probability is < 0.001, slots whose mask is empty in every
frame skipped. The optional score threshold / top-k are off by default, as in the official code.

For a video of any length (where we deliberately differ: the official code keeps the first T
frames only, FACTS.md §e): windows of T frames overlapping by K (:func:`plan_windows`) go through
the model one at a time, and :class:`Stitcher` links the instances of consecutive windows by mask
IoU on their shared frames (Hungarian, with a minimum IoU). Each frame is *owned* by exactly one
window (the overlap is split at its middle: frames nearer a window's centre see more context),
so a window's owned frames are final as soon as it is stitched and are encoded to RLE at once;
only the masks of the next overlap are kept. Memory is bounded by the window, not the video.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from vistr.config import Config
from vistr.data.transforms import build_transforms, normalize_uint8
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
    # in place: the upsampled logits are the largest tensor of the postprocess (T·n·H·W floats).
    # On a GPU this runs there (36x10 masks at 300x540 are 58M values) and only the boolean masks
    # cross to the CPU, where the stitcher and the RLE encoder need them.
    masks = F.interpolate(masks, size=tuple(orig_size), mode="bilinear", align_corners=False).sigmoid_() > 0.5
    masks, frame_scores, frame_labels = masks.cpu(), frame_scores.cpu(), frame_labels.cpu()
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


# ---------------------------------------------------------------- videos of any length


def plan_windows(length: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, stop)`` windows of ``window`` frames covering ``length`` frames, consecutive ones
    sharing at least ``overlap`` frames; the last one is moved back to end at the last frame (so it
    shares more) rather than run past the end. A video of at most ``window`` frames is one window
    of its own length (the model then sees it cycled up to T, as in the official code)."""
    if length < 1:
        raise ValueError(f"a video needs at least one frame, got length={length}")
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window, got window={window}, overlap={overlap}")
    if length <= window:
        return [(0, length)]
    starts = [*range(0, length - window, window - overlap), length - window]
    return [(s, s + window) for s in starts]


def owned_bounds(windows: list[tuple[int, int]]) -> list[int]:
    """Frame ``f`` is owned by window ``w`` iff ``bounds[w] <= f < bounds[w + 1]``: each overlap is
    split at its middle. Strictly increasing because window starts and stops both are."""
    middles = [(nxt[0] + cur[1] + 1) // 2 for cur, nxt in zip(windows[:-1], windows[1:], strict=True)]
    return [0, *middles, windows[-1][1]]


@dataclass
class StitchedTrack:
    """One instance over a whole video, built window by window; frames it does not cover are null."""

    track_id: int
    first: int  # first covered frame
    segmentations: list[dict | None] = field(default_factory=list)  # covered frames, in order
    score_sum: float = 0.0
    label_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def stop(self) -> int:
        return self.first + len(self.segmentations)

    @property
    def score(self) -> float:
        """Mean per-frame score over the frames the track covers (as the official per clip)."""
        return self.score_sum / max(len(self.segmentations), 1)

    @property
    def category_id(self) -> int:
        """Majority of the per-frame labels over all covered frames; ties go to the smaller id."""
        return int(self.label_counts.argmax())

    def extend(self, masks: torch.Tensor, frame_scores: torch.Tensor, frame_labels: torch.Tensor) -> None:
        """Append frames: encoded to RLE now, so their masks need not be kept."""
        self.segmentations += encode_track(masks.numpy(), (frame_scores >= NULL_FRAME_SCORE).numpy())
        self.score_sum += float(frame_scores.double().sum())
        counts = np.bincount(frame_labels.numpy(), minlength=len(self.label_counts))
        counts[: len(self.label_counts)] += self.label_counts
        self.label_counts = counts

    def to_result(self, video_id: int, length: int) -> dict:
        """A YouTube-VIS results entry for a ``length``-frame video."""
        return {
            "video_id": int(video_id),
            "score": self.score,
            "category_id": self.category_id,
            "segmentations": [None] * self.first + self.segmentations + [None] * (length - self.stop),
        }


@dataclass
class OwnedFrames:
    """Frames finalised by one window: ``first`` .. ``first + count - 1`` and each track's masks there."""

    first: int
    count: int
    masks: dict[int, torch.Tensor]  # track_id -> bool [count, H, W]


class Stitcher:
    """Links per-window tracks into video tracks, fed one window at a time in plan order.

    The tracks of window w+1 are matched to those of window w by their mask IoU over the frames
    both windows share (intersection and union summed over those frames, then Hungarian on
    -IoU); a pair counts only if its IoU is at least ``min_iou``. Unmatched new tracks start new
    video tracks; unmatched old ones end. It takes :class:`Track` lists, so it runs on any
    per-window predictions (tests feed it cut-up ground truth), not only on model outputs.
    """

    def __init__(self, windows: list[tuple[int, int]], min_iou: float = 0.5) -> None:
        if not windows:
            raise ValueError("no windows to stitch")
        if not 0.0 < min_iou <= 1.0:
            raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
        self.windows = windows
        self.bounds = owned_bounds(windows)
        self.min_iou = min_iou
        self.tracks: list[StitchedTrack] = []
        self._next = 0
        self._carry: list[tuple[int, torch.Tensor]] = []  # (track_id, masks on the next overlap)

    @property
    def done(self) -> bool:
        return self._next == len(self.windows)

    def add(self, tracks: list[Track]) -> OwnedFrames:
        """Stitch the next window's tracks (masks ``[stop - start, H, W]``); return its owned frames."""
        if self.done:
            raise ValueError(f"all {len(self.windows)} windows were already added")
        w = self._next
        start, stop = self.windows[w]
        for track in tracks:
            if track.masks.shape[0] != stop - start:
                raise ValueError(
                    f"window {w} covers frames {start}..{stop - 1} but a track has {track.masks.shape[0]} frames"
                )
        ids = self._link(tracks)
        first, end = self.bounds[w] - start, self.bounds[w + 1] - start
        owned = {}
        for track, tid in zip(tracks, ids, strict=True):
            self.tracks[tid].extend(track.masks[first:end], track.frame_scores[first:end], track.frame_labels[first:end])
            owned[tid] = track.masks[first:end]
        if w + 1 < len(self.windows):
            shared = self.windows[w + 1][0] - start
            self._carry = [(tid, t.masks[shared:]) for t, tid in zip(tracks, ids, strict=True)]
        self._next += 1
        return OwnedFrames(self.bounds[w], end - first, owned)

    def _link(self, tracks: list[Track]) -> list[int]:
        """Video track id per window track: matched to the previous window's, or new."""
        ids: list[int | None] = [None] * len(tracks)
        if self._carry and tracks:
            overlap = self._carry[0][1].shape[0]
            iou = np.zeros((len(self._carry), len(tracks)))
            for i, (_, old) in enumerate(self._carry):
                for j, track in enumerate(tracks):
                    new = track.masks[:overlap]
                    union = int(torch.count_nonzero(old | new))
                    iou[i, j] = int(torch.count_nonzero(old & new)) / union if union else 0.0
            for i, j in zip(*linear_sum_assignment(-iou), strict=True):
                if iou[i, j] >= self.min_iou:
                    ids[j] = self._carry[i][0]
        for j, tid in enumerate(ids):
            if tid is None:
                ids[j] = len(self.tracks)
                self.tracks.append(StitchedTrack(len(self.tracks), self.bounds[self._next]))
        return ids  # type: ignore[return-value]

    def results(self, video_id: int, score_threshold: float | None = None, top_k: int | None = None) -> list[dict]:
        """YouTube-VIS entries of all tracks (optionally filtered like :func:`select_tracks`)."""
        if not self.done:
            raise ValueError(f"only {self._next} of {len(self.windows)} windows were added")
        return [t.to_result(video_id, self.bounds[-1]) for t in select_tracks(self.tracks, score_threshold, top_k)]


class ClipPredictor:
    """The model plus the official inference resize: frames in, per-clip :class:`Track` s out.

    Split in :meth:`prepare` (per frame, so it can run ahead in a decoding thread), :meth:`forward`
    (the model only) and :meth:`postprocess`, so a streaming caller can overlap the three.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.num_frames = cfg.model.num_frames
        self.num_slots = cfg.model.num_slots
        # Frames stay uint8 until they reach the model's device: a quarter of the bytes to copy,
        # and on a GPU the normalisation runs there instead of in the decoding thread.
        self._resize = build_transforms(cfg.data, train=False, normalize=False)

    def prepare(self, frame: np.ndarray) -> torch.Tensor:
        """One uint8 RGB frame [H, W, 3] -> the resized uint8 model input [3, h, w]
        (normalised in :meth:`forward`, on the model's device)."""
        if not frame.flags.writeable:  # Pillow's arrays are read-only; torch warns on those
            frame = frame.copy()
        return self._resize(frame[None])[0][0]

    @torch.inference_mode()
    def forward(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pred_logits [n·T, C+1]`` and ``pred_masks [n·T, h, w]`` for up to T prepared frames, left
        on the model's device for :meth:`postprocess`; fewer frames are cycled 0..L-1, 0, 1, ... up
        to T as in the official code."""
        if not 1 <= len(inputs) <= self.num_frames:
            raise ValueError(f"a clip needs 1..{self.num_frames} frames, got {len(inputs)}")
        clip = torch.stack([inputs[i % len(inputs)] for i in range(self.num_frames)])
        out = self.model(normalize_uint8(clip.to(self.device))[None])
        return out["pred_logits"][0].float(), out["pred_masks"][0].float()

    def postprocess(self, outputs: tuple[torch.Tensor, torch.Tensor], length: int, orig_size: tuple[int, int]) -> list[Track]:
        return clip_tracks(*outputs, self.num_slots, orig_size, length=length)

    def __call__(self, frames: np.ndarray) -> list[Track]:
        """Tracks of one clip of uint8 frames [L, H, W, 3], L <= T."""
        outputs = self.forward([self.prepare(f) for f in frames])
        return self.postprocess(outputs, len(frames), frames.shape[1:3])
