"""It learns, end to end: synthetic dataset -> `vistr preprocess` shards -> `vistr train` (Ray Train,
2 DDP workers, MLflow) for a fixed wall-clock budget -> video AP/AR on the held-out split.

    python benchmarks/learn.py [--minutes 15] [--workers 2] [--work DIR] [--set KEY=VALUE ...] [--name NAME]

The dataset is a pure function of the seed (default 48 train / 16 validation videos, 64x64,
6-12 frames). Training runs ``tiny_cpu`` with ``train.max_minutes = --minutes`` and validates every
epoch, so MLflow's ``val_AP`` history (with wall-clock timestamps) is the learning curve: AP
against minutes of training. The final numbers come from re-evaluating the final checkpoint in
this process with the same protocol (official inference clip of each validation video, official
evaluator), which also checks that the checkpoint reproduces what the workers measured.
Targets: AP >= 0.5, AP50 >= 0.8. Writes ``benchmarks/results/NAME.json`` and ``NAME_curve.png`` (NAME: learn).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, print_table, write_results  # noqa: E402

TARGETS = {"AP": 0.5, "AP50": 0.8}
REPORTED = ("AP", "AP50", "AP75", "AR1", "AR10")


def build_data(work: Path, args: argparse.Namespace, cfg) -> Path:
    """The synthetic dataset and its shards (both reused when already complete in ``work``)."""
    from pipelines.preprocess import run_preprocess
    from vistr.data.synthetic import SynthSpec, generate_dataset

    spec = SynthSpec(num_videos=args.train_videos, num_val_videos=args.val_videos, frames=args.frames,
                     size=args.size, seed=args.seed)  # fmt: skip
    root = work / f"synth-{zlib.crc32(json.dumps(spec.__dict__, default=list).encode()):08x}"
    if not (root / "annotations" / "instances_val_sub.json").is_file():
        generate_dataset(root, spec, progress=False)
    shards = work / (root.name + "-shards")
    run_preprocess(cfg, root, shards, shard_mb=8.0)
    return shards


def final_eval(checkpoint: Path, shards: Path, cfg) -> dict[str, float]:
    """The official-protocol scores of ``checkpoint`` on the validation split, in this process."""
    import torch

    from pipelines.shards import load_manifest, shard_files
    from pipelines.train import CHECKPOINT_FILE, inference_clips
    from vistr.checkpoint import model_from_checkpoint
    from vistr.evaluation import evaluate
    from vistr.trainer import validate_clips

    model, _ = model_from_checkpoint(checkpoint / CHECKPOINT_FILE)
    gt = load_manifest(shards)["source"]["valid"]["annotation"]
    lengths = {v["id"]: v["length"] for v in json.loads(Path(gt).read_text())["videos"]}
    files = [str(f) for f in shard_files(shards, cfg, "valid")]
    clips = inference_clips(files, lengths, cfg.model.num_frames, set(lengths))
    results = validate_clips(model, clips, cfg.model.num_slots, torch.device("cpu"))
    return evaluate(gt, results, lenient=True)


def curve_points(client, run_id: str, start_ms: int) -> list[tuple[float, float]]:
    """(minutes since the first training step, val_AP) of every validation."""
    history = sorted(client.get_metric_history(run_id, "val_AP"), key=lambda m: m.timestamp)
    return [((m.timestamp - start_ms) / 60000, m.value) for m in history]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget in minutes (default 15)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--train-videos", type=int, default=48)
    parser.add_argument("--val-videos", type=int, default=16)
    parser.add_argument("--frames", type=lambda s: tuple(int(x) for x in s.split("-")), default=(6, 12))
    parser.add_argument("--size", type=lambda s: tuple(int(x) for x in s.lower().split("x")), default=(64, 64))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="working directory (default: a fresh temporary one)")
    parser.add_argument("--name", default="learn",
                        help="results name: benchmarks/results/NAME.json and NAME_curve.png (default learn)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override on top of tiny_cpu (repeatable), e.g. --set train.lr=1e-4")
    args = parser.parse_args(argv)

    from pipelines.ray_runtime import connect
    from pipelines.tracking import client_for, plot_curves
    from pipelines.train import train
    from vistr.config import load_config, parse_overrides

    work = args.work or Path(tempfile.mkdtemp(prefix="vistr-learn-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cfg = load_config("tiny_cpu", {
        "train.epochs": 10_000, "train.max_minutes": args.minutes, "train.validate_every": 1,
        "train.cpus_per_worker": 1.0, "tracking.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "data.shuffle_buffer": 256,  # each worker's whole half of the split (~20 MB): a full shuffle
        "tracking.experiment": "benchmark-learn", **parse_overrides(args.overrides),
    })  # fmt: skip
    connect(None, num_cpus=args.workers + 1)  # one logical CPU beyond the workers for Ray Data reads
    shards = build_data(work, args, cfg)
    train_start = time.time()
    outcome = train(cfg, shards, name=f"learn-{int(train_start)}", storage=str(work / "ray"),
                    num_workers=args.workers)  # fmt: skip
    train_wall = time.time() - train_start
    client = client_for(cfg.tracking.tracking_uri)
    first_step = min(m.timestamp for m in client.get_metric_history(outcome.run_id, "train/loss"))
    epochs = sorted(client.get_metric_history(outcome.run_id, "samples_per_s"), key=lambda m: m.step)
    waits = client.get_metric_history(outcome.run_id, "data_wait_fraction")
    stats = final_eval(Path(outcome.checkpoint), shards, cfg)
    curve = curve_points(client, outcome.run_id, first_step)
    results = {
        **{k: stats[k] for k in REPORTED},
        "wall_s": time.time() - started,
        "train_wall_s": train_wall,
        "budget_minutes": args.minutes,
        "steps": int(outcome.metrics["global_step"]),
        "epochs": len(epochs),
        "samples_per_s": args.workers * sum(m.value for m in epochs) / max(len(epochs), 1),
        "data_wait_fraction": sum(m.value for m in waits) / max(len(waits), 1),
        "worker_val_AP": outcome.metrics.get("val_AP"),
        "targets": TARGETS,
        "targets_met": all(stats[k] >= v for k, v in TARGETS.items()),
        "curve_minutes_val_AP": curve,
        # the latest validation at or before each mark (None: no validation finished by then)
        "val_AP_at_minutes": {m: max(((t, ap) for t, ap in curve if t <= m), default=(0, None))[1]
                              for m in (5, 10, 15, 30, 60) if m <= args.minutes + 1},
        "all_stats": stats,
    }
    plot_curves({"val AP": curve}, RESULTS_DIR / f"{args.name}_curve.png", "minutes of training", "video AP",
                f"tiny_cpu, {args.workers} workers, synthetic {args.train_videos}/{args.val_videos} videos")
    path = write_results(args.name, results, extra={"config": cfg.to_dict(), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})  # fmt: skip
    print_table("learning benchmark", [{k: results[k] for k in (*REPORTED, "steps", "epochs", "samples_per_s",
                                                                 "data_wait_fraction", "wall_s")}])  # fmt: skip
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
