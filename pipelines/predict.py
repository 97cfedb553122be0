"""``vistr predict``: one video (file or frame folder) through a model named by a local path or
an MLflow URI, written as results JSON, overlay video and contact sheet.

The work is ``vistr.predict.predict_video`` (pure PyTorch); this module adds what needs MLflow:
resolving ``runs:/`` and ``models:/`` URIs, and the registry champion as the default model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="video file (mp4/mov/webm/...) or folder of frame images")
    parser.add_argument("--model", help="checkpoint file (ours or official VisTR), runs:/RUN/... or "
                        "models:/NAME@ALIAS (default: models:/vistr@champion from the tracking server)")
    parser.add_argument("--out", type=Path, help="output folder (default: predictions/<input name>)")
    parser.add_argument("--window", type=int, help="T, frames per window: the model's own T; for an "
                        "official checkpoint, the T it was trained with (default 36)")
    parser.add_argument("--overlap", type=int, help="frames shared by consecutive windows (default T/6)")
    parser.add_argument("--min-iou", type=float, default=0.5, help="mask IoU needed to link windows' instances")
    parser.add_argument("--score-threshold", type=float, help="drop tracks scoring below this")
    parser.add_argument("--top-k", type=int, help="keep the K best-scoring tracks")
    parser.add_argument("--video-id", type=int, default=1, help="video_id written to results.json")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--tracking-uri", help="MLflow tracking server for runs:/ and models:/ URIs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Errors a user can fix (input, model, arguments) are one line on stderr and exit code 1."""
    # Imported here, not at the top: torch and the model code made `vistr predict --help` take 4 s.
    from pipelines.model_source import load_model
    from vistr.engine import resolve_device
    from vistr.predict import predict_video

    try:
        device = str(resolve_device(args.device))
        model, cfg, source = load_model(args.model, args.window, args.tracking_uri)
        out = args.out or Path("predictions") / Path(args.input).stem
        paths = predict_video(args.input, model, cfg, out, args.overlap, args.min_iou, args.score_threshold,
                              args.top_k, args.video_id, device, not args.no_progress)
    except (ValueError, OSError) as exc:  # VideoDecodeError, CheckpointError, ModelSourceError, ...
        print(f"vistr predict: error: {exc}", file=sys.stderr)
        return 1
    print(f"model: {source}")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
