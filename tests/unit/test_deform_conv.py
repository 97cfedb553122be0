"""The CPU deformable convolution must equal torchvision's (the official kernel's twin, FACTS.md §f)."""

from __future__ import annotations

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
    """A chunk budget smaller than one item still runs item by item and gives the same result."""
    x, offset, weight, kw = _case(7, torch.float64, n=5)
    want = tv_deform_conv2d(x, offset, weight, **kw)
    for budget in (1, 3 * 2 * 9 * 4 * 99 * 8):  # one item per chunk; about two items per chunk
        monkeypatch.setattr(dc, "CHUNK_BYTES", budget)
        assert _rel(deform_conv2d(x, offset, weight, **kw), want) <= 1e-10


def _grads(fn, tensors: list[torch.Tensor], needs_grad: list[bool], upstream: torch.Tensor, kw: dict) -> list:
    leaves = [t.clone().requires_grad_(flag) for t, flag in zip(tensors, needs_grad, strict=True)]
    out = fn(*leaves, **kw)
    out.backward(upstream)
    return [t.grad for t in leaves], out


def test_input_weight_bias_gradients_match_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast path (offset without grad): autograd through it equals torchvision's backward."""
    monkeypatch.setattr(dc, "CHUNK_BYTES", 1)  # gradients must also flow through the chunk concat
    x, offset, weight, kw = _case(8, torch.float64, n=2, stride=2, padding=2, dilation=2, offset_scale=1.5)
    bias = torch.randn(weight.shape[0], dtype=torch.float64)
    upstream = torch.randn_like(tv_deform_conv2d(x, offset, weight, bias, **kw))
    needs = [True, False, True, True]
    ours, out = _grads(deform_conv2d, [x, offset, weight, bias], needs, upstream, kw)
    assert "deform" not in type(out.grad_fn).__name__.lower()  # really the vectorized path
    ref, _ = _grads(tv_deform_conv2d, [x, offset, weight, bias], needs, upstream, kw)
    for name, a, b in zip(("input", "weight", "bias"), *(g[:1] + g[2:] for g in (ours, ref)), strict=True):
        assert _rel(a, b) <= 1e-9, name


def test_offset_gradient_is_torchvision_s_even_at_integer_positions() -> None:
    """Zero offsets (the initial state) put every sample on a pixel, a kink of bilinear sampling;
    the offset gradient there must be the official one-sided derivative, bit for bit."""
    x, offset, weight, kw = _case(12, torch.float64)
    for off in (torch.zeros_like(offset), offset.round()):
        upstream = torch.randn_like(tv_deform_conv2d(x, off, weight, **kw))
        ours, _ = _grads(deform_conv2d, [x, off, weight], [True] * 3, upstream, kw)
        ref, _ = _grads(tv_deform_conv2d, [x, off, weight], [True] * 3, upstream, kw)
        for a, b in zip(ours, ref, strict=True):
            assert torch.equal(a, b)


def test_gradcheck_fast_path() -> None:
    x, offset, weight, kw = _case(9, torch.float64, n=1, cin=2, cout=2, hw=(4, 5), offset_scale=0.7)
    inputs = (x.requires_grad_(), weight.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, c: deform_conv2d(a, offset, c, **kw), inputs)


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
