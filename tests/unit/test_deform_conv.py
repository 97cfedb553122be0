"""The CPU deformable convolution must compute the official DCN v1: forward equal to torchvision's
(numerically the official kernel, FACTS.md §f), gradients equal to the official kernel's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

import vistr.models.deform_conv as dc
from vistr.models.deform_conv import deform_conv2d


def _case(
    seed: int,
    dtype: torch.dtype,
    n: int = 2,
    cin: int = 5,
    cout: int = 4,
    hw: tuple[int, int] = (9, 11),
    k: tuple[int, int] = (3, 3),
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    offset_scale: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, int]]:
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    ho = (h + 2 * padding - dilation * (k[0] - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k[1] - 1) - 1) // stride + 1
    x = torch.randn(n, cin, h, w, generator=g, dtype=dtype)
    weight = torch.randn(cout, cin, *k, generator=g, dtype=dtype)
    offset = torch.randn(n, 2 * k[0] * k[1], ho, wo, generator=g, dtype=dtype) * offset_scale
    return x, offset, weight, {"stride": stride, "padding": padding, "dilation": dilation}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


CONFIGS = [
    {},
    {"stride": 2},
    {"padding": 0},
    {"padding": 2, "dilation": 2},
    {"stride": 2, "padding": 3, "dilation": 3, "hw": (13, 8)},
    {"k": (1, 3), "padding": 0, "hw": (5, 7)},
    {"offset_scale": 12.0},  # most samples far outside the image
    {"cin": 48, "cout": 24, "hw": (6, 7)},  # VisTR's DCN channels
    {"hw": (1, 1), "padding": 1},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_torchvision(cfg: dict, dtype: torch.dtype, tol: float) -> None:
    x, offset, weight, kw = _case(len(str(cfg)), dtype, **cfg)
    assert _rel(deform_conv2d(x, offset, weight, **kw), tv_deform_conv2d(x, offset, weight, **kw)) <= tol


def test_integer_offsets_on_boundaries_and_negative_coordinates() -> None:
    """Samples exactly on pixels, at −1 / H / W (where DCN switches to 0), and beyond."""
    x, _, weight, kw = _case(3, torch.float64, hw=(6, 7))
    g = torch.Generator().manual_seed(4)
    offset = torch.randint(-8, 9, (2, 18, 6, 7), generator=g).double()
    # Put some taps exactly on the limits: tap (0,0) of pixel (0,0) samples at (-1 + Δy, -1 + Δx).
    offset[:, 0, 0, 0] = 0.0  # y = -1 exactly
    offset[:, 1, 0, 1] = 7.0  # x = 0 - 1 + 1 + 7 = 7 = W exactly
    offset[:, 16, 5, 0] = -6.0  # last tap: y = 5 - 1 + 2 - 6 = 0
    got = deform_conv2d(x, offset, weight, **kw)
    want = tv_deform_conv2d(x, offset, weight, **kw)
    assert _rel(got, want) <= 1e-10
    # Half-integer offsets: all four bilinear weights are 0.25, including partly outside corners.
    assert (
        _rel(deform_conv2d(x, offset + 0.5, weight, **kw), tv_deform_conv2d(x, offset + 0.5, weight, **kw))
        <= 1e-10
    )


def test_zero_offset_is_plain_convolution() -> None:
    x, offset, weight, kw = _case(5, torch.float64, stride=2, padding=2, dilation=2)
    got = deform_conv2d(x, torch.zeros_like(offset), weight, **kw)
    assert _rel(got, torch.nn.functional.conv2d(x, weight, **kw)) <= 1e-12


def test_bias_is_added() -> None:
    x, offset, weight, kw = _case(6, torch.float64)
    bias = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    got = deform_conv2d(x, offset, weight, bias, **kw)
    assert _rel(got, tv_deform_conv2d(x, offset, weight, bias, **kw)) <= 1e-10
    assert _rel(got - bias.view(1, -1, 1, 1), deform_conv2d(x, offset, weight, **kw)) <= 1e-12


def test_batch_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any split of the batch into sampling groups and table sub-chunks gives the same result,
    including a budget smaller than one item (item by item) and uneven last chunks."""
    x, offset, weight, kw = _case(7, torch.float64, n=5)
    want = tv_deform_conv2d(x, offset, weight, **kw)
    table = 11 * 13 * (5 + 9 * 4) * 8  # bytes per item: padded 9x11 input, Cin + K·Cout columns
    rows = 9 * 11 * 9 * 4 * (4 + 8)  # bytes per item: 4·K int32 rows + float64 weights per position
    # items per (table sub-chunk, sampling group) = (1, 1), (1, 2), (2, 2), (3, 3), (5, 5)
    for budget in (1, 2 * rows, 2 * table, 4 * rows, 10**9):
        monkeypatch.setattr(dc, "CHUNK_BYTES", budget)
        assert _rel(deform_conv2d(x, offset, weight, **kw), want) <= 1e-10


def _grads(fn, tensors: list[torch.Tensor], upstream: torch.Tensor, kw: dict) -> tuple[list, torch.Tensor]:
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, **kw)
    return list(torch.autograd.grad(out, leaves, upstream)), out


def _official_offset_grad(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, upstream: torch.Tensor, kw: dict
) -> torch.Tensor:
    """Brute-force transliteration of detectron2's ``deformable_col2im_coord`` + ``get_coordinate_weight``
    (the official DCN's offset gradient), one output position and tap at a time."""
    n, _, h, w = x.shape
    _, _, kh, kwid = weight.shape
    s, p, d = kw["stride"], kw["padding"], kw["dilation"]
    col = torch.einsum("oikl,nohw->niklhw", weight, upstream)  # [n, cin, kh, kw, ho, wo]
    grad = torch.zeros_like(offset)
    ho, wo = offset.shape[2:]

    def pixel(img: torch.Tensor, yy: int, xx: int) -> torch.Tensor:
        return img[:, yy, xx] if 0 <= yy < h and 0 <= xx < w else torch.zeros(img.shape[0], dtype=img.dtype)

    for b in range(n):
        for i in range(kh):
            for j in range(kwid):
                t = i * kwid + j
                for oy in range(ho):
                    for ox in range(wo):
                        y = (oy * s - p + i * d) + offset[b, 2 * t, oy, ox].item()
                        xx = (ox * s - p + j * d) + offset[b, 2 * t + 1, oy, ox].item()
                        if y <= -1 or y >= h or xx <= -1 or xx >= w:
                            continue  # get_coordinate_weight returns 0
                        y0, x0 = math.floor(y), math.floor(xx)
                        v00, v01 = pixel(x[b], y0, x0), pixel(x[b], y0, x0 + 1)
                        v10, v11 = pixel(x[b], y0 + 1, x0), pixel(x[b], y0 + 1, x0 + 1)
                        dy_w = (x0 + 1 - xx) * (v10 - v00) + (xx - x0) * (v11 - v01)
                        dx_w = (y0 + 1 - y) * (v01 - v00) + (y - y0) * (v11 - v10)
                        c = col[b, :, i, j, oy, ox]
                        grad[b, 2 * t, oy, ox] = (dy_w * c).sum()
                        grad[b, 2 * t + 1, oy, ox] = (dx_w * c).sum()
    return grad


def _on_minus_one(offset: torch.Tensor, kernel: tuple[int, int], kw: dict) -> torch.Tensor:
    """[N, 2K, Ho, Wo] mask of the samples whose row or column is exactly −1 (both channels of the tap)."""
    n, _, ho, wo = offset.shape
    kh, kwid = kernel
    s, p, d = kw["stride"], kw["padding"], kw["dilation"]
    ty = torch.arange(kh).repeat_interleave(kwid).view(1, -1, 1, 1) * d
    tx = torch.arange(kwid).repeat(kh).view(1, -1, 1, 1) * d
    y = torch.arange(ho).view(1, 1, -1, 1) * s - p + ty + offset[:, 0::2]
    x = torch.arange(wo).view(1, 1, 1, -1) * s - p + tx + offset[:, 1::2]
    hit = (y == -1) | (x == -1)
    return hit.repeat_interleave(2, dim=1)


GRAD_CASES = {
    "zero offsets (initialization)": ({}, lambda o: torch.zeros_like(o)),
    "integer offsets": ({"offset_scale": 3.0}, torch.round),
    "half-integer offsets": ({"offset_scale": 3.0}, lambda o: torch.round(o) + 0.5),
    "random offsets": ({"offset_scale": 1.5}, lambda o: o),
    "strided dilated, integer": (
        {"stride": 2, "padding": 2, "dilation": 2, "offset_scale": 2.0},
        torch.round,
    ),
    "far outside": ({"offset_scale": 12.0}, lambda o: o),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_all_gradients_match_the_official_kernel(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Input, offset, weight and bias gradients in float64, including samples exactly on pixels
    (a kink of bilinear sampling: the official kernel takes the right-sided derivative) and on
    the −1 / H / W limits. Input/weight/bias: equal to torchvision's. Offset: equal to a
    brute-force official formula everywhere, and to torchvision's except exactly on row/column
    −1, where torchvision omits the official range check (and is non-zero at init)."""
    monkeypatch.setattr(dc, "CHUNK_BYTES", 1)  # gradients must also flow through the chunk concat
    cfg, make_offset = GRAD_CASES[name]
    x, offset, weight, kw = _case(13, torch.float64, hw=(5, 6), **cfg)
    offset = make_offset(offset)
    bias = torch.randn(weight.shape[0], dtype=torch.float64)
    upstream = torch.randn_like(tv_deform_conv2d(x, offset, weight, bias, **kw))
    ours, out = _grads(deform_conv2d, [x, offset, weight, bias], upstream, kw)
    assert "deform" not in type(out.grad_fn).__name__.lower()  # really the vectorized path
    ref, _ = _grads(tv_deform_conv2d, [x, offset, weight, bias], upstream, kw)
    for label, a, b in zip(("input", "weight", "bias"), ours[:1] + ours[2:], ref[:1] + ref[2:], strict=True):
        assert _rel(a, b) <= 1e-10, label
    official = _official_offset_grad(x, offset, weight, upstream, kw)
    assert official.abs().max() > 0
    assert _rel(ours[1], official) <= 1e-10
    edge = _on_minus_one(offset, weight.shape[2:], kw)
    assert torch.equal(ours[1][edge], torch.zeros_like(ours[1][edge]))
    assert _rel(ours[1][~edge], ref[1][~edge]) <= 1e-10
    if name.startswith("zero"):  # every first-row/column tap sits on −1 at initialization
        assert edge.any() and (ref[1][edge] != 0).any()


def test_gradcheck() -> None:
    x, offset, weight, kw = _case(9, torch.float64, n=1, cin=2, cout=2, hw=(4, 5), offset_scale=0.7)
    inputs = (x.requires_grad_(), offset.requires_grad_(), weight.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b, c: deform_conv2d(a, b, c, **kw), inputs)


def test_unsupported_configs_fall_back_to_torchvision() -> None:
    """Grouped convolution and several offset groups are not on the fast path; results still agree."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    grouped_w = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)  # conv groups = 2
    w = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)
    off1 = torch.randn(2, 18, 6, 6, generator=g, dtype=torch.float64)
    off2 = torch.randn(2, 36, 6, 6, generator=g, dtype=torch.float64)  # offset groups = 2
    assert _rel(deform_conv2d(x, off2, w, padding=1), tv_deform_conv2d(x, off2, w, padding=1)) == 0.0
    assert (
        _rel(deform_conv2d(x, off1, grouped_w, padding=1), tv_deform_conv2d(x, off1, grouped_w, padding=1))
        == 0.0
    )
    with pytest.raises(ValueError, match="divisible"):  # 3 out channels cannot form 2 groups
        deform_conv2d(x, off1, grouped_w[:3], padding=1)


@pytest.mark.parametrize(
    "args,match",
    [
        (((2, 4, 6, 6), (2, 18, 5, 6), (3, 4, 3, 3)), "offset shape"),
        (((2, 4, 6, 6), (1, 18, 6, 6), (3, 4, 3, 3)), "offset shape"),
        (((2, 4, 6, 6), (2, 17, 6, 6), (3, 4, 3, 3)), "offset shape"),
        (((2, 4, 6), (2, 18, 6, 6), (3, 4, 3, 3)), "4-D"),
        (((2, 5, 6, 6), (2, 18, 6, 6), (3, 4, 3, 3)), "divisible"),
    ],
)
def test_bad_shapes_raise_clear_errors(args: tuple, match: str) -> None:
    x, off, w = (torch.zeros(s) for s in args)
    with pytest.raises(ValueError, match=match):
        deform_conv2d(x, off, w, padding=1)


def test_bad_bias_and_hyperparameters_raise() -> None:
    x, offset, weight, kw = _case(11, torch.float32)
    with pytest.raises(ValueError, match="bias shape"):
        deform_conv2d(x, offset, weight, torch.zeros(3), **kw)
    with pytest.raises(ValueError, match="stride"):
        deform_conv2d(x, offset, weight, stride=(1, 1), padding=1)


def test_non_finite_offsets_give_nan_outputs_not_a_crash() -> None:
    """A diverged model's NaN/Inf offsets must surface as NaN in the loss (the engine stops there)."""
    x, w = torch.randn(2, 8, 6, 7), torch.randn(4, 8, 3, 3)
    offset = torch.zeros(2, 18, 6, 7)
    offset[0, 3, 2, 2] = float("nan")
    offset[1, 5, 1, 1] = float("inf")
    out = deform_conv2d(x, offset, w, padding=1)
    assert out[0, :, 2, 2].isnan().all() and out[1, :, 1, 1].isnan().all()
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[0, :, 2, 2] = finite[1, :, 1, 1] = False
    assert out[finite].isfinite().all()
