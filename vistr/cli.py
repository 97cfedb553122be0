"""The ``vistr`` command: one entry point, one subcommand per stage.

The CLI is thin on purpose: each subcommand lives in the module that does the work, which
exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so ``vistr --help`` stays fast and ``vistr synth`` never imports Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Modules under pipelines/ may import Ray and MLflow.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("vistr.data.synthetic", "generate a synthetic YouTube-VIS-format dataset"),
    "evaluate-results": ("vistr.evaluation", "video AP/AR of a results JSON against ground truth"),
    "preprocess": ("pipelines.preprocess", "YouTube-VIS -> versioned Parquet clip shards (Ray Data)"),
    "train": ("pipelines.train", "train with DDP on Ray Train from the clip shards, tracked in MLflow"),
    "predict": ("vistr.predict", "segment a video file or frame folder: results JSON, overlay video, contact sheet"),
    "evaluate": ("pipelines.evaluate", "video AP/AR of a model on a dataset split (Ray Data inference)"),
    "demo": ("pipelines.demo", "the embedded default: synthetic data -> shards -> train -> evaluate -> predict"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vistr",
        description="VisTR video instance segmentation: data, training, tuning, evaluation, registry.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        # Arguments are declared by the owning module; importing it here is cheap for vistr/
        # modules, and pipelines/ modules keep their heavy imports inside run().
        importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
