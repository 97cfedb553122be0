"""MLflow helpers against a local sqlite store: URI resolution, params within MLflow's limits,
metric logging and curves (replayed steps), run lookup by tags, the loss-curve artifact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from pipelines import tracking
from vistr.config import load_config


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> MlflowClient:
    root = tmp_path_factory.mktemp("mlflow")
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def test_tracking_uri_precedence(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri("http://config:5000") == "http://config:5000"
    assert tracking.resolve_tracking_uri(None) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tracking.PROJECT_ROOT / 'runs' / 'mlflow.db'}"


def test_config_params_are_the_flat_config_within_the_value_limit() -> None:
    cfg = load_config("tiny_cpu")
    params = tracking.config_params(cfg)
    assert params.keys() == cfg.flat().keys()
    assert params["model.hidden_dim"] == "96" and params["data.multiscale"] == "[64, 72, 80]"
    assert params["model.backbone_weights"] == "None" and params["train.amp"] == "True"
    long = tracking.param_value(list(range(3000)))
    assert len(long) == MAX_PARAM_VAL_LENGTH and long.endswith(tracking.TRUNCATED)
    assert long.startswith("[0, 1, 2, 3")


def test_params_metrics_curves_and_lookup(client, tmp_path) -> None:
    exp = tracking.get_or_create_experiment(client, "unit")
    assert tracking.get_or_create_experiment(client, "unit") == exp
    run = client.create_run(exp, tags={"vistr_train_name": "a", "vistr_storage": "/s"}).info.run_id
    client.create_run(exp, tags={"vistr_train_name": "b", "vistr_storage": "/s"})
    assert tracking.find_run(client, exp, {"vistr_train_name": "a", "vistr_storage": "/s"}) == run
    assert tracking.find_run(client, exp, {"vistr_train_name": "a", "vistr_storage": "/other"}) is None

    params = {f"p{i:03d}": i for i in range(250)}  # more than one MLflow batch (100)
    tracking.log_params(client, run, params)
    tracking.log_params(client, run, {**params, "late": "x"})  # a resumed run: only new keys are sent
    assert client.get_run(run).data.params == {**{k: str(v) for k, v in params.items()}, "late": "x"}

    tracking.log_metrics(client, run, {"train/loss": 3.0, "bad": math.nan, "inf": math.inf, "flag": True,
                                       "name": "x"}, step=1)  # fmt: skip
    assert client.get_run(run).data.metrics == {"train/loss": 3.0}
    for step, value in [(2, 2.0), (3, 1.5), (3, 1.0), (4, 0.5)]:  # step 3 replayed after a restart
        tracking.log_metrics(client, run, {"train/loss": value, "train/loss_ce": value / 2}, step=step)
    curves = tracking.metric_curves(client, run, ["train/loss", "missing"])
    assert curves == {"train/loss": [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]}

    path = tracking.log_loss_curve(client, run, tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [a.path for a in client.list_artifacts(run, "plots")] == ["plots/loss_curve.png"]
    # artifacts live beside the sqlite database, not in ./mlruns of whatever directory this runs in
    db_dir = Path(client.tracking_uri[len("sqlite:///"):]).parent
    assert (db_dir / "mlartifacts" / run / "artifacts" / "plots" / "loss_curve.png").is_file()
    assert tracking.artifact_root("http://127.0.0.1:5000") is None


def test_system_info_names_the_layout_and_versions() -> None:
    import torch

    info = tracking.system_info(num_workers=4, gpus_per_worker=0.5)
    assert info["sys.num_workers"] == "4" and info["sys.total_gpus"] == "2.0"
    assert info["sys.torch"] == torch.__version__ and all(isinstance(v, str) and v for v in info.values())
