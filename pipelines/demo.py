"""``vistr demo``: the embedded default main job, end to end on this machine in minutes.

Synthetic YouTube-VIS-format data -> ``vistr workflow`` on one local Ray cluster (Ray Data shards,
Ray Train DDP on CPU workers, Ray Data evaluation on the held-out split, registration in a local
sqlite MLflow registry, promotion of the champion) -> ``vistr predict`` with
``models:/vistr@champion`` on one held-out mp4 (overlay video, contact sheet, results JSON).
Running it again reuses every finished workflow step (same data and settings).
"""

from __future__ import annotations

import argparse
import sys
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
    print(f"\n[{number}/3] {text}", flush=True)
    return time.monotonic()


def run(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from pipelines.model_source import load_model
    from pipelines.ray_runtime import connect
    from pipelines.workflow import WorkflowError, run_workflow
    from vistr.config import load_config, save_config
    from vistr.data.synthetic import SynthSpec, generate_dataset
    from vistr.predict import predict_video

    out = args.out.resolve()
    cfg = load_config(args.config, overrides={"train.max_minutes": args.minutes, "train.epochs": 1000,
                                              "train.num_workers": args.workers})  # fmt: skip
    cfg = cfg.with_overrides({"tracking.tracking_uri": f"sqlite:///{out / 'mlflow.db'}"})
    config_file = save_config(cfg, out / "demo_config.yaml")  # what `vistr workflow --status` needs
    started = time.monotonic()

    t = _stage(1, f"synthetic dataset: {args.videos} train + {args.val_videos} held-out videos")
    data = out / "data"
    spec = SynthSpec(num_videos=args.videos, num_val_videos=args.val_videos, seed=args.seed, video_files=True)
    if not (data / "annotations" / "instances_val_sub.json").is_file():
        generate_dataset(data, spec)
    print(f"    {data} ({time.monotonic() - t:.0f}s)")

    t = _stage(2, f"workflow: preprocess -> train {args.config} for {args.minutes:g} min with {args.workers} "
                  "Ray Train workers -> evaluate -> register -> promote")  # fmt: skip
    ray_started = connect(num_cpus=args.workers + 1, worker_logs=False)  # progress is printed here
    try:
        results = run_workflow(cfg, data, out / "workflow", config_name=f"demo-{Path(args.config).stem}",
                               progress=lambda line: print("    " + line, flush=True))  # fmt: skip
    except WorkflowError as exc:
        print(f"vistr demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    metrics, decision = results["evaluate"]["metrics"], results["promote"]["decision"]
    name, version = results["register"]["model"], results["register"]["version"]
    print(f"    held-out AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  AR10 {metrics['AR10']:.3f}; "
          f"{name} v{version}: {'champion' if decision['promoted'] else 'not promoted'} ({decision['reason']}) "
          f"({time.monotonic() - t:.0f}s)")  # fmt: skip

    champion = f"models:/{name}@champion"
    t = _stage(3, f"predict {champion} on a held-out mp4 (overlay video + contact sheet)")
    video = sorted((data / "valid" / "videos").glob("*.mp4"))[0]
    model, model_cfg, _ = load_model(champion, tracking_uri=cfg.tracking.tracking_uri)
    champion_version = MlflowClient(cfg.tracking.tracking_uri).get_model_version_by_alias(name, "champion").version
    paths = predict_video(video, model, model_cfg, out / "predict")
    print(f"    {paths['overlay']} ({time.monotonic() - t:.0f}s)")

    print(
        f"\nDone in {(time.monotonic() - started) / 60:.1f} min. Held-out AP {metrics['AP']:.3f} "
        f"(AP50 {metrics['AP50']:.3f}); champion: {name} version {champion_version}.\n"
        f"  overlay video : {paths['overlay']}\n"
        f"  contact sheet : {paths['sheet']}\n"
        f"  results JSON  : {paths['results']}\n"
        f"  workflow      : vistr workflow {config_file} --data {data} --out {out / 'workflow'} --status\n"
        f"  MLflow UI     : mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}"
    )
    return 0
