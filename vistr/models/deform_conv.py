"""Deformable convolution v1 (the official VisTR mask head's DCN), fast and exact on CPU.

The official model uses detectron2's CUDA-only DeformConv v1. ``torchvision.ops.deform_conv2d``
computes the same forward (FACTS.md §f), but its CPU kernel runs at ~2-3 GFLOP/s forward and its
backward is ~7x slower still (10 s for [20,48,75,135] -> 24), which dominated CPU training steps.
On CUDA we keep torchvision's kernel; on CPU this module computes the official formula with
three well-vectorized ops, for inference and training alike:

1. *Weight first.* Bilinear sampling is linear in the input, so sampling and then applying tap
   k's weight equals applying tap k's weight and then sampling: ``Σ_k W_k·S_k(x) = Σ_k S_k(W_k·x)``.
   One GEMM turns the zero-padded input into a *table* with one row of Cout values per
   (item, pixel, tap). With VisTR's 48 -> 24 DCN this halves the values that must be sampled.
2. *Sampling in pixel coordinates*, exactly as the kernel does: the sample position
   ``p = (y·s − pad + i·dil) + Δy`` (same single rounding as the kernel), ``y0 = floor(p)``,
   weights from ``p − y0`` and the four corners ``(y0|y0+1, x0|x0+1)``. The table is built
   from the input padded by one zero pixel, so every corner of an in-range sample
   (−1 < p < H, −1 < q < W) is a table row and corners off the image read zeros, which is DCN
   v1's rule. Samples out of that range get weight 0.
3. *Weighted gather-sum.* ``F.embedding_bag(mode="sum", per_sample_weights=...)`` adds the 4·K
   weighted table rows of every output position without materializing them.

Gradients come from autograd through these ops and equal the official kernel's
(``deformable_col2im``/``deformable_col2im_coord``): at integer sample positions — every sample
at initialization, since ``conv_offset`` starts at zero — ``floor`` puts the sample in the cell
[y0, y0+1] and the weights' derivative is the kernel's one-sided (right) derivative, and samples
outside (−1, H) × (−1, W) get no offset gradient (the kernel's ``get_coordinate_weight`` returns
0 there). torchvision's kernel omits that last check, so at a sample exactly on row/column −1
its offset gradient is non-zero where the official one is 0; elsewhere they agree (float64 ≲1e-13).

Work is chunked over the batch so the intermediates stay under ``CHUNK_BYTES`` (VisTR's 360
frame-queries at 300×540 would need ~5 GB at once). Under autograd each chunk's graph keeps its
table, rows and weights until backward, as any layer keeps its activations.

Measured (fp32, 1 thread, [20,48,75,135] -> 24): forward 0.16 s vs torchvision 1.4 s; forward +
backward (all gradients) 1.3 s vs 10.1 s. benchmarks/forward.py records current numbers.
Known weakness: ~25 elementwise ops per chunk, each an OpenMP parallel region; on an
oversubscribed machine (load > cores) every region can wait a scheduler slice for a
descheduled thread, and 2 threads ran up to 7x (large) / 30x (tiny shapes) slower than 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as _tv_deform_conv2d

# Upper bound on the per-chunk intermediates (table; rows and weights), in bytes. Small on
# purpose: glibc serves blocks under its mmap threshold (≤32 MiB) from the reused heap, while
# bigger ones are mmapped and page-faulted afresh on every call (measured ~1.6x slower with
# 256 MiB chunks). A module attribute rather than an argument so the signature stays torchvision's.
CHUNK_BYTES = 32 * 2**20

_FAST_DTYPES = (torch.float32, torch.float64)
_CORNERS = 4


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
    ``weight [Cout, Cin, kh, kw]`` -> ``[N, Cout, Ho, Wo]``. Same semantics as torchvision's op.
    """
    _check_shapes(input, offset, weight, bias, stride, padding, dilation)
    fast = (
        input.device.type == "cpu"
        and input.dtype in _FAST_DTYPES
        and offset.dtype == input.dtype == weight.dtype
        and weight.shape[1] == input.shape[1]  # no grouped convolution
        and offset.shape[1] == 2 * weight.shape[2] * weight.shape[3]  # one offset group
    )
    if not fast:
        return _tv_deform_conv2d(
            input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation
        )
    n, cin, h, w = input.shape
    cout, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    k = kh * kw
    # Two budgets: the GEMM table (K·Cout values per padded pixel) is the big intermediate, so
    # it is built for a few items at a time; the sampling rows and weights are computed for a
    # larger group of items at once, which means fewer, larger elementwise ops — each op is a
    # parallel region, and on a busy machine every region can stall for a scheduler slice.
    per_item_table = (h + 2) * (w + 2) * (cin + k * cout) * input.element_size()
    per_item_rows = ho * wo * k * _CORNERS * (4 + input.element_size())
    sub = max(1, CHUNK_BYTES // max(per_item_table, 1))
    group = max(sub, CHUNK_BYTES // max(per_item_rows, 1) // sub * sub)
    w_cols = weight.permute(1, 2, 3, 0).reshape(cin, k * cout)  # column (tap, out channel)
    outs = []
    for g in range(0, n, group):
        rows, weights = _sampling_rows(
            offset[g : g + group], (h, w), (kh, kw), sub, stride, padding, dilation
        )
        bag = ho * wo  # embedding bags (output positions) per item
        for i in range(g, min(g + group, n), sub):
            j = min(i + sub, n)
            sl = slice((i - g) * bag, (j - g) * bag)
            outs.append(_gather_sum(input[i:j], w_cols, rows[sl], weights[sl], (ho, wo)))
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


def _sample_positions(
    offset: torch.Tensor, kernel: tuple[int, int], stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Float sample positions ``[2, N, Ho, Wo, K]`` (rows, columns): the kernel's ``(h_in + i·dil) + Δy``."""
    n, _, ho, wo = offset.shape
    kh, kw = kernel
    dt, dev = offset.dtype, offset.device
    tap_y = torch.arange(kh, dtype=dt, device=dev).repeat_interleave(kw) * dilation
    tap_x = torch.arange(kw, dtype=dt, device=dev).repeat(kh) * dilation
    base_y = (torch.arange(ho, dtype=dt, device=dev) * stride - padding).view(ho, 1, 1) + tap_y
    base_x = (torch.arange(wo, dtype=dt, device=dev) * stride - padding).view(1, wo, 1) + tap_x
    base = torch.stack(torch.broadcast_tensors(base_y, base_x)).unsqueeze(1)  # [2, 1, Ho, Wo, K]
    return offset.view(n, kh * kw, 2, ho, wo).permute(2, 0, 3, 4, 1) + base


def _sampling_rows(
    offset: torch.Tensor,
    size: tuple[int, int],
    kernel: tuple[int, int],
    items_per_table: int,
    stride: int,
    padding: int,
    dilation: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows ``[N·Ho·Wo, 4·K]`` and bilinear weights (same shape) of every sample's corners.

    Rows index the table of the item's sub-chunk (item index modulo ``items_per_table``). All
    elementwise work runs on [N, Ho, Wo, K] planes (taps innermost); tiny inner dimensions
    (the 2x2 corners) would make every op several times slower.
    """
    n, _, ho, wo = offset.shape
    h, w = size
    k = kernel[0] * kernel[1]
    wp = w + 2
    table_rows = (h + 2) * wp * k
    dev = offset.device
    pos = _sample_positions(offset, kernel, stride, padding, dilation)  # [2, N, Ho, Wo, K]
    with torch.no_grad():
        limits = torch.tensor([h, w], dtype=pos.dtype, device=dev).view(2, 1, 1, 1, 1)
        valid = ((pos > -1) & (pos < limits)).all(dim=0).to(pos.dtype)  # [N, Ho, Wo, K]
        # floor(p) where valid; clamped elsewhere only to keep the (zero-weight) rows in the table.
        # NaN/Inf offsets (a diverged model) get in-table rows too; their weights below stay
        # NaN, so the NaN reaches the loss and the engine's check instead of crashing the gather.
        low = torch.minimum(torch.nan_to_num(pos.floor(), nan=-1.0).clamp_(min=-1), limits - 1)
        itype = torch.int32 if items_per_table * table_rows < 2**31 else torch.int64
        # Row of the top-left corner: item·(H+2)·(W+2)·K + ((y0+1)·(W+2) + (x0+1))·K + tap.
        item = torch.arange(n, dtype=itype, device=dev) % items_per_table
        first = item.view(n, 1, 1, 1) * table_rows + torch.arange(k, dtype=itype, device=dev) + (wp + 1) * k
        top_left = low[0].to(itype) * (wp * k) + low[1].to(itype) * k + first
        rows = torch.stack((top_left, top_left + k, top_left + wp * k, top_left + (wp + 1) * k), dim=3)
    frac = pos - low  # exact fractional parts where valid (low = floor there)
    wy1 = frac[0] * valid
    wy0 = valid - wy1  # (1 − fy)·valid: the kernel's hh where valid
    wx1 = frac[1]
    wx0 = 1 - wx1
    weights = torch.stack((wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1), dim=3)  # [N, Ho, Wo, 4, K]
    return rows.view(n * ho * wo, _CORNERS * k), weights.view(n * ho * wo, _CORNERS * k)


def _gather_sum(
    x: torch.Tensor,
    w_cols: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    out_size: tuple[int, int],
) -> torch.Tensor:
    """Weight-first table of ``x`` (zero-padded by one pixel), then the weighted 4·K-row sums."""
    n, cin, h, w = x.shape
    k = rows.shape[1] // _CORNERS
    cout = w_cols.shape[1] // k
    xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).reshape(n * (h + 2) * (w + 2), cin)
    table = torch.mm(xp, w_cols).view(-1, cout)  # row ((item·(H+2) + y+1)·(W+2) + x+1)·K + tap
    out = F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
    return out.view(n, *out_size, cout).permute(0, 3, 1, 2)
