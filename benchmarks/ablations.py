"""Table 1 (b) instance-query level and (d) positional encoding at CPU scale, next to the paper.

    python benchmarks/ablations.py [--panels b d] [--work DIR] [--set KEY=VALUE ...]

Each panel is its campaign file in configs/ablations/ run with ``--scale cpu`` (tiny_cpu, 3 short
epochs, synthetic data, one Ray Train worker per trial, trials one after another) through
``pipelines.tune.run_campaign``, tracked in a sqlite MLflow store under ``--work``; an interrupted
benchmark continues its campaigns (``--resume``). The paper trains ResNet-50 for 10 epochs on
YouTube-VIS: only the *direction* of each effect is comparable, and at this scale AP is close to
zero, so the final training loss is reported beside it. Writes ``benchmarks/results/ablations.json``,
``ablations.md`` (tables) and ``ablations.png`` (AP per setting, ours and the paper's).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    RESULTS_DIR,
    add_provenance_arguments,
    require_clean_tree,
    write_results,
)

STATS = ("AP", "AP50", "AP75", "AR1", "AR10")
# Paper Table 1, % (setting value -> AP, AP50, AP75, AR1, AR10), in the paper's row order.
PAPER = {
    "b": {"video": (8.4, 13.2, 9.5, 20.0, 20.8), "frame": (13.7, 23.3, 14.5, 30.4, 35.1),
          "instance": (32.0, 52.8, 34.0, 31.6, 37.2), "prediction": (33.3, 53.4, 35.1, 33.1, 38.5)},
    "d": {"false": (28.4, 50.1, 29.5, 29.6, 33.3), "true": (33.3, 53.4, 35.1, 33.1, 38.5)},
}  # fmt: skip
FILES = {"b": "b_query_level.yaml", "d": "d_position_encoding.yaml"}
# The paper's claims as (better, worse) pairs of setting values.
CLAIMS = {
    "b": [("prediction", "instance"), ("instance", "frame"), ("frame", "video")],
    "d": [("true", "false")],
}


def run_panel(panel: str, work: Path, sets: dict) -> dict:
    """Run (or finish) the panel's CPU-scale campaign; its trials' metrics from MLflow."""
    from pipelines.campaign import load_campaign, value_text
    from pipelines.tracking import client_for
    from pipelines.tune import SETTING_TAG, child_runs, run_campaign

    sets = {
        "tracking.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment": "ablations",
        **sets,
    }
    campaign = load_campaign(
        REPO_ROOT / "configs" / "ablations" / FILES[panel], "cpu", sets, str(work / "campaigns")
    )
    started = time.monotonic()
    summary = run_campaign(campaign, resume=(Path(campaign.experiment_dir) / "campaign.json").is_file())
    client = client_for(campaign.config.tracking.tracking_uri)
    (key,) = campaign.search_space
    trials = {}
    for run in child_runs(client, summary["mlflow_run_id"]):
        value = value_text(json.loads(run.data.tags[SETTING_TAG])[key])
        m = run.data.metrics
        trials[value] = {
            **{s: m.get(f"val_{s}") for s in STATS}, "final_loss": m.get("epoch/loss"), "status": run.info.status,
            "minutes": (run.info.end_time - run.info.start_time) / 60000 if run.info.end_time else None,
        }  # fmt: skip
    return {"campaign": campaign.name, "key": key, "labels": campaign.labels.get(key, {}), "trials": trials,
            "mlflow_run_id": summary["mlflow_run_id"], "minutes": (time.monotonic() - started) / 60,
            "report": summary["table"], "config": campaign.to_dict()}  # fmt: skip


def directions(panel: str, trials: dict) -> list[dict]:
    """Each paper claim 'A > B' against our AP (and final loss, lower = better)."""
    out = []
    for better, worse in CLAIMS[panel]:
        ours, theirs = trials.get(better, {}), trials.get(worse, {})
        ap = (ours.get("AP"), theirs.get("AP"))
        loss = (ours.get("final_loss"), theirs.get("final_loss"))
        out.append({
            "claim": f"{better} > {worse}", "paper_AP": (PAPER[panel][better][0], PAPER[panel][worse][0]),
            "our_AP": ap, "AP_agrees": None if None in ap or ap[0] == ap[1] else ap[0] > ap[1],
            "our_final_loss": loss, "loss_agrees": None if None in loss else loss[0] < loss[1],
        })  # fmt: skip
    return out


def pct(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown(results: dict) -> str:
    lines = ["# Table 1 (b), (d) at CPU scale vs the paper", "",
             "Ours: tiny_cpu on synthetic data (configs/ablations/*.yaml `--scale cpu`); paper: ResNet-50, "
             "10 epochs, YouTube-VIS val. Values in %.", ""]  # fmt: skip
    for panel, r in results.items():
        lines += [f"## ({panel}) {r['key']} — campaign `{r['campaign']}`, {r['minutes']:.1f} min", "",
                  "| setting | AP | AP<sub>50</sub> | AP<sub>75</sub> | AR<sub>1</sub> | AR<sub>10</sub> | final train loss "
                  "| paper AP | paper AP<sub>50</sub> |", "|" + " --- |" + " ---: |" * 8]  # fmt: skip
        for value, paper in PAPER[panel].items():
            t = r["trials"].get(value, {})
            loss = t.get("final_loss")
            lines.append(f"| {r['labels'].get(value, value)} | " + " | ".join(pct(t.get(s)) for s in STATS)
                         + f" | {'–' if loss is None else f'{loss:.3f}'} | {paper[0]} | {paper[1]} |")  # fmt: skip
        lines += ["", "| paper's claim | paper AP | our AP | AP agrees | our final loss | loss agrees |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for d in r["directions"]:
            agree = {True: "yes", False: "no", None: "undecided (equal)"}
            loss = (
                "–" if None in d["our_final_loss"] else " vs ".join(f"{v:.3f}" for v in d["our_final_loss"])
            )
            lines.append(f"| {d['claim']} | {d['paper_AP'][0]} vs {d['paper_AP'][1]} | "
                         f"{' vs '.join(pct(v) for v in d['our_AP'])} | {agree[d['AP_agrees']]} | {loss} | "
                         f"{agree[d['loss_agrees']]} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), dpi=100, squeeze=False)
    for ax, (panel, r) in zip(axes[0], results.items(), strict=True):
        values = list(PAPER[panel])
        xs = range(len(values))
        ours = [100 * (r["trials"].get(v, {}).get("AP") or 0.0) for v in values]
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="ours (CPU scale)")
        ax.bar([x + 0.2 for x in xs], [PAPER[panel][v][0] for v in values], 0.4, label="paper")
        ax.set_xticks(list(xs), [r["labels"].get(v, v) for v in values], fontsize=8)
        ax.set_title(f"Table 1{panel}: {r['key']}", fontsize=9)
        ax.set_ylabel("AP %")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--panels", nargs="+", default=["b", "d"], choices=sorted(FILES))
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/vistr-ablations"), help="campaigns, shards, MLflow"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    add_provenance_arguments(parser)
    args = parser.parse_args()
    require_clean_tree(args.allow_dirty)
    import yaml

    sets = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    results = {}
    for panel in args.panels:
        results[panel] = run_panel(panel, args.work.resolve(), sets)
        results[panel]["directions"] = directions(panel, results[panel]["trials"])
    write_results("ablations", results, {"args": {"panels": args.panels, "set": sets}})
    (RESULTS_DIR / "ablations.md").write_text(markdown(results))
    chart(results, RESULTS_DIR / "ablations.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
