"""``vistr submit``: run a stage as a Ray Job on a cluster, through the Jobs API.

What a job gets:

- The code: this checkout, zipped (``package_files``: no data, runs, tests, virtualenvs, caches or
  dot-files) and sent as the job's ``runtime_env`` ``working_dir``. The job runs in the unpacked
  copy, which is first on every Ray worker's ``sys.path``, so the cluster runs the code you submit.
  Relative paths in stage arguments therefore point into that temporary copy: give the job
  absolute paths on shared storage (``--out``, ``--shards``, ``--storage``).
- The config: a config file of this checkout is passed by its path in the package; a file from
  elsewhere is copied into the package under ``_job/``; a preset name goes as is; anything else is
  a path on the cluster, passed as is.
- The entrypoint ``PYTHON -m jobs.<stage> --config CFG [stage args]`` (jobs/_entry.py), started by
  the head in a shell. ``PYTHON`` is ``python`` on the head's PATH unless ``--python`` says which:
  a head started from a virtualenv that is not on its PATH runs ``python`` from outside it.

Stage arguments are checked against ``vistr <stage>``'s parser before anything is sent, so a missing
or misspelt flag fails here, not minutes later on the cluster; the config is read by the job.
A job spec (jobs/specs/*.yaml) holds all of it for a run that is submitted repeatedly.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jobs._entry import STAGES, StageError, stage_argv, stage_parser
from pipelines.jobs_client import add_address_argument, client_errors, follow_to_end, job_client

PROJECT_ROOT = Path(__file__).resolve().parents[1]
JOB_DIR = "_job"  # where a config from outside the checkout goes in the package
# Left out of the package wherever they are (besides dot-files and dot-directories):
EXCLUDED_NAMES = {"__pycache__", "venv", "node_modules"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".egg-info")
# Left out at these paths from the project root: data, outputs and the tests' reference data.
EXCLUDED_PATHS = {"data", "runs", "mlruns", "evaluations", "tests", "build", "dist", "benchmarks/results"}
MAX_PACKAGE_MB = 100.0  # a checkout is ~1 MB; more means data got into the tree


class SubmitError(ValueError):
    """A job that cannot be submitted as given: bad spec, runtime env or package."""


@dataclass
class JobSpec:
    """One Ray Job: the stage, its config and arguments, and what the job asks of the cluster."""

    stage: str
    config: str | None = None
    args: list[str] = field(default_factory=list)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    # Resources reserved for the entrypoint (the stage's driver), as JobSubmissionClient.submit_job
    # takes them; Ray reserves none by default. Workers' resources come from the stage's arguments.
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_memory: int | None = None
    entrypoint_resources: dict[str, float] | None = None
    description: str = ""


def load_spec(path: str | Path) -> JobSpec:
    """A job spec YAML; a relative ``config`` names a file of this checkout if there is one."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SubmitError(f"{path}: cannot read the job spec: {exc}") from exc
    keys = [f.name for f in dataclasses.fields(JobSpec)]
    if not isinstance(data, dict):
        raise SubmitError(f"{path}: a job spec is a mapping with the keys {', '.join(keys)}")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise SubmitError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}")
    if data.get("stage") not in STAGES:
        raise SubmitError(f"{path}: stage must be one of {', '.join(STAGES)}, got {data.get('stage')!r}")
    args = data.get("args") or []
    if not isinstance(args, list) or not all(
        isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in args
    ):
        raise SubmitError(f"{path}: args must be a list of strings or numbers (one per word), got {args!r}")
    if not isinstance(data.get("runtime_env") or {}, dict):
        raise SubmitError(f"{path}: runtime_env must be a mapping")
    config = data.get("config")
    if config is not None and not Path(config).is_absolute() and (PROJECT_ROOT / config).is_file():
        config = str(PROJECT_ROOT / config)
    return dataclasses.replace(
        JobSpec(**data), config=config, args=[str(a) for a in args], runtime_env=data.get("runtime_env") or {}
    )


def load_runtime_env(value: str) -> dict[str, Any]:
    """``--runtime-env``: inline JSON (``{...}``) or a YAML/JSON file."""
    inline = value.lstrip().startswith("{")
    try:
        data = yaml.safe_load(value if inline else Path(value).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SubmitError(
            f"--runtime-env {value}: not a JSON object nor a readable YAML/JSON file: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise SubmitError(f"--runtime-env {value}: expected a mapping (e.g. '{{\"env_vars\": {{...}}}}')")
    return data


def merge_runtime_env(*envs: dict[str, Any]) -> dict[str, Any]:
    """Later envs win key by key; ``env_vars`` are merged. ``working_dir`` is refused: it is the package."""
    merged: dict[str, Any] = {}
    for env in envs:
        taken = {"working_dir", "excludes"} & set(env)
        if taken:
            raise SubmitError(
                f"runtime_env sets {', '.join(sorted(taken))}: vistr submit sends this checkout as the working "
                "directory; drop the key (or run `ray job submit` for a job of your own)"
            )
        merged.update({k: v for k, v in env.items() if k != "env_vars"})
        if "env_vars" in env:
            merged["env_vars"] = {**merged.get("env_vars", {}), **env["env_vars"]}
    return merged


def _excluded(rel: Path) -> bool:
    name = rel.name
    return (
        name.startswith(".")
        or name in EXCLUDED_NAMES
        or name.endswith(EXCLUDED_SUFFIXES)
        or rel.as_posix() in EXCLUDED_PATHS
    )


def package_files(root: Path = PROJECT_ROOT) -> dict[str, Path]:
    """Archive name -> file for the job package of the checkout at ``root``, sorted by name.

    Symlinked directories are followed (``vistr/presets`` -> ``configs``) unless they lead back to
    a directory above them; a directory holding a virtualenv (``pyvenv.cfg``) is left out whatever
    its name.
    """
    root = root.resolve()
    files: dict[str, Path] = {}
    above: dict[Path, tuple[str, ...]] = {root: (str(root),)}  # real paths of a folder and its parents
    for folder, dirs, names in os.walk(root, followlinks=True):
        here = Path(folder)
        if (here / "pyvenv.cfg").is_file():
            dirs[:] = []
            continue
        rel_dir = here.relative_to(root)
        dirs[:] = sorted(
            d for d in dirs if not _excluded(rel_dir / d) and os.path.realpath(here / d) not in above[here]
        )
        for d in dirs:
            above[here / d] = (*above[here], os.path.realpath(here / d))
        for name in names:
            rel = rel_dir / name
            if not _excluded(rel) and (here / name).is_file():
                files[rel.as_posix()] = here / name
    return dict(sorted(files.items()))


def build_package(dest: Path, config: str | None, root: Path = PROJECT_ROOT) -> tuple[Path, str | None]:
    """Zip the checkout (and an outside config file) to ``dest``; returns it and the config as the job names it."""
    files = package_files(root)
    job_config = config
    if config is not None and Path(config).is_file():
        source = Path(config).resolve()
        inside = (
            source.relative_to(root.resolve()).as_posix() if source.is_relative_to(root.resolve()) else None
        )
        if inside not in files:  # outside the checkout, or in a part that is not sent (runs/, data/...)
            inside = f"{JOB_DIR}/{source.name}"
            files[inside] = source
        job_config = inside
    elif config is not None and not _is_preset(config):
        print(
            f"vistr submit: {config} is not a local file or preset: the job reads it on the cluster",
            file=sys.stderr,
        )
    total = sum(path.stat().st_size for path in files.values())
    if total > MAX_PACKAGE_MB * 2**20:
        largest = sorted(files, key=lambda name: files[name].stat().st_size, reverse=True)[:5]
        raise SubmitError(
            f"the job package of {root} would hold {total / 2**20:.0f} MiB (limit {MAX_PACKAGE_MB:.0f}); largest: "
            f"{', '.join(largest)}. Move data out of the checkout (jobs read it from shared storage)"
        )
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in files.items():
            archive.write(path, name)
    return dest, job_config


def _is_preset(name: str) -> bool:
    from vistr.config import ConfigError, resolve_preset

    try:
        resolve_preset(name)
    except ConfigError:
        return False
    return True


def entrypoint(stage: str, config: str | None, args: list[str], python: str = "python") -> str:
    """The shell command the head runs: ``PYTHON -m jobs.<stage> [--config CFG] [args]``."""
    return shlex.join([python, "-m", f"jobs.{stage}", *(["--config", config] if config else []), *args])


def check_stage_args(spec: JobSpec) -> None:
    """Parse the job's arguments with ``vistr <stage>``'s parser here (argparse exits on an error)."""
    argv = stage_argv(spec.stage, spec.config, spec.args, cluster=False)
    stage_parser(spec.stage).parse_args(argv[1:])


def submit(
    spec: JobSpec, address: str | None, python: str = "python", runtime_env: dict | None = None
) -> tuple[Any, str]:
    """Package, submit and return (client, submission id)."""
    check_stage_args(spec)
    env = merge_runtime_env(spec.runtime_env, runtime_env or {})
    client = job_client(address)
    with tempfile.TemporaryDirectory(prefix="vistr-submit-") as folder:
        package, job_config = build_package(Path(folder) / "vistr_job.zip", spec.config)
        command = entrypoint(spec.stage, job_config, spec.args, python)
        print(f"vistr submit: {command}", file=sys.stderr)
        resources = {
            f.name: getattr(spec, f.name)
            for f in dataclasses.fields(spec)
            if f.name.startswith("entrypoint_") and getattr(spec, f.name) is not None
        }
        job_id = client.submit_job(
            entrypoint=command,
            runtime_env={**env, "working_dir": str(package)},  # uploaded by submit_job
            metadata={"vistr_stage": spec.stage, "vistr_config": str(spec.config or "")},
            **resources,
        )
    return client, job_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The submission options are accepted before and after STAGE (SUPPRESS: whichever is given
    # sets them); STAGE is a sub-parser so that its arguments can follow `--` after options.
    def submission_options(target: argparse.ArgumentParser) -> None:
        add_address_argument(target, default=argparse.SUPPRESS)
        target.add_argument("--follow", action="store_true", default=argparse.SUPPRESS,
                            help="stream the job's log until it ends; exit non-zero unless it SUCCEEDED")  # fmt: skip
        target.add_argument("--runtime-env", metavar="FILE|JSON", default=argparse.SUPPRESS,
                            help="extra Ray runtime_env (env_vars, pip, ...), merged over the spec's")  # fmt: skip
        target.add_argument("--python", default=argparse.SUPPRESS,
                            help="interpreter the head runs the entrypoint with (default: python on its PATH, as in "
                            "Ray's images; a head started from a virtualenv not on its PATH needs that venv's python)")  # fmt: skip

    parser.add_argument(
        "--spec", type=Path, help="job spec YAML (jobs/specs/): stage, config, args, resources"
    )
    submission_options(parser)
    stages = parser.add_subparsers(dest="stage", metavar="STAGE")
    for stage in STAGES:
        sub = stages.add_parser(stage, help=f"python -m jobs.{stage}: runs `vistr {stage}` on the cluster",
                                description=f"Submit `vistr {stage}` as a Ray Job. Arguments of `vistr {stage}` "
                                "go after `--`, e.g. vistr submit train --config C --follow -- --shards /shared/s")  # fmt: skip
        sub.add_argument("--config", help="config YAML or preset name (a campaign file for tune)")
        submission_options(sub)
        sub.add_argument("stage_args", nargs="*", metavar="-- ARGS", help=f"arguments of `vistr {stage}`")


def _job_spec(args: argparse.Namespace) -> JobSpec:
    if (args.stage is None) == (args.spec is None):
        raise SubmitError("give either a STAGE (vistr submit train --config ...) or --spec FILE")
    if args.spec is not None:
        return load_spec(args.spec)
    return JobSpec(stage=args.stage, config=args.config, args=list(args.stage_args))


def run(args: argparse.Namespace) -> int:
    errors = (SubmitError, StageError, *client_errors())
    try:
        spec = _job_spec(args)
        extra_env = load_runtime_env(args.runtime_env) if getattr(args, "runtime_env", None) else {}
        client, job_id = submit(
            spec, getattr(args, "address", None), getattr(args, "python", "python"), extra_env
        )
    except errors as exc:
        print(f"vistr submit: error: {exc}", file=sys.stderr)
        return 1
    print(job_id, flush=True)
    if not getattr(args, "follow", False):
        print(
            f"follow it: vistr jobs logs {job_id} --follow; state: vistr jobs status {job_id}",
            file=sys.stderr,
        )
        return 0
    return follow_to_end(client, job_id)
