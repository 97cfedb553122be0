"""Quick single-process probe of a training config: N minutes of ``fit`` on one core, then video AP.

The 15-minute Ray benchmark (``benchmarks/learn.py``) is too slow to compare many settings; this
trains ``tiny_cpu`` plus overrides in one process (``vistr.trainer.fit``, no Ray, no MLflow) on a
synthetic dataset and scores the final checkpoint on the first 16 train and validation videos
with the product's inference path (sliding windows + stitching, ``vistr.predict.predict_stream``)
and the project's evaluator. Appends one JSON line per probe to
``benchmarks/results/learn_probes.jsonl`` (see ``learn_probes.md`` for what was learned).

    OMP_NUM_THREADS=1 python -m benchmarks.learn_probe NAME --minutes 8 --size 64 --train-videos 96 \\
        --set model.dilation=true --set data.augment=false
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR
from vistr.checkpoint import model_from_checkpoint
from vistr.config import load_config, parse_overrides
from vistr.data.synthetic import SynthSpec, generate_dataset
from vistr.data.video_io import read_image
from vistr.evaluation import evaluate
from vistr.inference import ClipPredictor
from vistr.predict import default_overlap, predict_stream
from vistr.trainer import fit

SPLITS = {"train": ("instances_train_sub.json", "train/JPEGImages"),
          "valid": ("instances_val_sub.json", "valid/JPEGImages")}


def score_split(predictor: ClipPredictor, root: Path, split: str, out: Path, videos: int = 16) -> dict[str, float]:
    """AP/AP50 of the first ``videos`` videos of ``split`` (their ground truth written to ``out``)."""
    ann, frames_dir = SPLITS[split]
    gt = json.loads((root / "annotations" / ann).read_text())
    gt["videos"] = gt["videos"][:videos]
    keep = {v["id"] for v in gt["videos"]}
    gt["annotations"] = [a for a in gt["annotations"] if a["video_id"] in keep]
    gt_path = out / f"gt_{split}.json"
    gt_path.write_text(json.dumps(gt))
    results = []
    for video in gt["videos"]:
        files = [root / frames_dir / name for name in video["file_names"]]
        stitcher = predict_stream(predictor, map(read_image, files), len(files), default_overlap(predictor.num_frames))
        results += stitcher.results(video["id"])
    stats = evaluate(gt_path, results)
    return {"AP": round(stats["AP"], 4), "AP50": round(stats["AP50"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=64, help="square frame side of the synthetic videos")
    parser.add_argument("--train-videos", type=int, default=96)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vistr-learn-probe"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    root = args.work / f"data{args.size}_{args.train_videos}"
    if not root.exists():
        spec = SynthSpec(num_videos=args.train_videos, num_val_videos=16, size=(args.size, args.size), seed=0)
        generate_dataset(root, spec, progress=False)
    overrides = parse_overrides(args.overrides)
    cfg = load_config("tiny_cpu", {"train.max_minutes": args.minutes, "train.epochs": 10_000, **overrides})
    out = args.work / "runs" / args.name
    start = time.time()
    result = fit(cfg, root, out, resume=False)
    model, cfg = model_from_checkpoint(result.checkpoint)
    predictor = ClipPredictor(model.eval(), cfg)
    last = result.history[-1]
    row = {
        "name": args.name, "size": args.size, "train_videos": args.train_videos, "overrides": overrides,
        "steps": result.global_step, "wall_s": round(time.time() - start),
        **{split: score_split(predictor, root, split, out) for split in SPLITS},
        "final_epoch_losses": {k.removeprefix("epoch/"): round(v, 3) for k, v in last.items()
                               if k in ("epoch/loss", "epoch/loss_dice", "epoch/loss_giou", "epoch/class_error")},
    }  # fmt: skip
    print(json.dumps(row))
    with open(RESULTS_DIR / "learn_probes.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
