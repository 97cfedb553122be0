"""The model registry against a real ``mlflow server`` (sqlite backend, HTTP artifacts): the first
model becomes champion after a real Ray Data evaluation, a better challenger is promoted, a worse
one refused with its reasons as tags, rollback restores the previous champion, and
``models:/NAME@champion`` loads both as a pyfunc (predicts a clip) and as the full torch model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.model_source import load_model
from pipelines.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    RegistryError,
    eval_set_id,
    evaluate_on,
    promote,
    register_run,
    rollback,
)
from pipelines.tracking import get_or_create_experiment
from vistr.checkpoint import save_checkpoint
from vistr.config import load_config
from vistr.inference import ClipPredictor, tracks_to_results
from vistr.models import build_model

pytestmark = pytest.mark.integration
NAME = "test-registry"


@pytest.fixture(scope="module")
def client(mlflow_server) -> MlflowClient:
    return MlflowClient(mlflow_server.url)


def fake_training_run(client: MlflowClient, seed: int) -> tuple[str, torch.nn.Module]:
    """A FINISHED run laid out as `vistr train` logs it (a full checkpoint under checkpoints/final)."""
    torch.manual_seed(seed)
    cfg = load_config("tiny_cpu", {"model.enc_layers": 1, "model.dec_layers": 1})
    model = build_model(cfg).eval()
    optimizer = torch.optim.AdamW(model.parameters())
    run_id = client.create_run(get_or_create_experiment(client, "test-registry"), run_name=f"train-{seed}").info.run_id
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "checkpoint.pt", model, optimizer, config=cfg, epoch=3)
        client.log_artifact(run_id, str(path), artifact_path="checkpoints/final")
    client.set_terminated(run_id, "FINISHED")
    return run_id, model


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}


def test_promotion_gate_rollback_and_champion_loading(ray_local, synth_root, client, mlflow_server, tmp_path) -> None:
    eval_set = eval_set_id(synth_root / "annotations" / "instances_val_sub.json")
    real_eval = evaluate_on(synth_root, "valid", mlflow_server.url, tmp_path / "eval")
    scored: list[str] = []

    def evaluate(version):  # the real Ray Data evaluation, recording which versions were scored
        scored.append(str(version.version))
        return real_eval(version)

    run1, model1 = fake_training_run(client, seed=1)
    v1 = register_run(run1, name=NAME, tracking_uri=mlflow_server.url)
    assert aliases(client) == {CHALLENGER: str(v1.version)}
    first = promote(client, NAME, eval_set, evaluate)
    assert first.promoted and first.reason == "no champion yet" and scored == [str(v1.version)]
    assert aliases(client) == {CHAMPION: str(v1.version)}
    champion_ap = first.challenger_ap
    v1_tags = client.get_model_version(NAME, v1.version).tags
    assert v1_tags["promotion.decision"] == "promoted" and v1_tags["source_train_run"] == run1
    assert float(v1_tags[f"eval.{eval_set}.AP"]) == pytest.approx(champion_ap, abs=1e-6)

    # models:/NAME@champion as a pyfunc predicts a clip exactly as the model itself does
    frames = np.random.default_rng(0).integers(0, 256, (6, 48, 64, 3), dtype=np.uint8)
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}", dst_path=str(tmp_path)).predict(frames)
    cfg = load_config("tiny_cpu", {"model.enc_layers": 1, "model.dec_layers": 1})
    expected = tracks_to_results(ClipPredictor(model1, cfg)(frames), video_id=0)
    assert list(served["score"]) == pytest.approx([r["score"] for r in expected], abs=1e-5)
    assert list(served["category_id"]) == [r["category_id"] for r in expected]
    assert [json.loads(s) for s in served["segmentations"]] == [r["segmentations"] for r in expected]
    # ... and `vistr predict` gets the full torch model with the same weights
    torch_model, torch_cfg, _ = load_model(f"models:/{NAME}@{CHAMPION}", tracking_uri=mlflow_server.url)
    assert torch_cfg.model.num_slots == cfg.model.num_slots
    # the served model may be an inference-optimised copy (folded BN): compare outputs, not tensors
    clip = torch.randn(1, 6, 3, 48, 64)
    with torch.inference_mode():
        assert torch.allclose(torch_model(clip)["pred_logits"], model1(clip)["pred_logits"], atol=1e-4)

    # Better challenger (its score given directly): promoted; v1 becomes "previous". The champion's
    # score comes from its cached tag, not a second evaluation.
    better = {"AP": champion_ap + 0.2}
    run2, _ = fake_training_run(client, seed=2)
    v2 = register_run(run2, name=NAME, tracking_uri=mlflow_server.url)
    second = promote(client, NAME, eval_set, lambda v: better, margin=0.1)
    assert second.promoted and second.champion_ap == pytest.approx(champion_ap, abs=1e-6)
    assert scored == [str(v1.version)]
    assert aliases(client) == {CHAMPION: str(v2.version), PREVIOUS: str(v1.version)}

    # Worse challenger: refused, aliases unchanged, the decision and both scores as tags.
    run3, _ = fake_training_run(client, seed=3)
    v3 = register_run(run3, name=NAME, tracking_uri=mlflow_server.url)
    dry = promote(client, NAME, eval_set, lambda v: {"AP": champion_ap + 0.15}, margin=0.1, dry_run=True)
    assert not dry.promoted and aliases(client)[CHALLENGER] == str(v3.version)
    third = promote(client, NAME, eval_set, lambda v: {"AP": champion_ap + 0.15}, margin=0.1)
    assert not third.promoted
    tags = client.get_model_version(NAME, v3.version).tags
    assert tags["promotion.decision"] == "refused"
    assert float(tags["promotion.challenger_AP"]) == pytest.approx(champion_ap + 0.15, abs=1e-6)
    assert float(tags["promotion.champion_AP"]) == pytest.approx(champion_ap + 0.2, abs=1e-6)
    assert tags["promotion.champion_version"] == str(v2.version) and tags["promotion.eval_set"] == eval_set
    assert aliases(client) == {CHAMPION: str(v2.version), PREVIOUS: str(v1.version)}
    with pytest.raises(RegistryError, match="no 'challenger' version"):
        promote(client, NAME, eval_set, lambda v: better)

    old, new = rollback(client, NAME)
    assert (old, new) == (str(v2.version), str(v1.version))
    assert aliases(client) == {CHAMPION: str(v1.version)}  # v1 replaced no one: nothing older to keep
    assert "replaced by version" in client.get_model_version(NAME, v2.version).tags["rollback"]
    with pytest.raises(RegistryError, match="needs both"):
        rollback(client, NAME)


def test_register_refuses_a_run_without_checkpoints(client, mlflow_server) -> None:
    run_id = client.create_run(get_or_create_experiment(client, "test-registry"), run_name="empty").info.run_id
    with pytest.raises(RegistryError, match="no checkpoint artifact.*vistr train"):
        register_run(run_id, name=NAME, tracking_uri=mlflow_server.url)
