"""Cost and gain of ``AccurateGroupNorm`` (issue 24): paper_r50 forward at 300×540 with the careful
channels-last GroupNorm and with PyTorch's own kernel, side by side in one process.

Speed: the optimized paper_r50 model (``optimize_for_inference``, as ``benchmarks.forward``) at
300×540, T=36, fp32, timed alternately with the careful path on and off (off = the threshold
``CAREFUL_MIN_GROUP_SIZE`` raised past every group, so every GroupNorm takes ``F.group_norm``),
recording wall and process CPU time and the 1-minute load average after each run: the machine
is shared, and alternating keeps both arms under the same load.

Precision: the 3-D instance-sequence head (official widths 24 -> 12, one slot) on paper-size
mask features, fp32 against the same head in float64, with each GroupNorm path.

The 3-D head alone (10 slots, T=36, 300×540) is timed the same way; ``--no-forward`` skips the
full model, which takes minutes per run on a busy shared machine.

Run: ``python -m benchmarks.mask_head_precision [--repeats 2] [--no-forward]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

import vistr.models.group_norm as group_norm
from benchmarks.common import add_provenance_arguments, print_table, require_clean_tree, write_results
from vistr.config import load_config
from vistr.models import build_model
from vistr.models.inference_opt import optimize_for_inference
from vistr.models.segmentation import apply_sequence_head, instance_sequence_head

ARMS = {"careful": group_norm.CAREFUL_MIN_GROUP_SIZE, "pytorch_kernel": 1 << 62}


def time_forward(repeats: int, height: int, width: int) -> dict[str, Any]:
    cfg = load_config("paper_r50").model
    torch.manual_seed(0)
    model = build_model(cfg, train_backbone=False).eval()
    torch.nn.init.normal_(model.mask_head.conv_offset.weight, std=0.05)
    model = optimize_for_inference(model)
    clip = torch.randn(cfg.num_frames, 3, height, width)
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with torch.inference_mode():
        model(clip)  # warm-up
        for _ in range(repeats):
            for arm, threshold in ARMS.items():
                group_norm.CAREFUL_MIN_GROUP_SIZE = threshold
                wall0, cpu0 = time.perf_counter(), time.process_time()
                model(clip)
                runs[arm].append(
                    {
                        "wall_s": time.perf_counter() - wall0,
                        "cpu_s": time.process_time() - cpu0,
                        "loadavg_1min_after": os.getloadavg()[0],
                    }
                )
    group_norm.CAREFUL_MIN_GROUP_SIZE = ARMS["careful"]
    return {"frames": cfg.num_frames, "height": height, "width": width, **_summary(runs)}


def time_head(repeats: int, frames: int, slots: int, height: int, width: int) -> dict[str, Any]:
    """The 3-D head alone on paper-size input (all slots at once), arms alternating: the part
    of the forward that the GroupNorm choice changes, timed where a full forward is too slow."""
    torch.manual_seed(2)
    head = instance_sequence_head(24, 12).eval()
    feats = torch.relu(torch.randn(frames * slots, 24, height // 4, width // 4))
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with torch.inference_mode():
        apply_sequence_head(head, feats, 1, frames, True)  # warm-up
        for _ in range(repeats):
            for arm, threshold in ARMS.items():
                group_norm.CAREFUL_MIN_GROUP_SIZE = threshold
                wall0, cpu0 = time.perf_counter(), time.process_time()
                apply_sequence_head(head, feats, 1, frames, True)
                runs[arm].append(
                    {
                        "wall_s": time.perf_counter() - wall0,
                        "cpu_s": time.process_time() - cpu0,
                        "loadavg_1min_after": os.getloadavg()[0],
                    }
                )
    group_norm.CAREFUL_MIN_GROUP_SIZE = ARMS["careful"]
    return {"frames": frames, "slots": slots, "height": height, "width": width, **_summary(runs)}


def _summary(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    return {
        arm: {
            "wall_s_median": statistics.median(r["wall_s"] for r in rs),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in rs),
            "runs": rs,
        }
        for arm, rs in runs.items()
    }


def head_errors(frames: int, height: int, width: int) -> dict[str, Any]:
    """Relative error of the fp32 3-D head's mask logits against float64, per GroupNorm path."""
    torch.manual_seed(1)
    head = instance_sequence_head(24, 12)
    feats = torch.relu(torch.randn(frames, 24, height // 4, width // 4))
    with torch.no_grad():
        want = apply_sequence_head(head.double(), feats.double(), 1, frames, True)
        head.float()
        errors = {}
        for arm, threshold in ARMS.items():
            group_norm.CAREFUL_MIN_GROUP_SIZE = threshold
            got = apply_sequence_head(head, feats, 1, frames, True).double()
            errors[arm] = ((got - want).norm() / want.norm()).item()
    group_norm.CAREFUL_MIN_GROUP_SIZE = ARMS["careful"]
    return {"frames": frames, "height": height, "width": width, "rel_err_vs_float64": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-forward", action="store_true", help="skip the full-model timing (minutes)")
    add_provenance_arguments(parser)
    args = parser.parse_args()
    require_clean_tree(args.allow_dirty)
    errors = [head_errors(36, 300, 540), head_errors(16, 480, 864)]
    for row in errors:
        print(row)
    results: dict[str, Any] = {"head_3d_precision": errors}
    results["head_3d_300x540"] = time_head(args.repeats, 36, 10, 300, 540)
    if not args.no_forward:
        results["forward_300x540"] = time_forward(args.repeats, 300, 540)
    for name in ("head_3d_300x540", "forward_300x540"):
        if name in results:
            rows = [{"arm": arm, "wall_s": results[name][arm]["wall_s_median"],
                     "cpu_s": results[name][arm]["cpu_s_median"]} for arm in ARMS]  # fmt: skip
            print_table(f"{name}, T=36 (alternating arms)", rows)
    path = write_results("mask_head_precision", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
