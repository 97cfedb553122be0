"""`vistr tune` end to end on CPU: a 2-trial ASHA campaign over Ray Train runs, its driver killed
after the first trial finished, then `--resume`; trials as MLflow child runs, the best config, the
Table-1 report and `vistr report`.

A tiny trial costs ~35 s here (Ray Train start-up dominates), so one campaign carries all the
assertions; the driver runs as a subprocess in its own process group, so killing it (SIGKILL to
that group) takes its local Ray cluster and trials down with it, as a crashed driver would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.tune import BEST_CONFIG, SETTING_TAG, TRIAL_TAG
from vistr.config import load_config

pytestmark = pytest.mark.integration
LRS = [1.0e-4, 3.0e-4]
FIRST_TRIAL_TIMEOUT_S, RESUME_TIMEOUT_S = 300, 400


def campaign_file(tmp_path: Path, data: Path) -> Path:
    campaign = {
        "name": "tiny", "base": "tiny_cpu",
        "overrides": {
            "model.enc_layers": 1, "model.dec_layers": 1, "data.augment": False, "train.epochs": 2,
            "train.max_steps_per_epoch": 2, "train.batch_size": 2, "train.log_every": 1, "train.validate_every": 1,
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "test-tune",
        },
        "search_space": {"train.lr": {"grid": LRS}},
        "metric": "val_AP", "mode": "max",
        "scheduler": {"type": "asha", "grace_period": 1, "max_t": 2, "reduction_factor": 2},
        "resources": {"trial_cpus": 0.5, "num_workers": 1, "cpus_per_worker": 0.5},
        "data": {"src": str(data), "shard_mb": 0.3},
        "storage": str(tmp_path / "campaigns"),
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(campaign))
    return path


def children(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("test-tune")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_campaign_killed_after_a_trial_resumes_without_rerunning_it(synth_root, tmp_path: Path) -> None:
    path = campaign_file(tmp_path, synth_root)
    cmd = [sys.executable, "-m", "vistr.cli", "tune", str(path)]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    started = time.monotonic()
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not any(r.info.status == "FINISHED" for r in children(client)):
            assert driver.poll() is None, (
                f"driver exited early:\n{(tmp_path / 'first.log').read_text()[-4000:]}"
            )
            assert time.monotonic() - started < FIRST_TRIAL_TIMEOUT_S, "no trial finished in time"
            time.sleep(1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-campaign, its Ray cluster with it
        driver.wait(timeout=60)
    killed_after = time.monotonic() - started
    (first,) = [r for r in children(client) if r.info.status == "FINISHED"]
    first_steps = len(client.get_metric_history(first.info.run_id, "train/loss"))
    assert first_steps == 4 and first.data.tags[SETTING_TAG] in {json.dumps({"train.lr": lr}) for lr in LRS}

    resumed = subprocess.run(
        [*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=RESUME_TIMEOUT_S
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout[resumed.stdout.rindex("\n{") :])
    total = time.monotonic() - started
    print(f"driver killed after {killed_after:.0f} s; campaign done after {total:.0f} s")

    # One parent run (found again on resume), two trial runs: the finished one was not trained again.
    experiment = client.get_experiment_by_name("test-tune").experiment_id
    parents = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [summary["mlflow_run_id"]] and parents[
        0
    ].info.status == "FINISHED"
    runs = children(client)
    assert len(runs) == 2 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {summary["mlflow_run_id"]}
    assert len({r.data.tags[TRIAL_TAG] for r in runs}) == 2
    assert sorted(float(r.data.params["train.lr"]) for r in runs) == LRS  # the trial's overrides as params
    again = client.get_run(first.info.run_id)
    assert again.info.end_time == first.info.end_time
    assert len(client.get_metric_history(first.info.run_id, "train/loss")) == first_steps
    for run in runs:
        assert "val_AP" in run.data.metrics and "val_AR10" in run.data.metrics
        stopped = run.data.tags.get("vistr_stopped_by") == "scheduler"  # ASHA may stop the second at epoch 1
        assert run.info.status == ("KILLED" if stopped else "FINISHED"), run.info.status

    # The best trial's config is a ready-to-train config, logged to the parent with the report.
    best = load_config(summary["best_config"])
    assert Path(summary["best_config"]) == tmp_path / "campaigns" / "tiny" / BEST_CONFIG
    assert best.train.lr in LRS and best.model.enc_layers == 1 and best.train.epochs == 2
    assert parents[0].data.tags["best_trial_id"] in {r.data.tags[TRIAL_TAG] for r in runs}
    logged = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    logged |= {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "report")}
    assert {BEST_CONFIG, "campaign.json", "report/table.md", "report/table.png"} <= logged
    table = Path(summary["table"]).read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 0.000")]
    assert [row.split(" | ")[0] for row in rows] == ["| 0.0001", "| 0.0003"], table

    from vistr.cli import main

    out = tmp_path / "report_cli"
    assert main(["report", "tiny", "--tracking-uri", client.tracking_uri, "--out", str(out)]) == 0
    assert (out / "table.md").read_text() == table and (out / "table.png").stat().st_size > 1000
