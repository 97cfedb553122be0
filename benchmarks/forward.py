"""Inference speed of VisTR on this CPU: frames/s, peak memory, per-component time and GFLOP/s.

Cases: ``paper_r50`` at 300×540 (T=36, the paper's test size), the same model at 64×96 (the size
of the official reference outputs) and ``tiny_cpu``. Each case runs in its own process so its
peak RSS is its own. fp32, ``torch.inference_mode()``, random weights (speed does not depend on
weight values; the DCN offsets are made non-zero so its sampling is exercised like a trained
model's), timed on ``optimize_for_inference(model)`` (folded FrozenBN, channels-last backbone).

Per component (forward hooks): backbone (+ input_proj), transformer encoder, decoder, mask
branch (attention map + mask head, DCN included) and the 3-D instance-sequence head; the DCN
alone is timed by wrapping ``deform_conv2d``. FLOPs come from ``FlopCounterMode`` on a separate
pass (it needs autograd-free parameters; see ``count_flops``) plus the DCN's analytic count, which
the counter cannot see: conv 2·Cin·k²·Cout·Ho·Wo·N plus bilinear sampling 7·Cin·k²·Ho·Wo·N.
These are the FLOPs the model executes: the mask head's split ``lay1`` does 8.4x fewer than the
official concatenated one (see ``MaskHeadSmallConv._lay1``).

Also times our CPU DCN against ``torchvision.ops.deform_conv2d``, forward and forward+backward,
on one chunk of frames at the 300×540 mask-head shape ([20, 48, 75, 135] → 24 channels) and at
the tiny_cpu training shape ([48, 16, 16, 22] → 16).

Run: ``python -m benchmarks.forward [--cases tiny_cpu,paper_r50@64x96,paper_r50@300x540]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torchvision.ops import deform_conv2d as tv_deform_conv2d

import vistr.models.segmentation as segmentation
from benchmarks.common import peak_rss_mb, print_table, run_isolated, write_results
from vistr.config import load_config
from vistr.models import build_model
from vistr.models.deform_conv import deform_conv2d
from vistr.models.inference_opt import optimize_for_inference

# Official code's forward time on a 2-core CPU of this kind with torchvision's CPU DCN (issue 2).
OFFICIAL_SECONDS = {"paper_r50@300x540": 87.0, "paper_r50@64x96": 2.8}
TARGET_SPEEDUP = 2.5
DEFAULT_CASES = ("tiny_cpu", "paper_r50@64x96", "paper_r50@300x540")
COMPONENTS = {  # report name -> module paths inside VisTR
    "backbone": ("vistr.backbone", "vistr.input_proj"),
    "encoder": ("vistr.transformer.encoder",),
    "decoder": ("vistr.transformer.decoder",),
    "mask_branch": ("bbox_attention", "mask_head"),
    "head_3d": ("insmask_head",),
}


def parse_case(case: str) -> tuple[str, int | None, int | None]:
    """``preset`` or ``preset@HxW``; without a size the preset's test size is used."""
    preset, _, size = case.partition("@")
    if not size:
        return preset, None, None
    try:
        h, w = (int(v) for v in size.split("x"))
    except ValueError:
        raise ValueError(f"case {case!r}: size must look like 300x540") from None
    return preset, h, w


def dcn_flops(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> int:
    """Nominal DCN FLOPs: the convolution GEMM plus 7 FLOPs per bilinear sample (4 mul, 3 add)."""
    n, cin = x.shape[:2]
    cout, _, kh, kw = weight.shape
    positions = n * out.shape[-2] * out.shape[-1]
    return 2 * cin * kh * kw * cout * positions + 7 * cin * kh * kw * positions


def _clocks() -> tuple[float, float]:
    """(wall, process CPU) seconds. CPU time is recorded too because on a shared machine the wall
    time mostly measures the other tenants; CPU time (all threads) is far less load-dependent."""
    return time.perf_counter(), time.process_time()


class ComponentTimer:
    """Accumulates wall and CPU time per component with forward pre/post hooks; times the DCN calls."""

    def __init__(self, model: torch.nn.Module):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, tuple[float, float]] = {}
        modules = dict(model.named_modules())
        for name, paths in COMPONENTS.items():
            for path in paths:
                modules[path].register_forward_pre_hook(self._pre(name))
                modules[path].register_forward_hook(self._post(name))

    def _pre(self, name: str) -> Callable:
        def hook(*_: Any) -> None:
            self._start[name] = _clocks()

        return hook

    def _post(self, name: str) -> Callable:
        def hook(*_: Any) -> None:
            (wall, cpu), (wall0, cpu0) = _clocks(), self._start.pop(name)
            self.seconds[name] += wall - wall0
            self.cpu_seconds[name] += cpu - cpu0

        return hook

    def timed_dcn(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        wall0, cpu0 = _clocks()
        out = deform_conv2d(*args, **kwargs)
        wall, cpu = _clocks()
        self.seconds["dcn"] += wall - wall0
        self.cpu_seconds["dcn"] += cpu - cpu0
        return out


def _sdpa_cpu_flops(query, key, value, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def count_flops(model: torch.nn.Module, clip: torch.Tensor) -> dict[str, int]:
    """FLOPs per component from one ``FlopCounterMode`` pass with the DCN stubbed out.

    The counter's module tracker breaks on parameters that require grad under no_grad, so they
    are frozen for this pass. The DCN is replaced by a zero-output stub that records its analytic
    count (the counter would see only part of it), which also keeps this pass cheap.
    """
    model.requires_grad_(False)
    dcn_total = 0

    def stub(x, offset, weight, bias=None, stride=1, padding=0, dilation=1):  # noqa: ANN001
        nonlocal dcn_total
        out = x.new_zeros(x.shape[0], weight.shape[0], *offset.shape[-2:])
        dcn_total += dcn_flops(x, weight, out)
        return out

    segmentation.deform_conv2d = stub
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    try:
        with torch.no_grad(), FlopCounterMode(display=False, depth=None, custom_mapping=mapping) as counter:
            model(clip)
    finally:
        segmentation.deform_conv2d = deform_conv2d
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    flops = {name: sum(by_module.get(f"{root}.{p}", 0) for p in paths) for name, paths in COMPONENTS.items()}
    flops["mask_branch"] += dcn_total
    flops["dcn"] = dcn_total
    flops["total"] = by_module.get(root, 0) + dcn_total
    return flops


def measure_case(case: str, repeats: int) -> dict[str, Any]:
    """One case, in this process: forward time, per-component split, FLOPs and peak RSS."""
    preset, h, w = parse_case(case)
    cfg = load_config(preset)
    h = h or cfg.data.test_min_size
    w = w or (cfg.data.test_max_size or h)
    frames = cfg.model.num_frames
    torch.manual_seed(0)
    model = build_model(cfg.model, train_backbone=False).eval()
    torch.nn.init.normal_(model.mask_head.conv_offset.weight, std=0.05)  # non-zero offsets, as when trained
    model = optimize_for_inference(model)  # folded FrozenBN, channels-last backbone
    clip = torch.randn(frames, 3, h, w)

    timer = ComponentTimer(model)
    segmentation.deform_conv2d = timer.timed_dcn
    totals, cpu_totals, splits, cpu_splits, loads = [], [], [], [], []
    with torch.inference_mode():
        for i in range(repeats + (1 if repeats > 1 else 0)):  # one warm-up when repeating
            timer.seconds.clear()
            timer.cpu_seconds.clear()
            wall0, cpu0 = _clocks()
            model(clip)
            wall, cpu = _clocks()
            if repeats == 1 or i > 0:
                totals.append(wall - wall0)
                cpu_totals.append(cpu - cpu0)
                splits.append(dict(timer.seconds))
                cpu_splits.append(dict(timer.cpu_seconds))
                loads.append(os.getloadavg()[0])
    segmentation.deform_conv2d = deform_conv2d
    peak = peak_rss_mb()
    best = min(range(len(totals)), key=totals.__getitem__)
    flops = count_flops(model, clip)

    seconds, cpu_seconds = dict(splits[best]), dict(cpu_splits[best])
    seconds["total"], cpu_seconds["total"] = totals[best], cpu_totals[best]
    seconds["other"] = totals[best] - sum(seconds[c] for c in COMPONENTS)
    cpu_seconds["other"] = cpu_totals[best] - sum(cpu_seconds[c] for c in COMPONENTS)
    components = {
        name: {
            "seconds": seconds[name],
            "cpu_seconds": cpu_seconds[name],
            "share": seconds[name] / totals[best],
            "gflop": flops[name] / 1e9 if name in flops else None,
            "gflops_per_s": flops[name] / 1e9 / seconds[name]
            if name in flops and seconds[name] > 0
            else None,
        }
        for name in (*COMPONENTS, "dcn", "other", "total")
    }
    official = OFFICIAL_SECONDS.get(case)
    return {
        "case": case,
        "preset": preset,
        "frames": frames,
        "height": h,
        "width": w,
        "seconds_all_runs": totals,
        "seconds_median": statistics.median(totals),
        "seconds_best": totals[best],
        "cpu_seconds_all_runs": cpu_totals,
        "loadavg_1min_after_each_run": loads,
        "frames_per_s": frames / totals[best],
        "peak_rss_mb": peak,
        "official_seconds": official,
        "speedup_vs_official": official / totals[best] if official else None,
        "meets_target": (official / totals[best] >= TARGET_SPEEDUP) if official else None,
        "components": components,
    }


DCN_SHAPES = {  # name -> (input [N, Cin, H, W], Cout)
    "300x540 chunk": ((20, 48, 75, 135), 24),  # 2 frames x 10 slots of the 300x540 mask head
    "tiny_cpu": ((48, 16, 16, 22), 16),  # tiny_cpu training: 2 clips x 6 frames x 4 slots, 64x88 crops
}


def dcn_standalone(repeats: int = 2) -> list[dict[str, Any]]:
    """Our DCN vs torchvision's, forward and forward+backward (all four gradients), fp32.

    Timed with the default thread count and with one thread: single-threaded CPU time is the
    comparison that survives a busy shared machine. torchvision is timed once per row (it is
    the slow baseline; its backward alone takes ~10 s on the 300x540 chunk).
    """
    threads = torch.get_num_threads()
    rows = []
    try:
        for n in dict.fromkeys((threads, 1)):
            torch.set_num_threads(n)
            for name, (shape, cout) in DCN_SHAPES.items():
                rows += _dcn_rows(name, shape, cout, repeats)
    finally:
        torch.set_num_threads(threads)
    return rows


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(best wall s, best CPU s, last result) over ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall0, cpu0 = _clocks()
        result = fn()
        wall, cpu = _clocks()
        walls.append(wall - wall0)
        cpus.append(cpu - cpu0)
    return min(walls), min(cpus), result


def _dcn_rows(name: str, shape: tuple[int, ...], cout: int, repeats: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    offset = torch.randn(shape[0], 18, *shape[2:], generator=g) * 2
    weight = torch.randn(cout, shape[1], 3, 3, generator=g) * 0.05
    upstream = torch.randn(shape[0], cout, *shape[2:], generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight)]

    def forward(fn: Callable) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                return fn(x, offset, weight, padding=1)

        return run

    def train_step(fn: Callable) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            out = fn(*leaves, padding=1)
            return [out.detach(), *torch.autograd.grad(out, leaves, upstream)]

        return run

    rows, results = [], {}
    fwd_flops = dcn_flops(x, weight, upstream)
    for mode, make, flop_factor in (("forward", forward, 1), ("forward+backward", train_step, 3)):
        for impl, fn, reps in (("ours", deform_conv2d, repeats), ("torchvision", tv_deform_conv2d, 1)):
            wall, cpu, out = _timed(make(fn), reps)
            results[(mode, impl)] = out
            gflop = flop_factor * fwd_flops / 1e9  # backward ~2x forward (input and weight/offset)
            rows.append(
                {
                    "shape": f"{name} [{','.join(map(str, shape))}]->{cout}",
                    "mode": mode,
                    "impl": impl,
                    "threads": torch.get_num_threads(),
                    "seconds": wall,
                    "cpu_seconds": cpu,
                    "gflops_per_cpu_s": gflop / cpu,
                    "loadavg_1min": os.getloadavg()[0],
                }
            )
        ours, ref = results[(mode, "ours")], results[(mode, "torchvision")]
        pairs = [(ours, ref)] if mode == "forward" else list(zip(ours, ref, strict=True))
        rel = max(((a - b).norm() / b.norm()).item() for a, b in pairs)
        for row in rows[-2:]:
            row["speedup_vs_torchvision_cpu"] = rows[-1]["cpu_seconds"] / row["cpu_seconds"]
            row["max_rel_err_vs_torchvision"] = rel  # output and, for training, all gradients
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma list of preset[@HxW]")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per case below 300x540")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one case, print JSON
    parser.add_argument("--skip-dcn", action="store_true", help="skip the standalone DCN comparison")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's). With 1 the CPU time hardly depends on other tenants; "
        "results then go to forward_threads1.json",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure_case(args.worker, args.repeats)))
        return

    results: dict[str, Any] = {"cases": [], "dcn": []}
    for case in args.cases.split(","):
        _, h, _ = parse_case(case)
        repeats = 1 if (h or 0) >= 300 else args.repeats  # a 300×540 forward takes tens of seconds
        results["cases"].append(
            run_isolated(
                "benchmarks.forward",
                [
                    "--worker",
                    case,
                    "--repeats",
                    str(repeats),
                    *(["--threads", str(args.threads)] if args.threads else []),
                ],
            )
        )
    if not args.skip_dcn:
        results["dcn"] = dcn_standalone()
    name = f"forward_threads{args.threads}" if args.threads else "forward"
    path = write_results(name, results, {"dtype": "float32", "mode": "torch.inference_mode"})

    print_table(
        "VisTR forward (fp32, inference_mode)",
        [
            {
                "case": r["case"],
                "T": r["frames"],
                "s/clip": r["seconds_best"],
                "cpu s": r["cpu_seconds_all_runs"][r["seconds_all_runs"].index(r["seconds_best"])],
                "load": max(r["loadavg_1min_after_each_run"]),
                "frames/s": r["frames_per_s"],
                "peak MB": r["peak_rss_mb"],
                "official s": r["official_seconds"],
                "speedup": r["speedup_vs_official"],
            }
            for r in results["cases"]
        ],
    )
    for r in results["cases"]:
        print_table(
            f"{r['case']}: per component",
            [
                {
                    "component": k,
                    **{c: v[c] for c in ("seconds", "cpu_seconds", "share", "gflop", "gflops_per_s")},
                }
                for k, v in r["components"].items()
            ],
        )
    if results["dcn"]:
        print_table("DCN: ours vs torchvision (fp32)", results["dcn"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
