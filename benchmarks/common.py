"""Shared plumbing for benchmarks: machine description, timers, results JSON and a text table.

Every benchmark writes ``benchmarks/results/NAME.json`` with its numbers plus enough context
(CPU model, cores, torch version, git commit, load average) to tell later whether two numbers
are comparable — timings on a shared machine are noisy, so the load is recorded too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's marketing name (``platform.processor()`` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the repository, with ``+dirty`` when the working tree has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


_allow_dirty = False  # set by require_clean_tree(--allow-dirty); recorded in every result written


def add_provenance_arguments(parser: argparse.ArgumentParser) -> None:
    """``--allow-dirty``: the one way to record a result that no commit can reproduce."""
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="record results from a tree with uncommitted changes (marked so in the JSON)",
    )


def require_clean_tree(allow_dirty: bool) -> None:
    """Refuse to start a benchmark on uncommitted code, before any time is spent on it.

    A result is only worth keeping if its ``git_commit`` reproduces it; ``--allow-dirty`` is for
    trying things out, and the JSON then says ``"allow_dirty": true``.
    """
    global _allow_dirty
    _allow_dirty = allow_dirty
    commit = git_commit()
    if commit and commit.endswith("+dirty") and not allow_dirty:
        raise SystemExit(
            f"error: the tree has uncommitted changes ({commit}); commit them first so the result "
            "can be reproduced, or pass --allow-dirty (recorded in the results)"
        )


def machine() -> dict[str, Any]:
    """What produced the numbers: hardware, software and how busy the machine was."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_1_5_15": list(os.getloadavg()),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB, macOS in bytes).

    The peak never decreases, so measure one configuration per process (see ``run_isolated``).
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def time_call(fn: Callable[[], Any], repeats: int = 1, warmup: int = 0) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_isolated(module: str, args: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m module args...`` in a fresh process and parse the JSON it prints last.

    Peak RSS is per process, so each configuration gets its own process to be measured alone.
    """
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(name: str, results: Any, extra: dict[str, Any] | None = None) -> Path:
    """Write ``benchmarks/results/NAME.json`` = {benchmark, time, machine, git_commit, results, ...}."""
    commit = git_commit()
    if commit and commit.endswith("+dirty") and not _allow_dirty:
        raise SystemExit(
            f"error: not writing {name}.json: the tree changed while the benchmark ran ({commit}); "
            "re-run from a clean commit, or pass --allow-dirty"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "utc_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": commit,
        **({"allow_dirty": True} if commit and commit.endswith("+dirty") else {}),
        "machine": machine(),
        **(extra or {}),
        "results": results,
    }
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)  # never leave a half-written results file behind
    return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain fixed-width table; floats get 3 significant digits."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    print(f"\n{title}\n{format_table(rows, columns)}")
