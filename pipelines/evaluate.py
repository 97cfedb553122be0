"""``vistr evaluate``: a model's video AP/AR on a dataset split, inference distributed with Ray Data.

One row per video (its id and frame files) flows through ``map_batches`` with a callable class:
Ray keeps a pool of actors, each of which loads the model once and then runs the same streaming
long-video inference as ``vistr predict`` (:func:`vistr.predict.predict_stream`) on one video at
a time. Actors ask for a GPU each where the cluster has GPUs and a CPU each otherwise. The model
file is read once by the driver and shipped through the object store, so workers on other nodes
need no shared filesystem or MLflow access. The driver gathers the results JSON (sorted by
video), runs the project's evaluator and, given ``--mlflow-run``, logs metrics and artifacts there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.model_source import local_checkpoint

SPLIT_ALIASES = {"valid": "val", "val": "val", "validation": "val", "train": "train"}


def split_rows(data_dir: str | Path, split: str, data_cfg: Any) -> tuple[Path, list[dict[str, Any]]]:
    """(annotation file, one row per video with its frame files) for ``split`` of ``data_dir``."""
    from vistr.data.ytvis import YTVIS

    if split not in SPLIT_ALIASES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_ALIASES)}")
    kind = SPLIT_ALIASES[split]
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"--data {root}: dataset directory not found")
    ann = root / (data_cfg.val_ann if kind == "val" else data_cfg.train_ann)
    frames_root = root / (data_cfg.val_frames if kind == "val" else data_cfg.train_frames)
    dataset = YTVIS.load(ann, frames_root)
    rows = [{"video_id": vid, "frames": json.dumps([str(frames_root / f) for f in video.file_names])}
            for vid, video in sorted(dataset.videos.items())]
    if not rows:
        raise ValueError(f"{ann}: the split has no videos")
    return ann, rows


class VideoInference:
    """The Ray Data actor: loads the model once, then turns rows (videos) into results JSON."""

    def __init__(self, checkpoint: list, window: int | None, overlap: int | None, min_iou: float,
                 device: str) -> None:
        import ray

        from vistr.inference import ClipPredictor
        from vistr.predict import default_overlap, load_inference_model

        payload = ray.get(checkpoint[0])  # wrapped in a list so Ray hands over the ref, not bytes
        with tempfile.NamedTemporaryFile(suffix=".pt") as f:
            f.write(payload)
            f.flush()
            model, cfg = load_inference_model(f.name, window)
        self.predictor = ClipPredictor(model, cfg, device)
        self.overlap = default_overlap(self.predictor.num_frames) if overlap is None else overlap
        self.min_iou = min_iou

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vistr.data.video_io import read_image
        from vistr.predict import predict_stream

        results = []
        for video_id, frames in zip(batch["video_id"], batch["frames"], strict=True):
            files = json.loads(frames)
            stitcher = predict_stream(self.predictor, map(read_image, files), len(files), self.overlap, self.min_iou)
            results.append(json.dumps(stitcher.results(int(video_id))))
        return {"video_id": np.asarray(batch["video_id"]), "results": np.asarray(results, dtype=object)}


def infer_split(rows: list[dict[str, Any]], checkpoint: bytes, window: int | None = None,
                overlap: int | None = None, min_iou: float = 0.5, num_actors: int | None = None) -> list[dict]:
    """Results entries of every video of ``rows``, ordered by video id (Ray must be initialised)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = num_actors or max(1, min(len(rows), gpus or cpus))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    ds = ray.data.from_items(rows).map_batches(
        VideoInference,
        fn_constructor_kwargs={"checkpoint": [ray.put(checkpoint)], "window": window, "overlap": overlap,
                               "min_iou": min_iou, "device": "cuda" if gpus else "cpu"},
        batch_size=1,
        concurrency=actors,
        **resources,
    )
    per_video = sorted(ds.take_all(), key=lambda row: int(row["video_id"]))
    return [entry for row in per_video for entry in json.loads(row["results"])]


def log_to_mlflow(run_id: str, metrics: dict[str, float], split: str, files: list[Path],
                  tracking_uri: str | None = None) -> None:
    """Metrics as ``{split}_{stat}`` (e.g. ``val_AP``) and the results/metrics files as artifacts."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"{split}_{k}": float(v) for k, v in metrics.items()})
        for file in files:
            mlflow.log_artifact(str(file), artifact_path="evaluation")


def evaluate_model(model: str | None, data_dir: str | Path, split: str = "valid", out: str | Path | None = None,
                   address: str | None = None, num_actors: int | None = None, window: int | None = None,
                   overlap: int | None = None, min_iou: float = 0.5, mlflow_run: str | None = None,
                   tracking_uri: str | None = None, num_cpus: int | None = None) -> dict[str, float]:
    """Infer ``split`` with Ray Data, write ``results_{split}.json`` + ``metrics_{split}.json``, evaluate."""
    from pipelines.ray_runtime import connect
    from vistr.evaluation import evaluate
    from vistr.predict import load_model_file

    with local_checkpoint(model, tracking_uri=tracking_uri) as path:
        _, cfg = load_model_file(path, window)  # refuse a bad file before any cluster starts
        checkpoint = path.read_bytes()
    ann, rows = split_rows(data_dir, split, cfg.data)
    out = Path(out or Path("evaluations") / Path(data_dir).name)
    out.mkdir(parents=True, exist_ok=True)
    started = connect(address, num_cpus)
    try:
        results = infer_split(rows, checkpoint, window, overlap, min_iou, num_actors)
    finally:
        if started:
            import ray

            ray.shutdown()
    name = SPLIT_ALIASES[split]
    results_file, metrics_file = out / f"results_{name}.json", out / f"metrics_{name}.json"
    results_file.write_text(json.dumps(results))
    metrics = evaluate(ann, results)
    metrics_file.write_text(json.dumps(metrics, indent=1))
    if mlflow_run:
        log_to_mlflow(mlflow_run, metrics, name, [results_file, metrics_file], tracking_uri)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint file, runs:/... or models:/NAME@ALIAS (default: the champion)")
    parser.add_argument("--data", required=True, help="dataset directory (YouTube-VIS layout of the model's config)")
    parser.add_argument("--split", default="valid", help="valid (default) or train")
    parser.add_argument("--out", type=Path, help="folder for results/metrics JSON (default: evaluations/<data>)")
    parser.add_argument("--address", help="Ray cluster: 'auto', host:port or ray://host:port (default: local)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local cluster started without --address")
    parser.add_argument("--num-actors", type=int, help="inference actors (default: one per GPU, else per CPU)")
    parser.add_argument("--window", type=int, help="T (only for official checkpoints; default 36)")
    parser.add_argument("--overlap", type=int, help="frames shared by consecutive windows (default T/6)")
    parser.add_argument("--min-iou", type=float, default=0.5, help="mask IoU needed to link windows' instances")
    parser.add_argument("--mlflow-run", help="log metrics and results to this MLflow run id")
    parser.add_argument("--tracking-uri", help="MLflow tracking server")


def run(args: argparse.Namespace) -> int:
    from vistr.evaluation import STAT_NAMES

    try:
        metrics = evaluate_model(args.model, args.data, args.split, args.out, args.address, args.num_actors,
                                 args.window, args.overlap, args.min_iou, args.mlflow_run, args.tracking_uri,
                                 args.num_cpus)
    except (ValueError, OSError) as exc:
        print(f"vistr evaluate: error: {exc}", file=sys.stderr)
        return 1
    for name in STAT_NAMES:
        print(f"{name:>6} {metrics[name]:.4f}")
    return 0
