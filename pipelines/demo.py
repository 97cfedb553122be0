"""``vistr demo``: the embedded default, end to end on this machine in a few minutes.

Synthetic YouTube-VIS-format data -> Ray Data shards -> Ray Train (DDP on CPU workers, tracked
in a local sqlite MLflow store) -> Ray Data evaluation on the held-out split -> ``vistr predict``
on one held-out mp4 (overlay video, contact sheet, results JSON). It uses the same stage
functions as the CLI commands, on one local Ray cluster started here and stopped at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_OUT = Path("runs") / "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget in minutes (default 6)")
    parser.add_argument("--videos", type=int, default=32, help="synthetic training videos (default 32)")
    parser.add_argument("--val-videos", type=int, default=8, help="synthetic held-out videos (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--config", default="tiny_cpu", help="config preset or YAML file (default tiny_cpu)")


def _stage(number: int, text: str) -> float:
    print(f"\n[{number}/5] {text}", flush=True)
    return time.monotonic()


def run(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate_model
    from pipelines.preprocess import run_preprocess
    from pipelines.ray_runtime import connect
    from pipelines.train import CHECKPOINT_FILE, train
    from vistr.config import load_config
    from vistr.data.synthetic import SynthSpec, generate_dataset
    from vistr.predict import load_model_file, predict_video

    out = args.out.resolve()
    cfg = load_config(args.config, overrides={"train.max_minutes": args.minutes, "train.epochs": 1000})
    cfg = cfg.with_overrides({"tracking.tracking_uri": f"sqlite:///{out / 'mlflow.db'}"})
    started = time.monotonic()

    t = _stage(1, f"synthetic dataset: {args.videos} train + {args.val_videos} held-out videos")
    data = out / "data"
    spec = SynthSpec(num_videos=args.videos, num_val_videos=args.val_videos, seed=args.seed, video_files=True)
    if not (data / "annotations" / "instances_val_sub.json").is_file():
        generate_dataset(data, spec)
    print(f"    {data} ({time.monotonic() - t:.0f}s)")

    ray_started = connect(num_cpus=args.workers + 1, worker_logs=False)  # progress is printed here
    try:
        t = _stage(2, "preprocess to Parquet clip shards (Ray Data)")
        shards = out / "shards"
        run_preprocess(cfg, data, shards, shard_mb=8.0)
        print(f"    {shards} ({time.monotonic() - t:.0f}s)")

        t = _stage(3, f"train {args.config} for {args.minutes:g} min with {args.workers} workers (Ray Train)")
        name = time.strftime("demo-%Y%m%d-%H%M%S")
        outcome = train(cfg, shards, name=name, storage=str(out / "ray"), num_workers=args.workers)
        if outcome.checkpoint is None:
            print("training produced no checkpoint", flush=True)
            return 1
        checkpoint = Path(outcome.checkpoint) / CHECKPOINT_FILE
        print(f"    MLflow run {outcome.run_id}, checkpoint {checkpoint} ({time.monotonic() - t:.0f}s)")

        t = _stage(4, "evaluate on the held-out split (Ray Data inference + YouTube-VIS AP)")
        metrics = evaluate_model(str(checkpoint), data, "valid", out=out / "evaluation",
                                 mlflow_run=outcome.run_id, tracking_uri=cfg.tracking.tracking_uri)
        print(f"    AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  AR10 {metrics['AR10']:.3f} "
              f"({time.monotonic() - t:.0f}s)")
    finally:
        if ray_started:
            import ray

            ray.shutdown()

    t = _stage(5, "predict on a held-out mp4 (overlay video + contact sheet)")
    video = sorted((data / "valid" / "videos").glob("*.mp4"))[0]
    model, model_cfg = load_model_file(checkpoint)
    paths = predict_video(video, model, model_cfg, out / "predict")
    print(f"    {paths['overlay']} ({time.monotonic() - t:.0f}s)")

    print(
        f"\nDone in {(time.monotonic() - started) / 60:.1f} min. Held-out AP {metrics['AP']:.3f} "
        f"(AP50 {metrics['AP50']:.3f}).\n"
        f"  overlay video : {paths['overlay']}\n"
        f"  contact sheet : {paths['sheet']}\n"
        f"  results JSON  : {paths['results']}\n"
        f"  metrics       : {out / 'evaluation'}\n"
        f"  MLflow UI     : mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}"
    )
    return 0
