"""`vistr tune CAMPAIGN.yaml`: Ray Tune campaigns over Ray Train runs, tracked in MLflow.

The campaign file is parsed and checked before a trial starts (``pipelines.campaign``). Each
trial is one ``pipelines.train.train`` call (a Ray Train fit inside the Tune trial, its epoch reports forwarded
by ``TuneReportCallback``) whose MLflow run is a child of the campaign's parent run. Shards are
built by the driver before the trials, one directory per distinct preprocessing setting under the
campaign's shard cache (a clip-length campaign needs shards per T).

Resume (``--resume``, after the driver died): Tune restores its experiment; a finished trial
whose completion Tune had not yet saved is recognised by its FINISHED MLflow child run and only
re-reports its metrics; an unfinished trial resumes its Ray Train run from the last checkpoint
into the same MLflow run. At the end the best trial's full config is written as a ready-to-train
YAML, logged with the Table-1 report (pipelines/report.py) to the parent run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.campaign import DEFAULT_STORAGE, Campaign, CampaignError, load_campaign
from vistr.config import Config, ConfigError, from_dict, parse_overrides, save_config
from vistr.data.shard_settings import preprocess_settings, settings_hash

PARENT_TAG, DIR_TAG, TRIAL_TAG, SETTING_TAG = (
    "vistr_campaign",
    "vistr_campaign_dir",
    "vistr_trial_id",
    "vistr_setting",
)
CAMPAIGN_FILE, BEST_CONFIG = "campaign.json", "best_config.yaml"


def tune_space(search_space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Campaign distributions -> a Tune ``param_space`` keyed by the dotted config keys."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}  # fmt: skip
    return {key: make[kind](args) for key, spec in search_space.items() for kind, args in spec.items()}


# ---------------------------------------------------------------- data, trials, driver


def _dataset(campaign: Campaign) -> Path:
    """The campaign's dataset directory; a synthetic one is generated once into the shard cache."""
    data = campaign.data
    if "src" in data:
        return Path(data["src"])
    from vistr.data.synthetic import SynthSpec, generate_dataset

    spec = data["synthetic"]
    root = Path(data["shards"]) / f"synthetic-{settings_hash(spec)}"
    if not root.is_dir():  # generated beside it, renamed when complete: a dataset here is whole
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        generate_dataset(tmp, SynthSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}),
                         progress=False)  # fmt: skip
        tmp.rename(root)
    return root


def prepare_shards(campaign: Campaign, cfg: Config, address: str | None = None) -> dict[str, str]:
    """Build (or find complete) one shard directory per preprocessing setting the trials can use,
    keyed by its settings hash; a second campaign with the same settings reuses them."""
    from pipelines.preprocess import run_preprocess

    src, base = _dataset(campaign), settings_hash(preprocess_settings(cfg))
    finite = {k: args for k, spec in campaign.search_space.items() for kind, args in spec.items()
              if kind in ("choice", "grid")}  # fmt: skip
    relevant = {k: v for k, v in finite.items()
                if any(settings_hash(preprocess_settings(cfg.with_overrides({k: x}))) != base for x in v)}  # fmt: skip
    shards: dict[str, str] = {}
    for combo in itertools.product(*relevant.values()):
        trial_cfg = cfg.with_overrides(dict(zip(relevant, combo, strict=True)))
        key = settings_hash(preprocess_settings(trial_cfg))
        if key not in shards:
            out = Path(campaign.data["shards"]) / key
            run_preprocess(trial_cfg, src, out, shard_mb=campaign.data["shard_mb"], address=address)
            shards[key] = str(out)
    return shards


def child_runs(client: Any, parent_run_id: str, trial_id: str | None = None) -> list[Any]:
    """The MLflow child runs of a campaign run (of one trial if ``trial_id``), oldest first."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.{TRIAL_TAG} = '{trial_id}'"
    return client.search_runs([experiment], filter_string=query, order_by=["attributes.start_time ASC"])


def run_trial(params: dict[str, Any], plan: dict[str, Any]) -> None:
    """One Tune trial: a Ray Train fit of the base config with this trial's ``params``."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.tracking import client_for
    from pipelines.train import train
    from vistr import storage as fsio

    trial_id = tune.get_context().get_trial_id()
    cfg = from_dict(plan["config"], f"campaign {plan['name']}").with_overrides(params, f"trial {trial_id}")
    done = [r for r in child_runs(client_for(plan["tracking_uri"]), plan["parent_run_id"], trial_id)
            if r.info.status == "FINISHED"]  # fmt: skip
    if done:  # finished before the driver died, after Tune last saved its state: not trained again
        tune.report(dict(done[-1].data.metrics))
        return
    name = f"{plan['name']}_{trial_id}"
    again = fsio.exists(f"{plan['train_storage']}/{name}")  # an interrupted trial: its run continues
    tags = {"mlflow.parentRunId": plan["parent_run_id"], PARENT_TAG: plan["name"], TRIAL_TAG: trial_id,
            SETTING_TAG: json.dumps(params, sort_keys=True)}  # fmt: skip
    train(cfg, plan["shards"][settings_hash(preprocess_settings(cfg))], name=None if again else name,
          resume=name if again else None, storage=plan["train_storage"], run_tags=tags,
          callbacks=[TuneReportCallback()])  # fmt: skip


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _parent_run(client: Any, campaign: Campaign, cfg: Config, resume: bool) -> str:
    from pipelines.tracking import find_run, get_or_create_experiment, log_params

    experiment = get_or_create_experiment(client, cfg.tracking.experiment)
    keys = {PARENT_TAG: campaign.name, DIR_TAG: campaign.experiment_dir}
    run_id = find_run(client, experiment, keys) if resume else None
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    run_id = client.create_run(experiment, run_name=campaign.name, tags=keys).info.run_id
    params = {"base": campaign.base, "metric": campaign.metric, "mode": campaign.mode,
              "scheduler": json.dumps(campaign.scheduler), "num_samples": campaign.num_samples,
              **{f"search.{k}": json.dumps(v) for k, v in campaign.search_space.items()}}  # fmt: skip
    log_params(client, run_id, params)
    client.log_artifact(run_id, str(Path(campaign.experiment_dir) / CAMPAIGN_FILE))
    return run_id


def _check_experiment_dir(campaign: Campaign, resume: bool) -> None:
    """A new campaign needs a fresh directory; ``--resume`` needs the same campaign as before."""
    exp_dir, stored = Path(campaign.experiment_dir), Path(campaign.experiment_dir) / CAMPAIGN_FILE
    if not resume:
        if exp_dir.exists():
            raise CampaignError(
                f"{exp_dir} already exists: pass --resume to continue that campaign, or rename it"
            )
        return
    if not stored.is_file():
        raise CampaignError(
            f"--resume: no campaign {campaign.name} in {campaign.storage} (check --storage and --scale)"
        )
    before, current = json.loads(stored.read_text()), json.loads(json.dumps(campaign.to_dict()))
    changed = sorted(k for k in before.keys() | current.keys() if before.get(k) != current.get(k))
    if changed:
        raise CampaignError(f"--resume: the campaign differs from the one started in {exp_dir} in: {', '.join(changed)}; "
                            "resume it with the same file, --scale and --set, or start a new one under another name")  # fmt: skip


def _check_cluster_cpus(campaign: Campaign, cfg: Config) -> None:
    """A trial must leave one CPU for its shard reads (a Ray Data read task takes 1): otherwise it
    waits forever (seen here: trial 0.5 + one worker x 1.0 of 2 CPUs)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    need = campaign.trial_cpus + cfg.train.num_workers * cfg.train.cpus_per_worker
    if need + 1 > total:
        raise CampaignError(
            f"{campaign.source}: a trial holds {need:g} CPUs (resources.trial_cpus + num_workers x cpus_per_worker) "
            f"of the cluster's {total:g}, and its shard reads need 1 more: lower resources.cpus_per_worker or "
            "trial_cpus, or use a larger cluster"
        )


def _tuner(campaign: Campaign, trainable: Any, resume: bool) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    exp_dir = campaign.experiment_dir
    if resume and tune.Tuner.can_restore(exp_dir):
        return tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True)
    s = campaign.scheduler  # a new campaign, or one killed before Tune saved any state
    # stop_last_trials=False: a trial reaching max_t ends by itself and its run is logged FINISHED.
    scheduler = (ASHAScheduler(max_t=s["max_t"], grace_period=s["grace_period"], reduction_factor=s["reduction_factor"],
                               stop_last_trials=False)
                 if s["type"] == "asha" else FIFOScheduler())  # fmt: skip
    return tune.Tuner(
        trainable, param_space=tune_space(campaign.search_space),
        tune_config=tune.TuneConfig(
            metric=campaign.metric, mode=campaign.mode, num_samples=campaign.num_samples,
            max_concurrent_trials=campaign.max_concurrent_trials, scheduler=scheduler,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name=campaign.name, storage_path=campaign.storage),
    )  # fmt: skip


def _finish(campaign: Campaign, cfg: Config, results: Any, client: Any, parent: str) -> dict[str, Any]:
    """Settle the trial runs' status, write and log the best config and the report."""
    from pipelines.report import write_report
    from pipelines.tracking import log_metrics, set_tags

    # A trial the scheduler stopped was killed inside train(): its run says RUNNING or FAILED.
    stopped = {(r.metrics or {}).get("trial_id") for r in results if not r.error}
    for child in child_runs(client, parent):
        if child.info.status != "FINISHED" and child.data.tags.get(TRIAL_TAG) in stopped:
            client.set_terminated(child.info.run_id, "KILLED")
            set_tags(client, child.info.run_id, {"vistr_stopped_by": "scheduler"})
        elif child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "FAILED")
    errored = [r.path for r in results if r.error]
    if not any(campaign.metric in (r.metrics or {}) for r in results if not r.error):
        raise CampaignError(
            f"no trial of {campaign.name} reported {campaign.metric}; errored trials: {errored}"
        )
    best = results.get_best_result(campaign.metric, campaign.mode, scope="last", filter_nan_and_inf=True)
    trial = best.metrics["trial_id"]
    exp_dir = Path(campaign.experiment_dir)
    best_file = save_config(cfg.with_overrides(best.config, f"best trial {trial}"), exp_dir / BEST_CONFIG)
    client.log_artifact(parent, str(best_file))
    runs = child_runs(client, parent, trial)
    set_tags(client, parent, {"best_trial_id": trial, "best_run_id": runs[-1].info.run_id if runs else ""})
    log_metrics(client, parent, {f"best_{campaign.metric}": best.metrics[campaign.metric]}, 0)
    report = write_report(client, parent, exp_dir / "report")
    if errored:
        raise CampaignError(f"{len(errored)} trial(s) failed (see {', '.join(errored)}); "
                            f"`vistr tune {campaign.source} --resume` retries them")  # fmt: skip
    return {"campaign": campaign.name, "mlflow_run_id": parent, "best_trial": trial,
            campaign.metric: best.metrics[campaign.metric], "best_config": str(best_file), **report}  # fmt: skip


def run_campaign(campaign: Campaign, resume: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) the campaign; returns the best trial and the written files."""
    from ray import tune

    from pipelines.ray_runtime import connect
    from pipelines.tracking import client_for, resolve_tracking_uri

    _check_experiment_dir(campaign, resume)
    uri = resolve_tracking_uri(campaign.config.tracking.tracking_uri)
    cfg = campaign.config.with_overrides({"tracking.tracking_uri": uri})  # trials log where the driver does
    # Shards first, in a Ray session of their own (run_preprocess connects and disconnects): when this
    # driver's Ray session had run the preprocessing Ray Data job, the second trial's shard reads
    # starved forever here ("Cluster resources are not enough", Ray 2.60), twice out of twice.
    shards = prepare_shards(campaign, cfg, address)
    started = connect(address)
    try:
        _check_cluster_cpus(campaign, cfg)
        exp_dir = Path(campaign.experiment_dir)
        if not resume:
            exp_dir.mkdir(parents=True)
            (exp_dir / CAMPAIGN_FILE).write_text(json.dumps(campaign.to_dict(), indent=1))
        client = client_for(uri)
        parent = _parent_run(client, campaign, cfg, resume)
        plan = {"name": campaign.name, "config": cfg.to_dict(), "parent_run_id": parent, "tracking_uri": uri,
                "train_storage": str(exp_dir / "train_runs"), "shards": shards}  # fmt: skip
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, plan=plan), {"cpu": campaign.trial_cpus}
        )
        try:
            summary = _finish(campaign, cfg, _tuner(campaign, trainable, resume).fit(), client, parent)
        except BaseException:
            client.set_terminated(parent, "FAILED")
            raise
        client.set_terminated(parent, "FINISHED")
        return summary
    finally:
        if started:
            import ray

            ray.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "campaign", type=Path, help="campaign YAML (e.g. configs/ablations/b_query_level.yaml)"
    )
    parser.add_argument(
        "--scale", help="apply the file's scales.NAME section (e.g. cpu); the campaign is named NAME-SCALE"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every trial (YAML value), e.g. --set data.root=/data/ytvis")  # fmt: skip
    parser.add_argument(
        "--storage", help=f"campaign folder root (default: the file's storage, else {DEFAULT_STORAGE})"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the campaign after its driver stopped"
    )
    parser.add_argument(
        "--address", help="Ray cluster: 'auto', host:port or ray://host:port (default: local)"
    )


def run(args: argparse.Namespace) -> int:
    from pipelines.preprocess import PreprocessError
    from pipelines.shards import ShardError
    from pipelines.train import TrainError

    started = time.monotonic()
    try:
        campaign = load_campaign(args.campaign, args.scale, parse_overrides(args.set), args.storage)
        summary = run_campaign(campaign, resume=args.resume, address=args.address)
    except (CampaignError, ConfigError, PreprocessError, ShardError, TrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({**summary, "minutes": round((time.monotonic() - started) / 60, 1)}, indent=1))
    return 0
