"""Clip-consistent augmentation and normalisation (FACTS.md §d train, §e inference).

The geometric transforms run once on the whole clip as torchvision ``tv_tensors`` (a ``Video``
plus the K·T instance-frame ``Mask``s and ``BoundingBoxes``), so flip, scale and crop are drawn
once and applied identically to every frame, mask and box. The photometric jitter is drawn per
frame, as in the official code.

Deliberate differences from the official pipeline (each small, each for speed or clarity):
- The first RandomResize(480..768, max 800) is skipped: the next RandomResize(multiscale) always
  overrides the size, so it changed nothing but resampling artefacts.
- RandomResize(multiscale) -> RandomSizeCrop -> RandomResize(final) keeps its random draws but
  is fused into one crop + one resize (``RandomScaleCrop``): one resampling instead of three.
- The photometric jitter runs after the geometric transforms, at the (small) training size, with
  torchvision's SSD-style ``RandomPhotometricDistort`` (brightness as a ×[0.875, 1.125] factor
  instead of ±32 levels; hue on true RGB, not cv2's BGR-on-RGB reading).
- Boxes are recomputed from the transformed masks where those are non-empty (after a crop, the
  official clamped box is not tight around the part of a non-rectangular object that is left).
As in the official code, a crop does not change ``valid`` (a box cropped away becomes empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from vistr.box_ops import mask_pixel_boxes
from vistr.config import DataConfig

# ImageNet statistics: the official normalisation (and that of every torchvision backbone).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def resized_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Official (DETR) resize rule: shorter side ``size``, longer side capped at ``max_size``.

    If the longer side would exceed ``max_size``, the shorter side becomes
    round(max_size·short/long); the longer side is then int-truncated (FACTS.md §d).
    """
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] from torch's RNG (seeded per clip by the dataset)."""
    return int(torch.randint(low, high + 1, ()))


class RandomShorterSide(v2.Transform):
    """Resize the whole clip with the official rule to a shorter side drawn from ``sizes``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        return {
            "size": list(
                resized_size(height, width, self.sizes[_randint(0, len(self.sizes) - 1)], self.max_size)
            )
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # Masks are resized with nearest neighbour by torchvision's mask kernel.
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomScaleCrop(v2.Transform):
    """The official RandomResize(scales) -> RandomSizeCrop(crop_min, crop_max) -> RandomResize(
    [size], max_size) chain, with the same random draws, fused into one crop + one resize.

    The crop is drawn in the rescaled image exactly as DETR does, mapped back to source pixels
    (rounded) and resampled once to the final size. Three chained nearest-neighbour mask resizes
    drift up to ~2 px from the boxes; one keeps masks within 1 px of them (and is faster).
    """

    def __init__(
        self, scales: Sequence[int], crop_min: int, crop_max: int, size: int, max_size: int | None
    ) -> None:
        super().__init__()
        self.scales, self.crop_min, self.crop_max = list(scales), crop_min, crop_max
        self.size, self.max_size = size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        h1, w1 = resized_size(height, width, self.scales[_randint(0, len(self.scales) - 1)])
        crop_w = _randint(min(self.crop_min, w1), min(w1, self.crop_max))
        crop_h = _randint(min(self.crop_min, h1), min(h1, self.crop_max))
        top, left = _randint(0, h1 - crop_h), _randint(0, w1 - crop_w)
        sy, sx = height / h1, width / w1
        y0, x0 = round(top * sy), round(left * sx)
        y1, x1 = (
            min(height, max(y0 + 1, round((top + crop_h) * sy))),
            min(width, max(x0 + 1, round((left + crop_w) * sx))),
        )
        return {
            "top": y0,
            "left": x0,
            "height": y1 - y0,
            "width": x1 - x0,
            "size": list(resized_size(crop_h, crop_w, self.size, self.max_size)),
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resized_crop, inpt, **params, antialias=True)


class ClipTransform:
    """``(frames uint8 [T,3,H,W] or [T,H,W,3], target | None) -> (float32 [T,3,H,W], target)``
    (uint8 frames when ``normalize=False``).

    The target's ``masks`` [K,T,H,W] and ``boxes`` [K,T,4] (normalized cx,cy,w,h) are transformed
    with the frames; boxes are renormalised to the new size and zeroed where not ``valid``;
    ``size`` is set to the output (H, W).
    """

    def __init__(
        self, geometric: v2.Transform, photometric: v2.Transform | None = None, normalize: bool = True
    ) -> None:
        self.geometric = geometric
        self.photometric = photometric
        # normalize=False keeps uint8 frames: for preprocessing that stores frames for later.
        self.normalize = normalize_uint8 if normalize else None

    def __call__(
        self, frames: torch.Tensor | np.ndarray, target: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        video = tv_tensors.Video(as_uint8_tchw(frames))
        height, width = video.shape[-2:]
        if target is None:
            video = self.geometric(video)
        else:
            masks, boxes = _to_tv(target, height, width)
            video, masks, boxes = self.geometric(video, masks, boxes)
        if self.photometric is not None:
            video = tv_tensors.Video(torch.stack([self.photometric(frame) for frame in video]))
        out = (self.normalize(video) if self.normalize is not None else video).as_subclass(torch.Tensor)
        if target is None:
            return out, None
        return out, _from_tv(target, masks, boxes)


def normalize_uint8(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [..., 3, H, W] -> float32 ImageNet-normalised, on the frames' own device.

    Exactly torchvision's ``ToDtype(float32, scale=True)`` + ``Normalize(MEAN, STD)`` (same ops,
    same order: bitwise-equal results), as a function so inference can move uint8 frames to the
    GPU, a quarter of the bytes, and normalise them there."""
    mean = torch.as_tensor(MEAN, dtype=torch.float32, device=frames.device).view(-1, 1, 1)
    std = torch.as_tensor(STD, dtype=torch.float32, device=frames.device).view(-1, 1, 1)
    return frames.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std).as_subclass(torch.Tensor)


def as_uint8_tchw(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Accept decoded frames as numpy [T,H,W,3] (video_io/Pillow layout) or torch [T,3,H,W]."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(
            f"frames must be uint8 [T,3,H,W] or [T,H,W,3], got {frames.dtype} {tuple(frames.shape)}"
        )
    return frames


def _to_tv(
    target: dict[str, Any], height: int, width: int
) -> tuple[tv_tensors.Mask, tv_tensors.BoundingBoxes]:
    masks = torch.as_tensor(target["masks"])
    k, t = masks.shape[:2]
    cx, cy, w, h = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(k * t, 4).unbind(-1)
    xyxy = torch.stack(
        [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1
    )
    return (
        tv_tensors.Mask(masks.reshape(k * t, height, width)),
        tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(height, width)),
    )


def _from_tv(target: dict[str, Any], masks: torch.Tensor, boxes: tv_tensors.BoundingBoxes) -> dict[str, Any]:
    k, t = torch.as_tensor(target["masks"]).shape[:2]
    height, width = boxes.canvas_size
    masks = masks.as_subclass(torch.Tensor).reshape(k, t, height, width)
    x0, y0, x1, y1 = boxes.as_subclass(torch.Tensor).reshape(k, t, 4).unbind(-1)
    xyxy = torch.stack([x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)], -1)
    # After a crop, the clamped box of a non-rectangular object is no longer tight around what is
    # left of it; the mask is the ground truth, so wherever it is non-empty the box is its box.
    tight, nonempty = mask_pixel_boxes(masks)
    xyxy = torch.where(nonempty[..., None], tight, xyxy)
    x0, y0, x1, y1 = xyxy.unbind(-1)
    cxcywh = torch.stack(
        [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], -1
    )
    valid = torch.as_tensor(target["valid"], dtype=torch.bool)
    out = dict(target)
    out["boxes"] = torch.where(valid[..., None], cxcywh, torch.zeros_like(cxcywh)).float()
    out["masks"] = masks
    out["size"] = (int(height), int(width))
    return out


def build_transforms(cfg: DataConfig, train: bool, normalize: bool = True) -> ClipTransform:
    """The training (augmenting, if ``cfg.augment``) or deterministic evaluation transform."""
    if not train:
        return ClipTransform(RandomShorterSide([cfg.test_min_size], cfg.test_max_size), normalize=normalize)
    if not cfg.augment:
        return ClipTransform(RandomShorterSide([cfg.min_size], cfg.max_size), normalize=normalize)
    geometric = v2.Compose(
        [
            v2.RandomHorizontalFlip(cfg.hflip_prob),
            RandomScaleCrop(cfg.multiscale, cfg.crop_min, cfg.crop_max, cfg.min_size, cfg.max_size),
        ]
    )
    photometric = v2.RandomPhotometricDistort(hue=(-0.05, 0.05)) if cfg.photometric else None
    return ClipTransform(geometric, photometric, normalize=normalize)
