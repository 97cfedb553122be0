"""`vistr workflow` on the session's Ray cluster with a sqlite MLflow store: an injected failure in
evaluate, a re-run that reuses preprocess and train (same run ids) and finishes, a third run that
reuses everything; the champion it promotes loads through ``models:/NAME@champion``."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipelines.workflow import FAIL_ENV, STEPS, WorkflowError, run_workflow, status
from vistr.config import load_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    store = tmp_path_factory.mktemp("wf_mlflow")
    return load_config("tiny_cpu", {
        "model.enc_layers": 1, "model.dec_layers": 1, "data.augment": False, "train.epochs": 1,
        "train.max_steps_per_epoch": 2, "train.validate_every": 0,
        "train.num_workers": 1, "train.cpus_per_worker": 0.5,
        "tracking.tracking_uri": f"sqlite:///{store / 'mlflow.db'}", "tracking.experiment": "test-workflow",
        "tracking.registered_model": "wf-model",
    })  # fmt: skip


def test_failed_workflow_resumes_from_finished_steps_and_then_only_reports(
    ray_local, synth_root, cfg, tmp_path, monkeypatch
) -> None:
    out, messages = tmp_path / "wf", []
    monkeypatch.setenv(FAIL_ENV, "evaluate")
    with pytest.raises(WorkflowError, match="step evaluate failed: InjectedFailure"):
        run_workflow(cfg, synth_root, out, progress=messages.append)
    first = {r["step"]: r for r in status(cfg, synth_root, out)}
    assert [first[s]["state"] for s in STEPS] == ["done", "done", "pending", "pending", "pending"]
    client = MlflowClient(cfg.tracking.tracking_uri)
    failed = client.search_runs([client.get_experiment_by_name("test-workflow").experiment_id],
                                filter_string="tags.`vistr.step` = 'evaluate'")  # fmt: skip
    assert [r.info.status for r in failed] == ["FAILED"]

    monkeypatch.delenv(FAIL_ENV)
    second = run_workflow(cfg, synth_root, out, progress=messages.append)
    assert [second[s]["state"] for s in STEPS] == ["reused", "reused", "ran", "ran", "ran"]
    assert second["preprocess"]["run_id"] == first["preprocess"]["run_id"]
    assert second["train"]["run_id"] == first["train"]["run_id"]
    assert second["promote"]["decision"]["promoted"] is True  # the first model becomes champion
    version = client.get_model_version_by_alias("wf-model", "champion")
    assert str(version.version) == second["register"]["version"]
    assert version.tags["promotion.decision"] == "promoted"
    # the evaluate step's scores were cached on the version: promote did not evaluate again
    assert float(version.tags[f"eval.{second['evaluate']['eval_set']}.AP"]) == pytest.approx(
        second["evaluate"]["metrics"]["AP"], abs=1e-6
    )

    third = run_workflow(cfg, synth_root, out, progress=messages.append)
    assert all(third[s]["state"] == "reused" for s in STEPS)
    assert {s: third[s]["run_id"] for s in STEPS} == {s: second[s]["run_id"] for s in STEPS}
    assert [r["state"] for r in status(cfg, synth_root, out)] == ["done"] * len(STEPS)
    parents = client.search_runs([client.get_experiment_by_name("test-workflow").experiment_id],
                                 filter_string="tags.`vistr.workflow` != ''", order_by=["attributes.start_time ASC"])  # fmt: skip
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED", "FINISHED"]
    assert parents[-1].data.tags["step.train"] == f"reused {first['train']['run_id']}"

    # a changed training setting invalidates train and everything after it, not preprocess
    changed = {r["step"]: r["state"] for r in status(cfg.with_overrides({"train.lr": 1e-4}), synth_root, out)}
    assert changed == {"preprocess": "done", "train": "pending", "evaluate": "pending", "register": "pending",
                       "promote": "pending"}  # fmt: skip
