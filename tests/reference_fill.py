"""The deterministic weight fill and input used to produce tests/data/official_*_r50_64x96.npz.

Spec: reference FACTS.md "Reference outputs". Every state-dict entry (FrozenBN buffers included)
gets a splitmix-style hash of (crc32(name), element index) mapped to [-1, 1), then scaled per
tensor kind so the attention is not degenerate. Vectorized with numpy uint64 (wrap-around).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def hash_uniform(name: str, numel: int) -> np.ndarray:
    """r in [-1, 1), float64, one per element index k = 0..numel-1."""
    seed = np.uint64(zlib.crc32(name.encode("utf-8")))
    k = np.arange(1, numel + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = k * np.uint64(0x9E3779B97F4A7C15) + seed * np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(29)
    u = (x >> np.uint64(11)).astype(np.float64) / 2.0**53
    return 2.0 * u - 1.0


def fill_value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    numel = int(np.prod(shape)) if shape else 1
    r = hash_uniform(name, numel)
    if name.endswith("query_embed.weight"):
        r = r * np.sqrt(3.0)
    elif name.endswith("in_proj_weight"):
        d = shape[1]
        r = r.reshape(shape) * np.sqrt(3.0 / d)
        r[: 2 * d] *= 6.0
    elif name.endswith("out_proj.weight"):
        r = 0.2 * r * np.sqrt(3.0 / shape[1])
    elif len(shape) >= 2:
        r = r * np.sqrt(3.0 / (numel / shape[0]))
    elif name.endswith("running_mean"):
        r = 0.1 * r
    elif name.endswith("running_var"):
        r = 1.0 + 0.25 * (r + 1.0)
    elif name.endswith("weight"):
        r = 1.0 + 0.1 * r
    elif name.endswith("bias"):
        r = 0.02 * r
    else:
        raise ValueError(f"fill rule has no case for {name} {shape}")
    return np.asarray(r, dtype=np.float64).reshape(shape).astype(np.float32)


def reference_state_dict(names_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(fill_value(name, shape)) for name, shape in names_shapes.items()}


def reference_input(frames: int = 36, height: int = 64, width: int = 96) -> torch.Tensor:
    """x[t,c,y,x] = 1.5·sin(0.05·(c+1)·y + 0.08·(3-c)·x + 0.3·t + c), float64 -> float32."""
    t, c, y, x = np.meshgrid(
        np.arange(frames), np.arange(3), np.arange(height), np.arange(width), indexing="ij"
    )
    values = 1.5 * np.sin(0.05 * (c + 1) * y + 0.08 * (3 - c) * x + 0.3 * t + c)
    return torch.from_numpy(values.astype(np.float32))
