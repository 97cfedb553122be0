"""`vistr train` on the session's Ray cluster against a real `mlflow server`: DDP over streamed
shards, a worker killed mid-epoch and the run resumed, checkpoints, tracking, a NaN stop.

Ray Train costs ~50 s from fit() to the first step, so one run carries most assertions: two
workers, three epochs of six steps, the last rank killed before step 8 (mid-epoch 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.preprocess import run_preprocess
from pipelines.tracking import config_params
from pipelines.train import CHECKPOINT_FILE, FAIL_ENV, NONFINITE_MARKER, TRACE_DIR, TrainError, train
from vistr.checkpoint import load_checkpoint, model_from_checkpoint
from vistr.config import load_config
from vistr.evaluation import STAT_NAMES

pytestmark = pytest.mark.integration
STEPS, EPOCHS, FAIL_AT = 6, 3, 7  # the fail fires before step 8: epoch 1 (steps 7..12) is replayed from 6


@pytest.fixture(scope="module")
def cfg(mlflow_server):
    return load_config("tiny_cpu", {
        "model.enc_layers": 1, "model.dec_layers": 1, "data.augment": False, "train.epochs": EPOCHS, "train.max_steps_per_epoch": STEPS,
        "train.batch_size": 2, "train.log_every": 1, "train.validate_every": 1, "train.keep_checkpoints": 2,
        "train.cpus_per_worker": 0.5, "train.max_failures": 1,
        "tracking.tracking_uri": mlflow_server.url, "tracking.experiment": "test-train",
    })  # fmt: skip


@pytest.fixture(scope="module")
def shards(ray_local, synth_root, cfg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_shards")
    run_preprocess(cfg, synth_root, out, shard_mb=0.3)
    return out


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) in logging order."""
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]


def state_checksum(state: dict[str, torch.Tensor]) -> float:
    return float(sum(v.double().sum() for v in state.values()))


def test_ddp_run_survives_a_killed_worker_and_tracks_everything(
    cfg, shards, synth_spec, mlflow_server, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv(FAIL_ENV, str(FAIL_AT))
    out = train(cfg, shards, name="ddp", storage=str(tmp_path / "ray"), num_workers=2, trace_data=True)
    run_dir = Path(out.run_dir)
    assert "killed before step 8" in (run_dir / "injected_failure.txt").read_text()

    # Each epoch, the two ranks trained on disjoint clips of the train split, batch 2 x 6 steps each.
    for epoch in range(EPOCHS):
        ranks = [json.loads((run_dir / TRACE_DIR / f"epoch{epoch:03d}-rank{r}.json").read_text()) for r in (0, 1)]
        clips = [{(vid, tuple(ids)) for vid, ids in seen} for seen in ranks]
        assert [len(seen) for seen in ranks] == [2 * STEPS] * 2 and all(len(c) == 2 * STEPS for c in clips)
        assert not clips[0] & clips[1], f"epoch {epoch}: both ranks saw {clips[0] & clips[1]}"
        assert {vid for c in clips for vid, _ in c} <= set(range(1, synth_spec.num_videos + 1))

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ddp"
    effective = cfg.with_overrides({"train.num_workers": 2, "train.storage_path": str(tmp_path / "ray")})
    assert run.data.params == config_params(effective)
    assert run.data.tags["sys.num_workers"] == "2" and run.data.tags["sys.torch"] == torch.__version__

    # Global steps: 1..7 by the first attempt, then 7..18 from the epoch-0 checkpoint (step 6):
    # only the replayed partial epoch repeats, nothing is skipped.
    steps = [s for s, _ in history(client, out.run_id, "train/loss")]
    assert steps == list(range(1, FAIL_AT + 1)) + list(range(STEPS + 1, EPOCHS * STEPS + 1))
    assert history(client, out.run_id, "restored_global_step") == [(STEPS, STEPS)]
    for key in ("train/loss_ce", "train/loss_mask", "train/loss_dice", "lr/transformer", "lr/backbone"):
        assert [s for s, _ in history(client, out.run_id, key)] == steps
    losses = [v for _, v in history(client, out.run_id, "train/loss")]
    assert sum(losses[-STEPS:]) < 0.95 * sum(losses[:STEPS]), losses  # it learns: last epoch vs first

    epoch_ends = [STEPS * (e + 1) for e in range(EPOCHS)]
    for key in ["samples_per_s", "data_wait_fraction", "epoch/loss"] + [f"val_{s}" for s in STAT_NAMES]:
        assert [s for s, _ in history(client, out.run_id, key)] == epoch_ends, key
    assert all(v > 0 for _, v in history(client, out.run_id, "samples_per_s"))
    assert all(0 <= v <= 1 for _, v in history(client, out.run_id, "data_wait_fraction"))
    assert all(-1 <= v <= 1 for _, v in history(client, out.run_id, "val_AP"))

    # The final checkpoint holds exactly the weights rank 0 had after the last epoch, and the copy
    # logged to MLflow (over HTTP) is the same file.
    payload = load_checkpoint(Path(out.checkpoint) / CHECKPOINT_FILE)
    assert (payload["epoch"], payload["global_step"]) == (EPOCHS - 1, EPOCHS * STEPS)
    assert payload["extra"]["shard_schema_version"] == 1 and payload["config"] == effective.to_dict()
    model, _ = model_from_checkpoint(Path(out.checkpoint) / CHECKPOINT_FILE)
    assert state_checksum(model.state_dict()) == pytest.approx(
        history(client, out.run_id, "weights_checksum")[-1][1], rel=1e-12, abs=0)
    local = client.download_artifacts(out.run_id, f"checkpoints/final/{CHECKPOINT_FILE}", str(tmp_path / "dl"))
    logged = torch.load(local, weights_only=False)["model"]
    assert all(torch.equal(logged[k], v) for k, v in payload["model"].items()) and logged.keys() == payload["model"].keys()
    # StepLR stepped once per finished epoch across the restart.
    assert payload["scheduler"]["last_epoch"] == EPOCHS
    artifacts = {a.path for a in client.list_artifacts(out.run_id)} | {
        a.path for a in client.list_artifacts(out.run_id, "plots")}
    assert {"config.yaml", "checkpoints", "plots/loss_curve.png"} <= artifacts

    with pytest.raises(TrainError, match="already exists"):  # a name is never silently reused
        train(cfg, shards, name="ddp", storage=str(tmp_path / "ray"), num_workers=2)


def test_resume_then_a_nonfinite_loss_stops_the_run_keeping_the_last_good_checkpoint(
    cfg, shards, mlflow_server, tmp_path
) -> None:
    short = cfg.with_overrides({"train.epochs": 1, "train.max_steps_per_epoch": 2, "train.validate_every": 0})
    first = train(short, shards, name="nan", storage=str(tmp_path / "ray"), num_workers=2)
    # Resumed for a second epoch with a loss term weighted by inf: its first loss is not finite.
    diverging = short.with_overrides({"train.epochs": 2, "loss.giou_loss_coef": float("inf")})
    with pytest.raises(TrainError, match="non-finite loss") as err:
        train(diverging, shards, resume="nan", storage=str(tmp_path / "ray"), num_workers=2)
    assert "epoch 1 step 2" in (tmp_path / "ray" / "nan" / NONFINITE_MARKER).read_text()
    assert f"Last good checkpoint: {first.checkpoint} " in str(err.value)
    payload = load_checkpoint(Path(first.checkpoint) / CHECKPOINT_FILE)
    assert (payload["epoch"], payload["global_step"]) == (0, 2)
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(first.run_id)  # the resumed attempt logged to the same run
    assert run.info.status == "FAILED"
    assert [s for s, _ in history(client, first.run_id, "train/loss")] == [1, 2]
    assert history(client, first.run_id, "restored_global_step") == [(2, 2)]


def test_cli_errors_name_the_problem_before_starting_ray_work(shards, tmp_path, capsys) -> None:
    from vistr.cli import main

    base = ["train", "--config", "tiny_cpu", "--storage", str(tmp_path)]
    assert main([*base, "--shards", str(shards), "--resume", "nope"]) == 1
    assert f"--resume nope: no run {tmp_path.resolve()}/nope" in capsys.readouterr().err
    assert main([*base, "--shards", str(tmp_path / "missing"), "--name", "x"]) == 1
    assert "no manifest.json" in capsys.readouterr().err
    assert main([*base, "--shards", str(shards), "--name", "a", "--resume", "b"]) == 1
    assert "--name a and --resume b differ" in capsys.readouterr().err
