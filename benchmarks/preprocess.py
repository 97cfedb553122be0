"""Preprocessing throughput: source frames/second end to end with 1 and 2 Ray CPUs, bytes per clip
on disk, the 2-vs-1 CPU scaling ratio, and where the time goes (decode, targets, resize, encode, write).

    python benchmarks/preprocess.py [--videos 24] [--size 360x640] [--frames 16-24]

Each CPU count runs in a fresh process (one local Ray cluster per process) and builds the same
shards twice: ``cold`` (worker processes start and import torch) and ``warm`` (workers reused).
"End to end" is the wall time of ``run_preprocess`` after ``ray.init``: planning, Ray Data
scheduling, decoding and writing included. Stage times are summed over the shard tasks of the warm
runs; the largest is reported as the bottleneck. Results: ``benchmarks/results/preprocess.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, run_isolated, write_results  # noqa: E402

STAGES = ("decode", "targets", "resize", "encode", "write")


def measure(src: Path, out: Path, cpus: int, min_size: int, max_size: int, shard_mb: float) -> list[dict]:
    """A cold build (worker processes start and import torch) then a warm one on the same cluster."""
    import ray

    from pipelines.preprocess import run_preprocess
    from vistr.config import load_config

    cfg = load_config("tiny_cpu", {"data.min_size": min_size, "data.max_size": max_size})
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=cpus, log_to_driver=False)
    results = []
    for run in ("cold", "warm"):
        start = time.perf_counter()
        manifest = run_preprocess(cfg, src, out / run, splits=("train",), shard_mb=shard_mb)
        wall = time.perf_counter() - start
        stages = {s: sum(t.get(s, 0.0) for t in manifest["timings"].values()) for s in (*STAGES, "task")}
        frames, clips = _source_frames(src), sum(s["rows"] for s in manifest["shards"])
        results.append(
            {
                "cpus": cpus,
                "run": run,
                "num_frames": cfg.model.num_frames,
                "wall_s": wall,
                "source_frames": frames,
                "clips": clips,
                "shards": len(manifest["shards"]),
                "frames_per_s": frames / wall,
                "clip_frames_per_s": clips * cfg.model.num_frames / wall,
                "bytes_per_clip": sum(s["bytes"] for s in manifest["shards"]) / clips,
                "raw_frame_bytes_per_clip": cfg.model.num_frames
                * _stored_pixels(src, min_size, max_size)
                * 3,
                "stage_s": stages,
            }
        )
    ray.shutdown()
    return results


def _source_frames(src: Path) -> int:
    data = json.loads((src / "annotations/instances_train_sub.json").read_text())
    return sum(len(v["file_names"]) for v in data["videos"])


def _stored_pixels(src: Path, min_size: int, max_size: int) -> int:
    from vistr.data.transforms import resized_size

    video = json.loads((src / "annotations/instances_train_sub.json").read_text())["videos"][0]
    h, w = resized_size(video["height"], video["width"], min_size, max_size)
    return h * w


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--size", default="360x640", help="synthetic source frame size HxW")
    parser.add_argument("--frames", default="16-24", help="frames per video A-B")
    parser.add_argument("--min-size", type=int, default=180, help="training shorter side")
    parser.add_argument("--max-size", type=int, default=320, help="training longer-side cap")
    parser.add_argument("--shard-mb", type=float, default=16.0)
    parser.add_argument("--cpus", default="1,2")
    parser.add_argument("--measure", nargs=3, metavar=("SRC", "OUT", "CPUS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        src, out, cpus = args.measure
        print(
            json.dumps(measure(Path(src), Path(out), int(cpus), args.min_size, args.max_size, args.shard_mb))
        )
        return 0

    from vistr.data.synthetic import SynthSpec, generate_dataset

    h, w = (int(v) for v in args.size.lower().split("x"))
    lo, hi = (int(v) for v in args.frames.split("-"))
    work = Path(tempfile.mkdtemp(prefix="vistr-bench-pre-"))
    try:
        spec = SynthSpec(num_videos=args.videos, num_val_videos=1, frames=(lo, hi), size=(h, w), seed=0)
        generate_dataset(work / "data", spec, progress=False)
        rows = []
        for cpus in (int(c) for c in args.cpus.split(",")):
            common = [
                "--min-size",
                str(args.min_size),
                "--max-size",
                str(args.max_size),
                "--shard-mb",
                str(args.shard_mb),
            ]
            rows.extend(
                run_isolated(
                    "benchmarks.preprocess",
                    [*common, "--measure", str(work / "data"), str(work / f"out{cpus}"), str(cpus)],
                    timeout=1800,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fps = {(r["cpus"], r["run"]): r["frames_per_s"] for r in rows}
    scaling = {
        run: fps[(2, run)] / fps[(1, run)] for run in ("cold", "warm") if (1, run) in fps and (2, run) in fps
    }
    stage_totals = {s: sum(r["stage_s"][s] for r in rows if r["run"] == "warm") for s in STAGES}
    bottleneck = max(stage_totals, key=stage_totals.get)
    task_total = sum(r["stage_s"]["task"] for r in rows if r["run"] == "warm")
    path = write_results(
        "preprocess",
        rows,
        extra={
            "dataset": {
                "videos": args.videos,
                "size": [h, w],
                "frames": [lo, hi],
                "min_size": args.min_size,
                "max_size": args.max_size,
                "num_frames": rows[0]["num_frames"],
                "shard_mb": args.shard_mb,
            },
            "scaling_2_vs_1_cpu": scaling,
            "stage_share_of_task_time": {s: t / task_total for s, t in stage_totals.items()},
            "bottleneck": bottleneck,
        },
    )
    columns = (
        "cpus",
        "run",
        "wall_s",
        "source_frames",
        "frames_per_s",
        "clip_frames_per_s",
        "bytes_per_clip",
    )
    table = [
        {k: r[k] for k in columns} | {f"{s}_s": r["stage_s"][s] for s in (*STAGES, "task")} for r in rows
    ]
    print_table("vistr preprocess (synthetic, local Ray)", table)
    print(
        f"\nscaling 2 vs 1 CPU (frames/s ratio): {scaling}; bottleneck stage: {bottleneck} "
        f"({stage_totals[bottleneck] / task_total:.0%} of task time); results: {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
