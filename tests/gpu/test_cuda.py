"""The CUDA paths: the official reference outputs on the GPU, AMP training (bf16, and fp16 with a
GradScaler), pinned batches, and GPU inference agreeing with the CPU.

Skipped where torch sees no GPU (CI, the dev machines); run them on a GPU machine with
``pytest tests/gpu`` (they ran on an H200: benchmarks/results/gpu.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vistr.checkpoint import load_official_vistr
from vistr.config import load_config
from vistr.engine import train_one_epoch
from vistr.inference import ClipPredictor
from vistr.models import build_model
from vistr.predict import predict_stream
from vistr.trainer import _loader, build_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run `pytest tests/gpu` on one")

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "unit"))
from reference_fill import reference_input, reference_state_dict  # noqa: E402
from test_official_checkpoint import reference_shapes, rel_err  # noqa: E402

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact fp32 on the GPU (cuDNN's default TF32 convolutions differ from the CPU by ~1e-3)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_r50_matches_the_official_reference_on_the_gpu():
    ref = np.load(TESTS / "data" / "official_outputs_r50_64x96.npz")
    model = load_official_vistr({"model": reference_state_dict(reference_shapes("resnet50"))}, "resnet50").to(CUDA)
    with torch.inference_mode():
        out = model(reference_input().to(CUDA))
    errors = {key: rel_err(out[key].cpu(), ref[key]) for key in ("pred_logits", "pred_boxes", "pred_masks")}
    assert all(err <= 1e-4 for err in errors.values()), errors


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16+GradScaler"])
def test_amp_training_steps_update_the_weights(synth_root, monkeypatch, bf16):
    if bf16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    if not bf16:  # the path of GPUs without bf16 (V100, T4), forced on any GPU
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = load_config("tiny_cpu", {"train.amp": True, "train.device": "cuda"})
    state = build_state(cfg, CUDA)
    assert (state.scaler is None) == bf16
    before = {k: v.detach().clone() for k, v in state.model.named_parameters() if v.requires_grad}
    loader = _loader(cfg, synth_root, epoch=0, pin_memory=True)
    first = next(iter(loader))
    assert first["frames"].is_pinned() and first["pad_mask"].is_pinned()  # non_blocking copies overlap
    # 16 steps: fp16's GradScaler starts at 2^16 and skips the first overflowing steps while it
    # halves its scale (7 of them on an H200), then updates the weights.
    stats = train_one_epoch(state.model, state.criterion, loader, state.optimizer, CUDA, amp=True,
                            scaler=state.scaler, max_steps=16, clip_max_norm=cfg.train.clip_max_norm)  # fmt: skip
    assert stats.steps == 16 and all(np.isfinite(v) for v in stats.losses.values()), stats.losses
    if state.scaler is not None:
        assert 1.0 <= state.scaler.get_scale() < 2.0**16  # overflow was detected and handled
    changed = [k for k, v in state.model.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(before)


def test_gpu_inference_agrees_with_the_cpu():
    cfg = load_config("tiny_cpu")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    frames = [np.random.default_rng(t).integers(0, 256, (64, 96, 3), dtype=np.uint8) for t in range(14)]
    results = {}
    for device in ("cpu", "cuda"):
        predictor = ClipPredictor(model, cfg, device)
        stitcher = predict_stream(predictor, iter(frames), len(frames), overlap=2, concurrent=device == "cuda")
        results[device] = stitcher.results(1)
        model.cpu()
    cpu, gpu = results["cpu"], results["cuda"]
    assert len(cpu) == len(gpu) > 0
    for a, b in zip(cpu, gpu, strict=True):
        assert a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        same = sum(x == y for x, y in zip(a["segmentations"], b["segmentations"], strict=True))
        assert same >= 0.9 * len(frames)  # RLEs identical but for rare borderline pixels
