"""Campaign files: parsing, validation errors that name the key, the Tune search space, the ablation
files at both scales, and the Table-1 report built from metric dicts."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from pipelines.campaign import CampaignError, load_campaign
from pipelines.report import Row, markdown_table, summarize
from pipelines.tune import tune_space
from vistr.config import load_config

PROJECT = Path(__file__).resolve().parents[2]
ABLATIONS = sorted((PROJECT / "configs" / "ablations").glob("*.yaml"))


def write(tmp_path: Path, **changes) -> Path:
    """A valid tiny campaign with ``changes`` applied (None deletes a key)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    campaign = {
        "name": "t",
        "base": "tiny_cpu",
        "overrides": {"train.epochs": 2},
        "search_space": {"train.lr": {"loguniform": [1e-4, 1e-3]}, "model.query_level": {"grid": ["frame", "prediction"]}},
        "metric": "val_AP",
        "scheduler": {"type": "asha", "grace_period": 1},
        "resources": {"trial_cpus": 0.5, "num_workers": 1, "cpus_per_worker": 0.5},
        "data": {"src": str(tmp_path / "data")},
        "storage": str(tmp_path / "campaigns"),
    }  # fmt: skip
    for key, value in changes.items():
        if value is None:
            campaign.pop(key, None)
        else:
            campaign[key] = value
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(campaign))
    return path


def test_a_valid_campaign_gets_defaults_resources_and_absolute_paths(tmp_path: Path) -> None:
    c = load_campaign(write(tmp_path), sets={"loss.eos_coef": 0.2})
    assert c.name == "t" and c.mode == "max" and c.num_samples == 1 and c.trial_cpus == 0.5
    assert c.scheduler == {
        "type": "asha",
        "grace_period": 1,
        "max_t": 2,
        "reduction_factor": 2,
    }  # max_t = epochs
    assert (c.config.train.num_workers, c.config.train.cpus_per_worker, c.config.train.epochs) == (1, 0.5, 2)
    assert c.config.loss.eos_coef == 0.2 and c.overrides == {"train.epochs": 2, "loss.eos_coef": 0.2}
    assert c.experiment_dir == str((tmp_path / "campaigns" / "t").resolve())
    assert c.data["shards"] == str((tmp_path / "campaigns" / "shards").resolve())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"search_space": {"train.lrr": {"choice": [1e-4]}}}, r"unknown config key 'train\.lrr' \(did you mean train\.lr"),
        ({"search_space": {"model.query_level": {"grid": ["video", "clip"]}}}, r"model\.query_level='clip'"),
        ({"search_space": {"train.lr": {"normal": [0, 1]}}}, r"search_space\.train\.lr: expected one of"),
        ({"search_space": {"train.lr": {"uniform": [1e-3, 1e-4]}}}, r"train\.lr\.uniform: expected \[low, high\]"),
        ({"search_space": {"train.lr": {"loguniform": [0, 1e-3]}}}, r"train\.lr\.loguniform: the lower bound must be > 0"),
        ({"search_space": {"train.epochs": {"randint": [1.5, 4]}}}, r"train\.epochs\.randint: bounds must be integers"),
        ({"search_space": {"model.position_encoding": {"choice": []}}}, r"position_encoding\.choice: expected a non-empty list"),
        ({"search_space": {"model.num_frames": {"randint": [2, 6]}}}, r"model\.num_frames: changes the preprocessed shards"),
        ({"search_space": {}}, r"search_space: give at least one"),
        ({"metric": "val_mAP"}, r"metric 'val_mAP' is not reported by training"),
        ({"overrides": {"train.validate_every": 0}}, r"metric val_AP needs train\.validate_every: 1"),
        ({"overrides": {"train.epoch": 3}}, r"overrides: unknown config key 'train\.epoch'"),
        ({"mode": "maximum"}, r"mode='maximum'"),
        ({"scheduler": {"type": "asha", "grace_period": 5}}, r"grace_period <= max_t"),
        ({"scheduler": {"type": "hyperband"}}, r"scheduler\.type='hyperband'"),
        ({"resources": {"gpus": 1}}, r"unknown key\(s\) resources\.gpus"),
        ({"resources": {"trial_cpus": 0}}, r"resources\.trial_cpus must be > 0"),
        ({"seeds": 3}, r"unknown campaign key\(s\) seeds"),
        ({"num_samples": 0}, r"num_samples must be an integer >= 1"),
        ({"data": {"src": "/nonexistent/ytvis"}}, r"data\.src /nonexistent/ytvis is not a directory"),
        ({"data": None}, r"no dataset: set data\.src"),
        ({"labels": {"model.backbone": {"resnet18": "R18"}}}, r"labels: .*\['model\.backbone'\] are not searched"),
        ({"base": "paper_r30"}, r"base: paper_r30: no such config file or preset"),
    ],
)  # fmt: skip
def test_invalid_campaigns_fail_naming_the_key(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(CampaignError, match=message):
        load_campaign(write(tmp_path, **changes))


def test_loss_terms_are_valid_metrics_and_need_no_validation(tmp_path: Path) -> None:
    c = load_campaign(
        write(tmp_path, metric="epoch/loss_dice", mode="min", overrides={"train.validate_every": 0})
    )
    assert (c.metric, c.mode) == ("epoch/loss_dice", "min")


def test_cli_reports_an_invalid_campaign_before_any_trial(tmp_path: Path, capsys) -> None:
    from vistr.cli import main

    path = write(tmp_path, search_space={"model.querylevel": {"grid": ["frame"]}})
    assert main(["tune", str(path)]) == 1
    assert (
        "unknown config key 'model.querylevel' (did you mean model.query_level?)" in capsys.readouterr().err
    )
    assert not (tmp_path / "campaigns").exists()  # nothing started, nothing written
    assert main(["tune", str(write(tmp_path)), "--set", "train.lr"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_search_space_becomes_tune_distributions() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    space = tune_space({
        "model.query_level": {"grid": ["video", "prediction"]}, "loss.eos_coef": {"choice": [0.05, 0.1]},
        "train.lr": {"loguniform": [1e-5, 1e-3]}, "train.weight_decay": {"uniform": [0.0, 0.1]},
        "train.epochs": {"randint": [2, 5]},
    })  # fmt: skip
    assert space["model.query_level"] == {"grid_search": ["video", "prediction"]}
    assert isinstance(space["loss.eos_coef"], Categorical) and space["loss.eos_coef"].categories == [
        0.05,
        0.1,
    ]
    lr, wd, epochs = space["train.lr"], space["train.weight_decay"], space["train.epochs"]
    assert (
        isinstance(lr, Float)
        and isinstance(lr.get_sampler(), LogUniform)
        and (lr.lower, lr.upper) == (1e-5, 1e-3)
    )
    assert isinstance(wd, Float) and (wd.lower, wd.upper) == (0.0, 0.1)
    assert isinstance(epochs, Integer) and (epochs.lower, epochs.upper) == (2, 5)
    assert all(2 <= epochs.sample() < 5 for _ in range(20))


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_files_at_paper_and_cpu_scale(path: Path, tmp_path: Path) -> None:
    text = path.read_text()
    assert "--scale cpu" in text and "--set data.root=" in text  # the documented override, in the file
    paper = load_campaign(path, sets={"data.root": str(tmp_path)})
    cpu = load_campaign(path, scale="cpu")
    assert paper.config.model.backbone == "resnet50" and paper.config.train.epochs == 10  # Table 1 setting
    assert paper.config.train.gpus_per_worker == 1 and paper.data["src"] == str(tmp_path.resolve())
    assert cpu.name == f"{paper.name}-cpu" and cpu.config.model.backbone == "resnet18"
    assert cpu.config.train.gpus_per_worker == 0 and "synthetic" in cpu.data
    assert paper.scheduler == cpu.scheduler == {"type": "fifo"} and paper.metric == cpu.metric == "val_AP"
    (key,) = paper.search_space
    values = next(iter(cpu.search_space[key].values()))
    configs = [cpu.config.with_overrides({key: v}) for v in values]
    assert len({c.hash() for c in configs}) == len(values) >= 2  # every setting trains a different model


def test_paper_tables_settings() -> None:
    b = load_campaign(PROJECT / "configs/ablations/b_query_level.yaml", scale="cpu")
    assert b.search_space == {"model.query_level": {"grid": ["video", "frame", "instance", "prediction"]}}
    assert b.labels["model.query_level"]["instance"] == "ins. level"
    d = load_campaign(PROJECT / "configs/ablations/d_position_encoding.yaml", scale="cpu")
    assert d.labels == {"model.position_encoding": {"false": "w/o", "true": "w"}}
    a = load_campaign(PROJECT / "configs/ablations/a_clip_length.yaml", sets={"data.root": str(PROJECT)})
    assert a.search_space == {"model.num_frames": {"grid": [18, 24, 30, 36]}}


def test_example_search_campaign_loads() -> None:
    c = load_campaign(PROJECT / "configs/campaigns/lr_eos.yaml", scale="cpu")
    assert c.scheduler["type"] == "asha" and c.num_samples == 4 and c.name == "lr_eos-cpu"
    assert load_config("tiny_cpu").model.num_frames in c.search_space["model.num_frames"]["choice"]


def test_report_table_in_table1_layout() -> None:
    space = {"model.query_level": {"grid": ["video", "frame", "instance", "prediction"]}}
    labels = {"model.query_level": {"video": "video level", "prediction": "pred. level"}}
    trials = [
        ({"model.query_level": "prediction"}, {"AP": 0.333, "AP50": 0.534, "AP75": 0.351, "AR1": 0.331, "AR10": 0.385}),
        ({"model.query_level": "video"}, {"AP": 0.084, "AP50": 0.132, "AP75": 0.095, "AR1": 0.2, "AR10": 0.208}),
        ({"model.query_level": "instance"}, {"AP": 0.32, "AP50": 0.528, "AP75": None, "AR1": 0.316, "AR10": 0.372}),
    ]  # fmt: skip
    expected = (
        "| model.query_level | AP | AP<sub>50</sub> | AP<sub>75</sub> | AR<sub>1</sub> | AR<sub>10</sub> |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |\n"
        "| video level | 8.4 | 13.2 | 9.5 | 20.0 | 20.8 |\n"
        "| instance | 32.0 | 52.8 | – | 31.6 | 37.2 |\n"
        "| pred. level | 33.3 | 53.4 | 35.1 | 33.1 | 38.5 |\n"
    )
    assert markdown_table(summarize(trials, space, labels), "model.query_level") == expected


def test_report_averages_repeated_settings_and_names_several_keys() -> None:
    space = {"model.position_encoding": {"grid": [False, True]}, "train.lr": {"loguniform": [1e-4, 1e-3]}}
    trials = [
        ({"model.position_encoding": True, "train.lr": 1e-4}, dict.fromkeys(("AP", "AP50", "AP75", "AR1", "AR10"), 0.2)),
        ({"model.position_encoding": True, "train.lr": 1e-4}, dict.fromkeys(("AP", "AP50", "AP75", "AR1", "AR10"), 0.4)),
        ({"model.position_encoding": False, "train.lr": 1e-4}, {"AP": math.nan}),
    ]  # fmt: skip
    rows = summarize(trials, space, {"model.position_encoding": {"false": "w/o", "true": "w"}})
    assert [r.setting for r in rows] == ["position_encoding=w/o, lr=0.0001", "position_encoding=w, lr=0.0001"]
    assert (
        rows[1].trials == 2
        and rows[1].metrics["AP"] == pytest.approx(0.3)
        and math.isnan(rows[0].metrics["AP"])
    )
    table = markdown_table(rows, "setting")
    assert table.splitlines()[0].endswith("| trials |") and re.search(
        r"\| 30\.0 \| .* \| 2 \|$", table.splitlines()[3]
    )
    assert (
        markdown_table([Row("x", dict.fromkeys(("AP", "AP50", "AP75", "AR1", "AR10"), 1.0), 1)], "s").count(
            "100.0"
        )
        == 5
    )
