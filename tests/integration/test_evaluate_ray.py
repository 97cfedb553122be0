"""`vistr evaluate`: Ray Data inference over a split gives exactly the single-process results."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from pipelines.evaluate import evaluate_model, split_rows
from pipelines.model_source import load_model
from vistr.checkpoint import save_checkpoint
from vistr.config import load_config
from vistr.data.video_io import read_image
from vistr.evaluation import evaluate
from vistr.inference import ClipPredictor
from vistr.models import build_model
from vistr.predict import default_overlap, predict_stream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    cfg = load_config("tiny_cpu")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=None))
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", build_model(cfg), config=cfg)


def _single_process(checkpoint: Path, synth_root: Path) -> list[dict]:
    """The reference: the same model, one process, one thread (as each 1-CPU Ray actor runs)."""
    model, cfg, _ = load_model(str(checkpoint))
    predictor = ClipPredictor(model, cfg)
    _, rows = split_rows(synth_root, "valid", cfg.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for row in rows:
            files = json.loads(row["frames"])
            stitcher = predict_stream(predictor, map(read_image, files), len(files), default_overlap(6))
            results += stitcher.results(row["video_id"])
    finally:
        torch.set_num_threads(threads)
    return results


def test_ray_evaluation_equals_single_process(ray_local, checkpoint, synth_root, synth_spec, tmp_path):
    metrics = evaluate_model(str(checkpoint), synth_root, split="valid", out=tmp_path, num_actors=2)
    results = json.loads((tmp_path / "results_val.json").read_text())
    expected = _single_process(checkpoint, synth_root)
    assert len(expected) > synth_spec.num_val_videos  # several tracks per video, some videos > T frames
    assert [(r["video_id"], r["category_id"], r["segmentations"]) for r in results] == \
        [(r["video_id"], r["category_id"], r["segmentations"]) for r in expected]
    assert [r["score"] for r in results] == pytest.approx([r["score"] for r in expected], abs=1e-6)
    ann = synth_root / "annotations" / "instances_val_sub.json"
    assert metrics == evaluate(ann, results)
    assert json.loads((tmp_path / "metrics_val.json").read_text()) == metrics


def test_bad_split_and_missing_model_fail_clearly(tmp_path, synth_root):
    with pytest.raises(ValueError, match="unknown split"):
        split_rows(synth_root, "test", load_config("tiny_cpu").data)
    with pytest.raises(ValueError, match="model file not found"):
        evaluate_model(str(tmp_path / "nope.pt"), synth_root)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory):
    """A local sqlite MLflow store with a run holding the checkpoint as ``model/checkpoint.pt``."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("evaluate-test", artifact_location=str(root / "artifacts"))
    yield uri, experiment
    mlflow.set_tracking_uri(None)


def test_models_load_from_mlflow_run_uris(mlflow_store, checkpoint, tmp_path):
    import mlflow

    from pipelines.model_source import ModelSourceError, download_checkpoint, local_checkpoint

    uri, experiment = mlflow_store
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "checkpoint.pt").write_bytes(checkpoint.read_bytes())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(staged), artifact_path="model")
    for spec in (f"runs:/{run.info.run_id}/model", f"runs:/{run.info.run_id}"):
        path = download_checkpoint(spec, tracking_uri=uri, dst=tmp_path / spec.replace("/", "_").replace(":", ""))
        assert path.name == "checkpoint.pt" and path.read_bytes() == checkpoint.read_bytes()
    with local_checkpoint(f"runs:/{run.info.run_id}/model", tracking_uri=uri) as downloaded:
        assert downloaded.read_bytes() == checkpoint.read_bytes()
    assert not downloaded.parent.exists()  # the download is removed with the context
    with local_checkpoint(str(checkpoint)) as local:
        assert local == checkpoint
    assert checkpoint.is_file()  # a user's own file is never removed
    model, _, source = load_model(f"runs:/{run.info.run_id}/model", tracking_uri=uri)
    reference, _, _ = load_model(str(checkpoint))
    assert source.startswith("runs:/")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=False))
    with pytest.raises(ModelSourceError, match="pass --model"):  # no champion registered in this store
        download_checkpoint(None, tracking_uri=uri, dst=tmp_path / "champion")
    with mlflow.start_run(experiment_id=experiment) as empty:
        mlflow.log_text("x", "notes.txt")
    with pytest.raises(ModelSourceError, match="no checkpoint.pt"):
        download_checkpoint(f"runs:/{empty.info.run_id}", tracking_uri=uri, dst=tmp_path / "empty")


def test_evaluation_metrics_are_logged_to_the_given_run(ray_local, mlflow_store, checkpoint, synth_root, tmp_path):
    import mlflow

    uri, experiment = mlflow_store
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    metrics = evaluate_model(str(checkpoint), synth_root, out=tmp_path, mlflow_run=run.info.run_id, tracking_uri=uri)
    logged = mlflow.MlflowClient(uri).get_run(run.info.run_id)
    assert logged.data.metrics == pytest.approx({f"val_{k}": v for k, v in metrics.items()})
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/results_val.json", "evaluation/metrics_val.json"}


def test_cli_on_a_running_cluster(ray_head, checkpoint, synth_root, tmp_path):
    """`vistr evaluate --address` as a driver subprocess joining a `ray start` head."""
    proc = ray_head.run([sys.executable, "-m", "vistr.cli", "evaluate", "--model", str(checkpoint),
                         "--data", str(synth_root), "--out", str(tmp_path), "--address", ray_head.address])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results_val.json").read_text())
    assert [(r["video_id"], r["segmentations"]) for r in results] == \
        [(r["video_id"], r["segmentations"]) for r in _single_process(checkpoint, synth_root)]
    assert f"{'AP':>6} " in proc.stdout  # the metrics table
    bad = ray_head.run([sys.executable, "-m", "vistr.cli", "evaluate", "--model", str(tmp_path / "nope.pt"),
                        "--data", str(synth_root), "--address", ray_head.address])
    assert bad.returncode == 1 and bad.stderr.strip().startswith("vistr evaluate: error:")
    assert "Traceback" not in bad.stderr
