"""MLflow helpers shared by the stages: where runs go, how a config becomes params, metrics, plots.

Everything goes through ``MlflowClient`` with an explicit run id rather than MLflow's global
"active run": a Ray Train worker, a Tune trial and the driver can then log to the same run
without sharing process state, and a restarted worker simply keeps logging to the id it is given.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from vistr.config import Config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRUNCATED = "...[truncated]"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """The config's ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the project's
    local sqlite store ``<project>/runs/mlflow.db`` (created on first use)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    path = PROJECT_ROOT / "runs" / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def client_for(configured: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=resolve_tracking_uri(configured))


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside the database for a sqlite store (MLflow's
    default, ``./mlruns``, depends on the directory the command runs in); the server decides
    for an HTTP store (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing (a deleted one is restored)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def param_value(value: Any) -> str:
    """A param string within MLflow's length limit (long lists are cut, and say so)."""
    text = str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
    return text


def config_params(cfg: Config) -> dict[str, str]:
    """The flattened config (``model.hidden_dim`` ...) as MLflow params."""
    return {key: param_value(value) for key, value in cfg.flat().items()}


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params in batches of MLflow's per-request limit. Params are immutable in MLflow: on a
    resumed run only the ones not logged yet are sent (same key, same value is the contract)."""
    logged = client.get_run(run_id).data.params
    todo = [Param(k, param_value(v)) for k, v in params.items() if k not in logged]
    for chunk in _chunks(todo, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(k, param_value(v)) for k, v in tags.items()]
    for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Numeric, finite values of ``metrics`` at ``step``, in one request (others are skipped:
    a NaN stops training with its own error, and MLflow plots cannot show it)."""
    now = int(time.time() * 1000)
    batch = [
        Metric(key, float(value), now, int(step))
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ]
    if batch:
        client.log_batch(run_id, metrics=batch)


def find_run(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """The id of the newest run of the experiment carrying all ``tags`` (keys: letters/_ only)."""
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1,
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    return runs[0].info.run_id if runs else None


def system_info(num_workers: int, gpus_per_worker: float) -> dict[str, str]:
    """What produced a run: worker layout, library versions, the git commit of the project."""
    import mlflow
    import ray
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "sys.num_workers": str(num_workers),
        "sys.gpus_per_worker": str(gpus_per_worker),
        "sys.total_gpus": str(num_workers * gpus_per_worker),
        "sys.torch": torch.__version__,
        "sys.ray": ray.__version__,
        "sys.mlflow": mlflow.__version__,
        "sys.python": platform.python_version(),
        "sys.platform": platform.platform(),
        "sys.git_commit": commit or "unknown",
    }


def metric_curves(client: MlflowClient, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` sorted by step; a step logged twice (an epoch replayed
    after a restart) keeps its latest value."""
    curves = {}
    for key in keys:
        latest: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        if latest:
            curves[key] = [(step, latest[step][1]) for step in sorted(latest)]
    return curves


def plot_curves(curves: Mapping[str, list[tuple[float, float]]], path: str | Path, xlabel: str,
                ylabel: str, title: str, log_y: bool = False) -> Path:
    """A line plot of several ``[(x, y), ...]`` series as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=name, marker="o" if len(points) < 20 else None)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG (parents created) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def log_loss_curve(client: MlflowClient, run_id: str, out_dir: str | Path) -> Path | None:
    """Plot every ``train/*`` loss term of the run against the global step; log it as an artifact."""
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("train/")]
    curves = metric_curves(client, run_id, sorted(keys))
    if not curves:
        return None
    positive = all(v > 0 for points in curves.values() for _, v in points)
    path = plot_curves(curves, Path(out_dir) / "loss_curve.png", "global step", "loss",
                       "training losses", log_y=positive)  # fmt: skip
    client.log_artifact(run_id, str(path), artifact_path="plots")
    return path
