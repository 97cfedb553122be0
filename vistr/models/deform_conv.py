"""Deformable convolution v1 (the official VisTR mask head's DCN), fast and exact on CPU.

The official model uses detectron2's CUDA-only DeformConv v1; ``torchvision.ops.deform_conv2d``
is numerically equivalent (FACTS.md §f) but its CPU kernel runs at ~2 GFLOP/s and took ~45% of
a 300×540 forward. This module keeps torchvision's kernel on CUDA (and for configurations the
fast path does not cover) and on CPU computes the same function from two well-vectorized ops:

1. *Weight first.* Bilinear sampling is linear in the input, so sampling then applying tap k's
   weight equals applying tap k's weight then sampling: ``Σ_k W_k·S_k(x) = Σ_k S_k(W_k·x)``.
   One GEMM turns ``x [N,Cin,H,W]`` into ``y`` = K·Cout maps per item (K = kh·kw taps). With
   VisTR's 48→24 DCN this halves the number of channels that must be sampled.
2. *Sampling.* ``F.grid_sample(bilinear, zeros, align_corners=False)`` samples tap k's slice of
   ``y`` at ``(y·s − p + i·dil + Δy, x·s − p + j·dil + Δx)``. Its zero padding treats every
   out-of-range corner as 0, which is exactly DCN v1's rule (value 0 unless −1 < h < H and
   −1 < w < W; at those limits the in-range corners have weight 0 anyway). The K sampled maps
   are summed.

The result equals torchvision's up to floating-point rounding (float64 ≲1e-13, float32 ≲1e-6
relative). Work is chunked over the batch so the intermediates stay under ``CHUNK_BYTES``
(VisTR's 360 frame-queries at 300×540 would need ~6 GB at once).

Gradients: autograd through ``mm`` and ``grid_sample`` gives input, weight and bias gradients
equal to torchvision's, ~17x faster than its CPU backward (0.56 s vs 9.6 s on [20,48,75,135]).
The *offset* gradient, however, differs where a sample sits exactly on a pixel row/column (a
kink of bilinear interpolation): the official kernel always takes the one-sided derivative of
the cell [h, h+1], while grid_sample's normalized-coordinate round trip picks a side by
rounding. Every sample sits there at initialization (conv_offset starts at zero), so whenever
the offset needs a gradient we use torchvision's kernel to train exactly like the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as _tv_deform_conv2d

# Upper bound on the per-chunk intermediates (weight-applied input + sampled taps), in bytes.
# Small on purpose: glibc serves blocks under its mmap threshold (≤32 MiB) from the reused heap,
# while bigger ones are mmapped and page-faulted afresh on every call. On [20,48,75,135] inputs,
# 32 MiB chunks (one item each) ran ~1.6x faster than 256 MiB chunks (0.29 s vs 0.51 s CPU).
# A module attribute rather than an argument so the public signature matches torchvision's.
CHUNK_BYTES = 32 * 2**20

_FAST_DTYPES = (torch.float32, torch.float64)


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> torch.Tensor:
    """DCN v1: ``input [N,Cin,H,W]``, ``offset [N, 2·kh·kw, Ho, Wo]`` (Δy, Δx per tap, tap-major),
    ``weight [Cout, Cin, kh, kw]`` → ``[N, Cout, Ho, Wo]``. Same semantics as torchvision's op.
    """
    _check_shapes(input, offset, weight, bias, stride, padding, dilation)
    fast = (
        input.device.type == "cpu"
        and input.dtype in _FAST_DTYPES
        and offset.dtype == input.dtype == weight.dtype
        and weight.shape[1] == input.shape[1]  # no grouped convolution
        and offset.shape[1] == 2 * weight.shape[2] * weight.shape[3]  # one offset group
        and not (offset.requires_grad and torch.is_grad_enabled())  # see "Gradients" above
    )
    if not fast:
        return _tv_deform_conv2d(
            input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation
        )
    n, _, h, w = input.shape
    cout, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    per_item = input.element_size() * kh * kw * cout * (h * w + ho * wo)
    chunk = max(1, CHUNK_BYTES // max(per_item, 1))
    outs = [
        _deform_conv2d_chunk(input[i : i + chunk], offset[i : i + chunk], weight, stride, padding, dilation)
        for i in range(0, n, chunk)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _check_shapes(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    padding: int,
    dilation: int,
) -> None:
    """Fail with a message that names the mismatch; the kernels' own errors are cryptic."""
    if input.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"deform_conv2d expects 4-D input/offset/weight, got {tuple(input.shape)}, "
            f"{tuple(offset.shape)}, {tuple(weight.shape)}"
        )
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"deform_conv2d: {name} must be an int (square only), got {v!r}")
    if stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(
            f"deform_conv2d: need stride>=1, dilation>=1, padding>=0; got {stride}, {dilation}, {padding}"
        )
    n, cin, h, w = input.shape
    cout, cin_g, kh, kw = weight.shape
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    if offset.shape[0] != n or tuple(offset.shape[2:]) != (ho, wo) or offset.shape[1] % (2 * kh * kw) != 0:
        raise ValueError(
            f"deform_conv2d: offset shape {tuple(offset.shape)} does not fit input {tuple(input.shape)} and "
            f"weight {tuple(weight.shape)}: expected [{n}, 2·{kh}·{kw}·offset_groups, {ho}, {wo}]"
        )
    if cin_g == 0 or cin % cin_g != 0:
        raise ValueError(f"deform_conv2d: input channels {cin} not divisible by weight.shape[1]={cin_g}")
    if cout % (cin // cin_g) != 0:
        raise ValueError(f"deform_conv2d: output channels {cout} not divisible by the {cin // cin_g} groups")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"deform_conv2d: bias shape {tuple(bias.shape)}, expected ({cout},)")


def _sampling_grid(
    offset: torch.Tensor, h: int, w: int, kh: int, kw: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Normalized ``grid_sample`` coordinates ``[K·N, Ho, Wo, 2]`` (x, y) of every sample, tap-major.

    ``align_corners=False`` maps pixel p to (2p + 1)/size − 1 (valid for size 1 too), so the
    coordinate is ``base + Δ·(2/size)`` with a small precomputed ``base`` per (tap, position):
    two fused passes over the offsets instead of a chain of full-size temporaries.
    """
    n, _, ho, wo = offset.shape
    k = kh * kw
    dt, dev = offset.dtype, offset.device
    tap_y = (torch.arange(kh, dtype=dt, device=dev) * dilation).repeat_interleave(kw).view(k, 1, 1, 1)
    tap_x = (torch.arange(kw, dtype=dt, device=dev) * dilation).repeat(kh).view(k, 1, 1, 1)
    base_y = (torch.arange(ho, dtype=dt, device=dev) * stride - padding).view(1, 1, ho, 1)
    base_x = (torch.arange(wo, dtype=dt, device=dev) * stride - padding).view(1, 1, 1, wo)
    norm_y = (2 * (base_y + tap_y) + 1) / h - 1  # [K, 1, Ho, 1]
    norm_x = (2 * (base_x + tap_x) + 1) / w - 1  # [K, 1, 1, Wo]
    off = offset.view(n, k, 2, ho, wo).transpose(0, 1)  # [K, N, 2, Ho, Wo], channel 0 = Δy
    gx = torch.add(norm_x, off[:, :, 1], alpha=2.0 / w)
    gy = torch.add(norm_y, off[:, :, 0], alpha=2.0 / h)
    return torch.stack((gx, gy), dim=-1).view(k * n, ho, wo, 2)


def _deform_conv2d_chunk(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    k = kh * kw
    ho, wo = offset.shape[2:]
    # One large GEMM (a batched one with K=Cin=48 ran 2-3x slower). Rows ordered (out channel,
    # tap) and columns (item, pixel) make y[co, k·N + n] a uniform stride over (tap, item), so
    # the transpose below is a free view that grid_sample reads as a batch of K·N maps.
    w_rows = weight.permute(0, 2, 3, 1).reshape(cout * k, cin)
    y = torch.mm(w_rows, x.transpose(0, 1).reshape(cin, n * h * w))
    y = y.view(cout, k * n, h, w).transpose(0, 1)
    grid = _sampling_grid(offset, h, w, kh, kw, stride, padding, dilation)
    sampled = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.view(k, n, cout, ho, wo).sum(dim=0)
