"""The GPU paths, exercised and measured on a CUDA machine (CI and the dev machines have none).

Sections, each recorded on its own (one failing does not hide the others):

- ``parity``: the official-implementation reference outputs (tests/data, R50 at 64x96, T=36) on
  the GPU: fp32 with TF32 off (must match like the CPU: rel. err <= 1e-4), with cuDNN's default
  TF32 convolutions, under the training autocast (bf16, or fp16 where bf16 is missing), and the
  frozen inference copy (``optimize_for_inference``).
- ``forward``: inference speed at the paper's input (T=36, 300x540), R50 and R101, fp32 (TF32
  off), TF32 and bf16 autocast: clip seconds, frames/s, peak memory.
- ``train_tiny``: ``vistr.trainer.fit`` on synthetic data on the GPU with AMP (pinned batches,
  non_blocking copies): loss at the start and the end, clips/s, data-wait fraction; then the fp16
  + GradScaler path (forced by reporting bf16 as unsupported): finite losses and the scale.
- ``train_paper``: training steps of paper_r50 (random init, T=36, frames resized to the paper's
  300..540) with bf16 autocast: seconds per step and peak memory, the paper's 1 clip per GPU.
- ``postprocess``: ``clip_tracks`` of a paper-size clip (36x10 masks to 300x540) with its inputs
  on the GPU vs on the CPU.

Run: ``python -m benchmarks.gpu_check --out DIR [--smoke]`` (``--smoke``: tiny sizes, any device,
to test this script on a CPU before spending GPU time). Results: ``DIR/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine
from vistr.checkpoint import load_official_vistr
from vistr.config import load_config
from vistr.engine import autocast_context, resolve_device, train_one_epoch
from vistr.inference import clip_tracks
from vistr.models import build_model
from vistr.models.inference_opt import optimize_for_inference

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "unit"))
from reference_fill import reference_input, reference_state_dict  # noqa: E402
from test_official_checkpoint import reference_shapes, rel_err  # noqa: E402


def set_tf32(enabled: bool) -> None:
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def output_errors(out: dict[str, Any], ref: Any) -> dict[str, float]:
    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.float().cpu()

    errors = {key: rel_err(cpu(out[key]), ref[key]) for key in ("pred_logits", "pred_boxes", "pred_masks")}
    if out.get("aux_outputs"):  # the frozen inference copy computes no auxiliary outputs
        aux = torch.stack([a["pred_logits"] for a in out["aux_outputs"]])
        errors["aux_logits"] = rel_err(cpu(aux), ref["aux_pred_logits"])
    return errors


def parity(device: torch.device, smoke: bool) -> dict[str, Any]:
    ref = np.load(TESTS / "data" / "official_outputs_r50_64x96.npz")
    model = load_official_vistr({"model": reference_state_dict(reference_shapes("resnet50"))}, "resnet50").to(device)
    x = reference_input().to(device)
    results = {}
    modes: dict[str, tuple[bool, bool]] = {"fp32": (False, False), "tf32": (True, False), "autocast": (False, True)}
    for name, (tf32, amp) in modes.items():
        set_tf32(tf32)
        with torch.inference_mode(), autocast_context(device, amp):
            results[name] = output_errors(model(x), ref)
    set_tf32(False)
    with torch.inference_mode():
        results["optimized_fp32"] = output_errors(optimize_for_inference(model)(x), ref)
    results["fp32_within_1e-4"] = all(v <= 1e-4 for v in results["fp32"].values())
    return results


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def forward(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    rows = []
    size, frames = ((64, 96), 4) if smoke else ((300, 540), 36)
    for preset in ("paper_r50",) if smoke else ("paper_r50", "paper_r101"):
        cfg = load_config(preset, {"model.backbone_weights": None, "model.num_frames": frames})
        torch.manual_seed(0)
        model = optimize_for_inference(build_model(cfg).eval()).to(device)
        x = torch.randn(1, frames, 3, *size, device=device)
        for mode, tf32, amp in (("fp32", False, False), ("tf32", True, False), ("autocast", False, True)):
            set_tf32(tf32)
            reset_peak(device)

            def run(model: torch.nn.Module = model, x: torch.Tensor = x, amp: bool = amp) -> None:
                with torch.inference_mode(), autocast_context(device, amp):
                    model(x)

            times = timed(run, device, warmup=1 if smoke else 3, repeats=2 if smoke else 10)
            rows.append({"model": preset, "mode": mode, "input": f"{frames}x{size[0]}x{size[1]}",
                         "clip_s_median": float(np.median(times)), "clip_s_min": min(times),
                         "fps": frames / float(np.median(times)), "peak_gib": peak_gib(device)})
        del model
    set_tf32(False)
    return rows


def train_tiny(device: torch.device, smoke: bool, work: Path) -> dict[str, Any]:
    from vistr.data.synthetic import SynthSpec, generate_dataset
    from vistr.trainer import fit

    generate_dataset(work / "tiny", SynthSpec(num_videos=16, num_val_videos=1, seed=0), progress=False)
    steps = 10 if smoke else 300
    cfg = load_config("tiny_cpu", {"train.device": str(device), "train.amp": True, "train.epochs": 1,
                                   "train.max_steps_per_epoch": steps, "train.log_every": 1,
                                   "train.validate_every": 0})  # fmt: skip
    losses: list[float] = []

    def on_log(record: dict[str, float], step: int) -> None:
        if "train/loss" in record:  # a step's record (epoch records carry epoch/... keys)
            losses.append(record["train/loss"])

    start = time.perf_counter()
    result = fit(cfg, work / "tiny", work / "tiny_run", resume=False, on_log=on_log)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "steps": result.global_step, "seconds": seconds, "first_losses": losses[:5], "last_losses": losses[-5:],
        **{k: result.history[-1][k] for k in ("samples_per_s", "data_wait_fraction", "epoch/loss")},
    }
    # fp16 + GradScaler: the path of GPUs without bf16 (V100, T4), forced here.
    real = torch.cuda.is_bf16_supported
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: False
    try:
        from vistr.trainer import _loader, build_state

        state = build_state(cfg, device)
        stats = train_one_epoch(state.model, state.criterion, _loader(cfg, work / "tiny", 0, device.type == "cuda"),
                                state.optimizer, device, amp=True, scaler=state.scaler, max_steps=10 if smoke else 60,
                                clip_max_norm=cfg.train.clip_max_norm)  # fmt: skip
        out["fp16_scaler"] = {
            "scaler": type(state.scaler).__name__ if state.scaler else None,
            "scale": state.scaler.get_scale() if state.scaler else None,
            "steps": stats.steps, "loss": stats.losses.get("loss"),
            "finite": all(np.isfinite(v) for v in stats.losses.values()),
        }
    finally:
        torch.cuda.is_bf16_supported = real
    return out


def train_paper(device: torch.device, smoke: bool, work: Path) -> dict[str, Any]:
    from vistr.data.synthetic import SynthSpec, generate_dataset
    from vistr.trainer import _loader, build_state

    frames = 4 if smoke else 36
    generate_dataset(work / "paper", SynthSpec(num_videos=6, num_val_videos=1, frames=(frames, frames + 4),
                                               size=(96, 160) if smoke else (300, 540), seed=1), progress=False)
    overrides = {"model.backbone_weights": None, "model.num_frames": frames, "train.amp": True,
                 "train.device": str(device), "data.num_workers": 4}
    if smoke:
        overrides.update({"data.min_size": 64, "data.max_size": 96, "data.multiscale": [64]})
    cfg = load_config("paper_r50", overrides)
    state = build_state(cfg, device)
    reset_peak(device)
    stamps: list[float] = []

    def before_step(step: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    steps = 4 if smoke else 24
    loader = _loader(cfg, work / "paper", 0, device.type == "cuda")
    stats = train_one_epoch(state.model, state.criterion, loader, state.optimizer, device, amp=True,
                            scaler=state.scaler, max_steps=steps, clip_max_norm=cfg.train.clip_max_norm,
                            before_step=before_step)  # fmt: skip
    gaps = np.diff(stamps[2:]) if len(stamps) > 3 else np.diff(stamps)
    return {"steps": stats.steps, "s_per_step_median": float(np.median(gaps)), "peak_gib": peak_gib(device),
            "loss": stats.losses.get("loss"), "data_wait_fraction": stats.data_wait_fraction,
            "input_frames": frames, "multiscale": list(cfg.data.multiscale), "max_size": cfg.data.max_size}


def postprocess(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    frames, slots, size = (4, 3, (64, 96)) if smoke else (36, 10, (300, 540))
    logits = torch.randn(frames * slots, 42)
    masks = torch.randn(frames * slots, size[0] // 4, size[1] // 4)
    rows = []
    for where in ("cpu", str(device)) if device.type == "cuda" else ("cpu",):
        dev = torch.device(where)
        inputs = (logits.to(dev), masks.to(dev))
        times = timed(lambda inputs=inputs: clip_tracks(*inputs, slots, size), dev, warmup=2, repeats=10)
        rows.append({"inputs_on": where, "seconds_median": float(np.median(times)), "clip": f"{frames}x{slots} to {size}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script itself")
    parser.add_argument("--sections", default="parity,forward,postprocess,train_tiny,train_paper")
    parser.add_argument("--commit", help="git commit of the tree (the device copy has no .git)")
    args = parser.parse_args()
    device = resolve_device("auto")
    report: dict[str, Any] = {"machine": machine(), "device": str(device), "commit": args.commit,
                              "bf16_supported": device.type == "cuda" and torch.cuda.is_bf16_supported()}
    args.out.mkdir(parents=True, exist_ok=True)
    sections = {"parity": lambda w: parity(device, args.smoke), "forward": lambda w: forward(device, args.smoke),
                "postprocess": lambda w: postprocess(device, args.smoke),
                "train_tiny": lambda w: train_tiny(device, args.smoke, w),
                "train_paper": lambda w: train_paper(device, args.smoke, w)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vistr-gpu-check-") as work:
        for name in args.sections.split(","):
            start = time.perf_counter()
            try:
                report[name] = sections[name](Path(work))
            except Exception:  # noqa: BLE001 - recorded: one broken section must not hide the rest
                report[name] = {"error": traceback.format_exc()}
            print(f"== {name} ({time.perf_counter() - start:.1f} s)\n{json.dumps(report[name], indent=1, default=str)}",
                  flush=True)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
