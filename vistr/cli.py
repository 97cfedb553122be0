"""The ``vistr`` command: one entry point, one subcommand per stage.

The CLI is thin on purpose: each subcommand lives in the module that does the work, which
exposes ``add_arguments(parser)`` and ``run(args) -> int`` (``"module#name"`` names a module holding
several subcommands: ``add_name_arguments`` / ``run_name``). Modules are imported only when their
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
    "predict": ("pipelines.predict", "segment a video file or frame folder: results JSON, overlay video, contact sheet"),
    "evaluate": ("pipelines.evaluate", "video AP/AR of a model on a dataset split (Ray Data inference)"),
    "register": ("pipelines.registry#register", "log a training run's model to the MLflow registry as the challenger"),
    "promote": ("pipelines.registry#promote", "evaluate challenger vs champion on one set; move the champion alias if better"),
    "models": ("pipelines.registry#models", "registered versions: list, show VERSION|ALIAS, rollback"),
    "workflow": ("pipelines.workflow", "preprocess -> train -> evaluate -> register -> promote on Ray, steps cached in MLflow"),
    "tune": ("pipelines.tune", "Ray Tune campaign (search or Table 1 ablation) over Ray Train runs, tracked in MLflow"),
    "report": ("pipelines.report", "a campaign's trials as a Table-1 Markdown table and bar chart, from MLflow"),
    "demo": ("pipelines.demo", "the embedded default: synthetic data -> shards -> train -> evaluate -> predict"),
    "submit": ("pipelines.submit", "run a stage as a Ray Job on a cluster: package this checkout, submit, --follow"),
    "jobs": ("pipelines.jobs_client", "Ray Jobs on a cluster: list, status, logs [--follow], stop"),
}


def _entry(spec: str) -> tuple[object, str, str]:
    """(module, add-arguments function name, run function name) of a COMMANDS module spec."""
    module, _, name = spec.partition("#")
    prefix = f"{name}_" if name else ""
    return importlib.import_module(module), f"add_{prefix}arguments", f"run_{name}" if name else "run"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of ``command`` only (``None``: of every subcommand).

    Declaring a subcommand's arguments imports its module, and several import torch: building all
    of them made ``vistr --help`` take 3.5 s, so ``main`` asks only for the one being run.
    """
    parser = argparse.ArgumentParser(
        prog="vistr",
        description="VisTR video instance segmentation: data, training, tuning, evaluation, registry.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        if command is None or name == command:
            owner, add, _ = _entry(module)
            getattr(owner, add)(sub)
    return parser


def requested_command(argv: list[str]) -> str:
    """The subcommand ``argv`` names (its first non-option word), or "" when there is none; the
    top-level parser has no options that take a value, so the first such word is it."""
    return next((word for word in argv if not word.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(requested_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    owner, _, run = _entry(args._module)
    return int(getattr(owner, run)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
