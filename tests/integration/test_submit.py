"""`vistr submit` / `vistr jobs` against a real `ray start --head` (token auth, loopback): preprocess
then train as Ray Jobs with --follow, and a job whose config is wrong.

The CLI runs as a subprocess from a temp folder with the head's environment (RAY_AUTH_MODE=token,
the head's token, RAY_ADDRESS), as a user's shell would. The config lives outside the checkout, so
it travels in the job package; the MLflow store reaches the train job through --runtime-env.
Train is one worker x two steps: Ray Train start-up dominates (~1 min).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.jobs_client import list_jobs
from pipelines.ray_runtime import keep_local_ray_on_loopback
from pipelines.train import CHECKPOINT_FILE
from vistr.config import load_config, save_config

pytestmark = pytest.mark.integration


def vistr(head, cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vistr.cli", *args], env=env or head.env, cwd=cwd,
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip


def jobs_api(head):
    """An in-process Jobs API client with the head's token, for assertions."""
    keep_local_ray_on_loopback()  # read when Ray is first imported; other tests start local clusters
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)


def submit(
    head, cwd: Path, stage: str, config: Path, *stage_args: str, options: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess, str]:
    """`vistr submit STAGE --follow`; returns the process and the job id (its first stdout line)."""
    # The head runs entrypoints with its PATH's python; name this venv's, whatever PATH pytest has.
    done = vistr(head, cwd, "submit", stage, "--config", str(config), "--address", head.dashboard_url,
                 "--python", sys.executable, "--follow", *options, "--", *stage_args)  # fmt: skip
    job_id = done.stdout.splitlines()[0] if done.stdout else ""
    assert job_id.startswith("raysubmit_"), done.stdout[-2000:] + done.stderr[-4000:]
    return done, job_id


def test_preprocess_then_train_as_jobs(ray_head, synth_root, tmp_path) -> None:
    cfg = load_config("tiny_cpu", {
        "model.enc_layers": 1, "model.dec_layers": 1, "data.augment": False,
        "train.epochs": 1, "train.max_steps_per_epoch": 2, "train.validate_every": 0,
        "train.num_workers": 1, "train.cpus_per_worker": 1, "train.storage_path": str(tmp_path / "ray"),
        "tracking.experiment": "test-submit",
    })  # fmt: skip
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # reaches the job through --runtime-env
    config = save_config(cfg, tmp_path / "tiny.yaml")
    shards = tmp_path / "shards"
    client = jobs_api(ray_head)

    done, prep_id = submit(ray_head, tmp_path, "preprocess", config, "--src", str(synth_root),
                           "--out", str(shards), "--shard-mb", "0.3")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The log was streamed: the entry's forwarded command (config shipped in the package, the
    # job's cluster joined) and the stage's own summary line.
    assert f"jobs.preprocess: vistr preprocess --config _job/tiny.yaml --src {synth_root}" in done.stdout
    assert "--address auto" in done.stdout
    assert re.search(rf"{shards}: \d+ clips in 9 shards \(9 built now", done.stdout), done.stdout[-3000:]
    assert f"job {prep_id} SUCCEEDED" in done.stderr
    assert (shards / "manifest.json").is_file()

    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}})
    done, train_id = submit(ray_head, tmp_path, "train", config, "--shards", str(shards), "--name", "submitted",
                            options=("--runtime-env", runtime_env))  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checkpoint = re.search(r'"checkpoint": "([^"]+)"', done.stdout)
    assert checkpoint, done.stdout[-3000:]
    assert checkpoint[1].startswith(str(tmp_path / "ray" / "submitted"))
    assert (Path(checkpoint[1]) / CHECKPOINT_FILE).is_file()
    run_id = re.search(r'"mlflow_run_id": "(\w+)"', done.stdout)[1]
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"

    assert [str(client.get_job_status(j)) for j in (prep_id, train_id)] == ["SUCCEEDED", "SUCCEEDED"]
    assert checkpoint[1] in client.get_job_logs(train_id)
    listed = {line.split()[0]: line.split()[1:] for line in list_jobs(client)}  # `vistr jobs list`
    assert listed[prep_id][0] == listed[train_id][0] == "SUCCEEDED"
    assert (listed[prep_id][3], listed[train_id][3]) == ("preprocess", "train")
    # `vistr jobs` talks to the --address it is given even when RAY_ADDRESS names another cluster.
    elsewhere = {**ray_head.env, "RAY_ADDRESS": "127.0.0.1:9"}
    status = vistr(
        ray_head, tmp_path, "jobs", "status", train_id, "--address", ray_head.dashboard_url, env=elsewhere
    )
    assert (status.returncode, status.stdout.strip()) == (0, f"{train_id} SUCCEEDED"), status.stderr[-2000:]


def test_a_job_with_a_bad_config_fails_and_submit_says_why(ray_head, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 1\n  bogus_key: 3\n")
    done, job_id = submit(ray_head, tmp_path, "train", bad, "--shards", str(tmp_path / "none"))
    assert done.returncode == 1
    assert "error: _job/bad.yaml: unknown config key(s) train.bogus_key" in done.stdout
    assert f"job {job_id} FAILED: the entrypoint exited with code 1" in done.stderr
    client = jobs_api(ray_head)
    assert str(client.get_job_status(job_id)) == "FAILED"
