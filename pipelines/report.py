"""`vistr report CAMPAIGN`: a campaign's trials as the paper's Table 1 (AP, AP50, AP75, AR1, AR10
per setting, in %) in Markdown, plus a grouped bar chart, from the MLflow child runs.

A setting is the trial's search-space values (the ``vistr_setting`` tag ``pipelines.tune`` puts on
each child run), shown through the campaign's ``labels`` and ordered as the search space lists
them; trials sharing a setting (``num_samples`` > 1) are averaged and counted. A metric is the
run's last logged value (the final epoch's validation). Both files are written to ``--out`` and
logged to the campaign run under ``report/``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE_STATS = ("AP", "AP50", "AP75", "AR1", "AR10")
HEADERS = {"AP": "AP", "AP50": "AP<sub>50</sub>", "AP75": "AP<sub>75</sub>", "AR1": "AR<sub>1</sub>",
           "AR10": "AR<sub>10</sub>"}  # fmt: skip
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ReportError(RuntimeError):
    """No such campaign run, or it has no trials to report."""


@dataclass
class Row:
    setting: str
    metrics: dict[str, float]  # stat -> mean over the setting's trials (NaN: never reported)
    trials: int


def _label(key: str, value: Any, labels: dict[str, dict[str, str]]) -> str:
    from pipelines.campaign import value_text

    text = value_text(value)
    return labels.get(key, {}).get(text, text)


def _order(key: str, value: Any, space: dict[str, dict[str, Any]]) -> tuple[int, Any]:
    """Position in the key's choice/grid list, else the value itself (sampled ranges)."""
    listed = next(iter(space.get(key, {"": None}).values()))
    if isinstance(listed, list) and value in listed and next(iter(space[key])) in ("choice", "grid"):
        return (listed.index(value), 0)
    return (len(listed) if isinstance(listed, list) else 0, value)


def summarize(trials: Sequence[tuple[dict[str, Any], dict[str, float]]], space: dict[str, dict[str, Any]],
              labels: dict[str, dict[str, str]] | None = None) -> list[Row]:  # fmt: skip
    """One row per distinct setting: ``trials`` are (search-space values, {stat: value}) pairs."""
    labels = labels or {}
    groups: dict[tuple, list[dict[str, float]]] = {}
    names: dict[tuple, str] = {}
    for setting, metrics in trials:
        keys = [k for k in space if k in setting]
        order = tuple(_order(k, setting[k], space) for k in keys)
        groups.setdefault(order, []).append(metrics)
        if len(keys) == 1:
            names[order] = _label(keys[0], setting[keys[0]], labels)
        else:
            names[order] = ", ".join(f"{k.rsplit('.', 1)[-1]}={_label(k, setting[k], labels)}" for k in keys)
    rows = []
    for order in sorted(groups):
        means = {}
        for stat in TABLE_STATS:
            values = [m[stat] for m in groups[order] if m.get(stat) is not None and math.isfinite(m[stat])]
            means[stat] = sum(values) / len(values) if values else math.nan
        rows.append(Row(names[order], means, len(groups[order])))
    return rows


def markdown_table(rows: Sequence[Row], header: str) -> str:
    """Table 1 layout: the setting, then AP, AP50, AP75, AR1, AR10 in % (one decimal)."""
    counts = any(r.trials > 1 for r in rows)
    head = [header, *(HEADERS[s] for s in TABLE_STATS)] + (["trials"] if counts else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r.setting] + [
            "–" if math.isnan(r.metrics[s]) else f"{100 * r.metrics[s]:.1f}" for s in TABLE_STATS
        ]
        lines.append("| " + " | ".join(cells + ([str(r.trials)] if counts else [])) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: Sequence[Row], path: str | Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per setting (values in %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.tracking import save_figure

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    width = 0.8 / max(len(rows), 1)
    heights = [[0.0 if math.isnan(r.metrics[s]) else 100 * r.metrics[s] for s in TABLE_STATS] for r in rows]
    for i, (row, values) in enumerate(zip(rows, heights, strict=True)):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(TABLE_STATS))]
        ax.bar(xs, values, width, label=row.setting)
    flat = [v for values in heights for v in values]
    ax.set_ylim(min(0.0, *flat), 1.1 * max(1.0, *flat))  # all-zero scores still show an axis from 0
    ax.set_xticks(range(len(TABLE_STATS)), TABLE_STATS)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def find_campaign_run(client: Any, ref: str) -> str:
    """``ref`` is a campaign run id or a campaign name (its newest run in any experiment)."""
    from pipelines.tune import PARENT_TAG

    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return client.get_run(ref).info.run_id
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.{PARENT_TAG} = '{ref}'",
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # trial runs carry the name too
    if not runs:
        raise ReportError(
            f"no campaign run named {ref!r} in {client.tracking_uri}; pass its run id or check --tracking-uri"
        )
    return runs[0].info.run_id


def write_report(client: Any, run_id: str, out_dir: str | Path) -> dict[str, str]:
    """Table and chart of campaign run ``run_id`` into ``out_dir``, logged to the run as ``report/``."""
    from pipelines.tune import CAMPAIGN_FILE, SETTING_TAG, TRIAL_TAG, child_runs

    with tempfile.TemporaryDirectory() as folder:
        campaign = json.loads(Path(client.download_artifacts(run_id, CAMPAIGN_FILE, folder)).read_text())
    trials, notes = [], []
    for child in child_runs(client, run_id):
        metrics = child.data.metrics
        trials.append(
            (
                json.loads(child.data.tags.get(SETTING_TAG, "{}")),
                {s: metrics.get(f"val_{s}") for s in TABLE_STATS},
            )
        )
        epochs, planned = int(metrics.get("epoch", -1)) + 1, child.data.params.get("train.epochs")
        if child.info.status != "FINISHED" or str(epochs) != planned:
            notes.append(f"- trial {child.data.tags.get(TRIAL_TAG)}: {child.info.status.lower()} after {epochs} "
                         f"of {planned} epochs")  # fmt: skip
    if not trials:
        raise ReportError(f"campaign run {run_id} has no trial runs yet")
    rows = summarize(trials, campaign["search_space"], campaign.get("labels"))
    header = ", ".join(campaign["search_space"]) if len(campaign["search_space"]) == 1 else "setting"
    title = f"{campaign['name']} ({len(trials)} trials)"
    text = f"# {title}\n\n{markdown_table(rows, header)}"
    if notes:
        text += (
            "\nTrials that did not train all epochs (stopped by the scheduler or interrupted):\n"
            + "\n".join(notes)
            + "\n"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "table.md"
    table.write_text(text)
    chart = bar_chart(rows, out / "table.png", title)
    for path in (table, chart):
        client.log_artifact(run_id, str(path), artifact_path="report")
    return {"table": str(table), "chart": str(chart)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("campaign", help="campaign run id, or campaign name (its newest run)")
    parser.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default runs/reports/<campaign>)")


def run(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import client_for

    client = client_for(args.tracking_uri)
    try:
        run_id = find_campaign_run(client, args.campaign)
        name = client.get_run(run_id).data.tags.get("vistr_campaign", run_id)
        paths = write_report(client, run_id, args.out or PROJECT_ROOT / "runs" / "reports" / name)
    except (ReportError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(Path(paths["table"]).read_text())
    print(json.dumps({"mlflow_run_id": run_id, **paths}, indent=1))
    return 0
