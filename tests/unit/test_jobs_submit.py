"""`vistr submit` without a cluster: argument parsing, the job package, specs, runtime envs, the
entrypoint and how a job's end becomes an exit status. tests/integration/test_submit.py submits for real."""

from __future__ import annotations

import json
import re
import shlex
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from jobs._entry import STAGES, StageError
from pipelines import submit as sub
from pipelines.jobs_client import report_end
from pipelines.submit import (
    JobSpec,
    SubmitError,
    build_package,
    check_stage_args,
    entrypoint,
    load_runtime_env,
    load_spec,
    merge_runtime_env,
    package_files,
)
from vistr.cli import COMMANDS, build_parser
from vistr.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "jobs" / "specs").glob("*.yaml"))


def test_stage_arguments_follow_the_submission_options() -> None:
    parser = build_parser()
    args = parser.parse_args(["submit", "train", "--config", "c.yaml", "--follow", "--address", "http://h:8265",
                              "--", "--shards", "/s", "--name", "n"])  # fmt: skip
    assert (args.stage, args.config, args.follow, args.address) == ("train", "c.yaml", True, "http://h:8265")
    assert args.stage_args == ["--shards", "/s", "--name", "n"]
    args = parser.parse_args(
        ["submit", "--address", "http://h:8265", "--python", "/v/bin/python", "preprocess"]
    )
    assert (args.stage, args.address, args.python, args.stage_args) == (
        "preprocess",
        "http://h:8265",
        "/v/bin/python",
        [],
    )
    args = parser.parse_args(["submit", "--spec", "jobs/specs/paper_r50.yaml", "--follow"])
    assert (args.spec, args.stage, args.follow) == (Path("jobs/specs/paper_r50.yaml"), None, True)
    assert not hasattr(parser.parse_args(["submit", "train"]), "address")  # unset: the client's default


@pytest.mark.parametrize("argv", [["submit"], ["submit", "--spec", "s.yaml", "train"]])
def test_a_stage_or_a_spec_not_both(argv, capsys) -> None:
    assert sub.run(build_parser().parse_args(argv)) == 1
    assert "give either a STAGE" in capsys.readouterr().err


def make_checkout(root: Path) -> None:
    for name in ["README.md", "pyproject.toml", "jobs/train.py", "vistr/__init__.py", "vistr/data/clips.py",
                 "configs/a.yaml", "benchmarks/b.py", "benchmarks/results/r.json", "vistr/__pycache__/c.pyc",
                 "stray.pyc", ".gitignore", ".git/HEAD", ".venv/bin/python", "myenv/pyvenv.cfg", "myenv/lib/m.py",
                 "runs/ray/x", "data/ytvis/a.json", "tests/test_x.py", "mlruns/0/m", "vistr.egg-info/PKG-INFO"]:  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (root / "vistr" / "presets").symlink_to("../configs")
    (root / "configs" / "loop").symlink_to("..")  # followed, it would never end


def test_the_package_holds_code_and_configs_only(tmp_path) -> None:
    make_checkout(tmp_path)
    assert list(package_files(tmp_path)) == [
        "README.md", "benchmarks/b.py", "configs/a.yaml", "jobs/train.py", "pyproject.toml",
        "vistr/__init__.py", "vistr/data/clips.py", "vistr/presets/a.yaml",
    ]  # fmt: skip


def test_the_config_travels_with_the_package(tmp_path, capsys) -> None:
    root = tmp_path / "checkout"
    root.mkdir()
    make_checkout(root)
    outside = tmp_path / "my config.yaml"
    outside.write_text("train: {}\n")
    cases = {
        str(outside): "_job/my config.yaml",  # from elsewhere: copied in
        str(root / "configs/a.yaml"): "configs/a.yaml",  # in the checkout: its path there
        str(root / "runs/ray/x"): "_job/x",  # in a part that is not sent: copied in
        "tiny_cpu": "tiny_cpu",  # a preset
        "/cluster/cfg.yaml": "/cluster/cfg.yaml",  # a path on the cluster
        None: None,
    }
    for i, (config, expected) in enumerate(cases.items()):
        package, job_config = build_package(tmp_path / f"p{i}.zip", config, root)
        assert job_config == expected
        names = zipfile.ZipFile(package).namelist()
        assert (expected in names) == (expected is not None and expected.startswith(("_job/", "configs/")))
        if expected and expected.startswith("_job/"):
            assert zipfile.ZipFile(package).read(expected) == Path(config).read_bytes()
    assert (
        "/cluster/cfg.yaml is not a local file or preset: the job reads it on the cluster"
        in capsys.readouterr().err
    )


def test_this_checkouts_package(tmp_path, monkeypatch) -> None:
    files = package_files(ROOT)
    assert {"pyproject.toml", "jobs/_entry.py", "jobs/train.py", "vistr/cli.py", "pipelines/train.py",
            "configs/paper_r50.yaml", "vistr/presets/tiny_cpu.yaml"} <= set(files)  # fmt: skip
    assert not [
        n for n in files if n.split("/")[0] in {"tests", "runs", "data", ".venv", ".git"} or ".pyc" in n
    ]
    assert sum(p.stat().st_size for p in files.values()) < 5 * 2**20
    monkeypatch.setattr(sub, "MAX_PACKAGE_MB", 0.01)
    with pytest.raises(SubmitError, match=r"would hold .* MiB \(limit 0\); largest: "):
        build_package(tmp_path / "p.zip", None, ROOT)


def test_entrypoint_is_one_shell_command() -> None:
    command = entrypoint("train", "_job/my config.yaml", ["--shards", "/s"], python="/opt/venv/bin/python")
    assert shlex.split(command) == ["/opt/venv/bin/python", "-m", "jobs.train", "--config", "_job/my config.yaml",
                                    "--shards", "/s"]  # fmt: skip
    assert entrypoint("promote", None, ["--data", "/d"]) == "python -m jobs.promote --data /d"


def test_runtime_env_from_file_or_json(tmp_path) -> None:
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars: {A: '1', B: '2'}\npip: [rich]\n")
    env = merge_runtime_env(load_runtime_env(str(env_file)), load_runtime_env('{"env_vars": {"B": "3"}}'))
    assert env == {"env_vars": {"A": "1", "B": "3"}, "pip": ["rich"]}
    with pytest.raises(SubmitError, match="runtime_env sets working_dir"):
        merge_runtime_env({"working_dir": "s3://b/code.zip"})
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    with pytest.raises(SubmitError, match="expected a mapping"):
        load_runtime_env(str(tmp_path / "list.yaml"))
    with pytest.raises(SubmitError, match="not a JSON object nor a readable YAML/JSON file"):
        load_runtime_env(str(tmp_path / "missing.yaml"))
    big = {"env_vars": {f"V{i}": "x" * 20 for i in range(20)}}  # longer than a file name may be
    assert load_runtime_env(json.dumps(big)) == big


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_job_specs_are_valid(spec) -> None:
    job = load_spec(spec)
    assert job.stage in STAGES and job.description
    assert Path(job.config).is_file(), f"{spec.name}: config {job.config} is not in the checkout"
    if job.stage == "tune":
        assert Path(job.config).parent == ROOT / "configs" / "ablations"
    else:
        load_config(job.config)
    if job.stage in COMMANDS:  # arguments as `vistr <stage>` parses them (tune: once it is registered)
        check_stage_args(job)


def test_specs_cover_the_paper_runs_and_every_ablation() -> None:
    jobs = [load_spec(s) for s in SPECS]
    trained = {
        (j.config, tuple(j.args[j.args.index("--num-workers") :][:4])) for j in jobs if j.stage == "train"
    }
    for name in ("paper_r50", "paper_r101"):
        assert (
            str(ROOT / "configs" / f"{name}.yaml"),
            ("--num-workers", "8", "--gpus-per-worker", "1"),
        ) in trained
    campaigns = sorted(Path(j.config) for j in jobs if j.stage == "tune")
    assert campaigns and campaigns == sorted((ROOT / "configs" / "ablations").glob("*.yaml"))


def test_bad_specs_name_the_problem(tmp_path, capsys) -> None:
    cases = {
        "stage: train\nconfig: tiny_cpu\nrutnime_env: {}\n": "unknown key(s) rutnime_env",
        "stage: trian\n": "stage must be one of preprocess, train",
        "stage: train\nargs: --shards /s\n": "args must be a list",
        "- stage: train\n": "a job spec is a mapping",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"s{i}.yaml"
        path.write_text(text)
        with pytest.raises(SubmitError, match=re.escape(message)):
            load_spec(path)
    with pytest.raises(SystemExit):  # argparse, before anything is sent
        check_stage_args(JobSpec(stage="train", config="tiny_cpu"))
    assert "the following arguments are required: --shards" in capsys.readouterr().err
    with pytest.raises(StageError, match="takes no config"):
        check_stage_args(JobSpec(stage="evaluate", config="tiny_cpu", args=["--data", "/d"]))


def test_how_a_job_ended_becomes_the_exit_status(capsys) -> None:
    def job(status: str, message: str = "", code: int | None = None) -> SimpleNamespace:
        return SimpleNamespace(
            submission_id="raysubmit_1", status=status, message=message, driver_exit_code=code
        )

    assert report_end(job("SUCCEEDED"), logs_shown=True) == 0
    failed = job(
        "FAILED", "Job entrypoint command failed with exit code 1, last available logs:\nerror: x", 1
    )
    assert report_end(failed, logs_shown=True) == 1
    assert report_end(failed, logs_shown=False) == 1
    assert report_end(job("FAILED", "Failed to set up runtime environment: no pip"), logs_shown=True) == 1
    assert report_end(job("STOPPED", "Job was intentionally stopped."), logs_shown=True) == 1
    assert capsys.readouterr().err.splitlines() == [
        "job raysubmit_1 SUCCEEDED",
        "job raysubmit_1 FAILED: the entrypoint exited with code 1 (its log is above)",
        "job raysubmit_1 FAILED: Job entrypoint command failed with exit code 1, last available logs:",
        "error: x",
        "job raysubmit_1 FAILED: Failed to set up runtime environment: no pip",
        "job raysubmit_1 STOPPED: Job was intentionally stopped.",
    ]


def test_the_rayjob_manifest_runs_a_job_train_accepts() -> None:
    manifest = yaml.safe_load((ROOT / "infra" / "k8s" / "rayjob.yaml").read_text())
    python, flag, module, *args = shlex.split(manifest["spec"]["entrypoint"])
    assert (python, flag, module) == ("python", "-m", "jobs.train")
    check_stage_args(JobSpec(stage="train", args=args))
