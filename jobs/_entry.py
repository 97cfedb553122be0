"""Run one stage as a Ray Job entrypoint, or locally: ``python -m jobs.<stage> --config CFG [args]``.

A job takes exactly the arguments of ``vistr <stage>`` and runs that subcommand in-process, so
each stage has one implementation and one set of flags. Two things differ from the CLI:

- ``--config`` is accepted for every stage that takes a config, and handed over the way the
  subcommand takes it (``--config CFG``, or as its positional argument, e.g. ``vistr tune CAMPAIGN``).
- Ray starts a job's entrypoint with ``RAY_ADDRESS`` set to its cluster. The stages would start a
  private local cluster without ``--address``, so when ``RAY_ADDRESS`` is set and the subcommand
  takes ``--address``, ``--address auto`` (= the cluster in ``RAY_ADDRESS``) is added. Run locally
  without ``RAY_ADDRESS``, a job behaves exactly like ``vistr <stage>``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

# The stages that have a job entrypoint (jobs/<stage>.py); each forwards to `vistr <stage>`.
STAGES = ("preprocess", "train", "tune", "evaluate", "promote", "workflow")


class StageError(ValueError):
    """A stage that cannot run from this checkout, or arguments it does not take."""


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """The argument parser of ``vistr <stage>``, as the CLI builds it."""
    from vistr.cli import COMMANDS, _entry

    if stage not in STAGES:
        raise StageError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if stage not in COMMANDS:
        raise StageError(
            f"stage {stage}: `vistr {stage}` is not a subcommand of this checkout "
            f"(it has {', '.join(COMMANDS)}); update the checkout the job runs from"
        )
    parser = argparse.ArgumentParser(prog=f"vistr {stage}")
    owner, add, _ = _entry(COMMANDS[stage][0])
    getattr(owner, add)(parser)
    return parser


def stage_argv(stage: str, config: str | None, args: Sequence[str], cluster: bool) -> list[str]:
    """The ``vistr`` argv that runs ``stage`` with ``config`` and the stage's own ``args``.

    ``cluster``: the process runs inside a Ray cluster (a job), so ``--address auto`` is added
    where the subcommand takes one and ``args`` do not already name an address.
    """
    parser = stage_parser(stage)
    actions = parser._actions  # argparse keeps no public list of a parser's arguments
    options = {flag for action in actions for flag in action.option_strings}
    argv = [stage]
    if config is not None:
        if "--config" in options:
            argv += ["--config", config]
        elif any(not action.option_strings for action in actions):
            argv.append(config)  # e.g. `vistr tune CAMPAIGN.yaml`, `vistr workflow CONFIG`
        else:
            raise StageError(f"`vistr {stage}` takes no config: drop --config and pass its own arguments")
    argv += args
    named = any(a == "--address" or a.startswith("--address=") for a in args)
    if cluster and "--address" in options and not named:
        argv += ["--address", "auto"]
    return argv


def main(stage: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jobs.<stage>``: returns the subcommand's exit status."""
    # No -h here (it reaches `vistr <stage> -h`) and no abbreviations (--conf must not eat a
    # stage flag that merely starts like --config).
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{stage}", add_help=False, allow_abbrev=False)
    parser.add_argument("--config", help="config YAML, preset name or campaign file of the stage")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    try:
        forwarded = stage_argv(stage, known.config, rest, cluster=bool(os.environ.get("RAY_ADDRESS")))
    except StageError as exc:
        print(f"jobs.{stage}: error: {exc}", file=sys.stderr)
        return 2
    print(f"jobs.{stage}: vistr {shlex.join(forwarded)}", flush=True)
    from vistr.cli import main as vistr_main

    return vistr_main(forwarded)
