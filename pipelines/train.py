"""`vistr train`: VisTR with DDP on Ray Train, streamed from the Parquet clip shards, tracked in MLflow.

The driver validates the shards, creates (or, with ``--resume``, finds) the MLflow run, and fits a
``TorchTrainer`` whose workers all run ``vistr.trainer.run_epochs`` (the one epoch loop) over
``get_dataset_shard("train")``. After every epoch all ranks call ``ray.train.report``; rank 0
attaches the checkpoint, and Ray keeps the best ``train.keep_checkpoints`` by
``train.checkpoint_metric`` (the latest is always kept too).

Faults: a worker that dies restarts the worker group from the latest checkpoint (up to
``train.max_failures`` times) with the global step and the lr schedule restored; a re-run with the
same ``--storage`` and ``--resume NAME`` continues a stopped run. ``VISTR_FAIL_AT_STEP=k`` kills
the last rank before global step k+1, once per run (a marker file in the run directory records it).
A NaN/Inf loss is not retried: the failing rank writes ``nonfinite_loss.txt`` beside the
checkpoints, the restarted workers see it and stop, and the driver reports the error; the last
good checkpoint stays (``--resume`` clears the marker and continues from it).

Workers agree before each batch (one all-reduce) that every rank has a batch and time is left,
so uneven shards or ``train.max_minutes`` can never leave one rank waiting in a collective.
Validation (every ``train.validate_every`` epochs) runs the official inference clip of each
validation video, the videos split across ranks, and scores the gathered results with
``vistr.evaluation`` against the validation annotation file (rank 0); prefixed ``val_``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.ray_runtime import connect
from vistr import storage as fsio
from vistr.config import Config, ConfigError, from_dict, load_config

FAIL_ENV = "VISTR_FAIL_AT_STEP"
STORAGE_ENV = "VISTR_STORAGE_PATH"  # cluster-wide shared storage root: default run storage is <it>/ray
NONFINITE_MARKER = "nonfinite_loss.txt"
CHECKPOINT_FILE = "checkpoint.pt"
TRACE_DIR = "data_trace"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class TrainError(RuntimeError):
    """The training run failed or cannot start; the message says why and what to do."""


# ---------------------------------------------------------------- worker side


def _all_ranks(flag: bool, device: torch.device) -> bool:
    """True iff ``flag`` is true on every rank (one all-reduce; local value without DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


class AgreedBatches:
    """Yield batches while every rank has one and the deadline (unix time) has not passed."""

    def __init__(self, batches: Iterable[dict], device: torch.device, deadline: float | None,
                 seen: list | None = None) -> None:  # fmt: skip
        self.batches, self.device, self.deadline, self.seen = batches, device, deadline, seen

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.batches)
        while True:
            batch = next(batches, None)
            in_time = self.deadline is None or time.time() < self.deadline
            if not _all_ranks(batch is not None and in_time, self.device):
                return
            if self.seen is not None:
                self.seen += [[t["video_id"], t["frame_ids"].tolist()] for t in batch["targets"]]
            yield batch


def _pinned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {k: _pinned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pinned(v) for v in value]
    return value


def _collate(cfg: Config, pin: bool) -> Any:
    """The shard collate; on CUDA its output is pinned so the engine's non_blocking copy overlaps."""
    from pipelines.shards import ClipBatchCollate

    class PinnedClipBatchCollate(ClipBatchCollate):
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            return _pinned(super().__call__(batch))

    return PinnedClipBatchCollate(cfg) if pin else ClipBatchCollate(cfg)


def inference_clips(files: list[str], lengths: dict[int, int], num_frames: int,
                    videos: set[int]) -> Iterator[tuple[torch.Tensor, dict, int]]:  # fmt: skip
    """The official inference clip of each of ``videos`` from the validation shards, normalised."""
    import pyarrow.parquet as pq

    from pipelines.shards import arrow_batch_to_numpy, batch_rows, eval_transform
    from vistr.data.shards import decode_clip
    from vistr.trainer import inference_frame_ids

    transform, found = eval_transform(), set()
    for path in files:
        index = pq.read_table(path, columns=["video_id", "frame_ids"]).to_pylist()
        rows = [
            i for i, r in enumerate(index)
            if r["video_id"] in videos and r["video_id"] not in found
            and list(r["frame_ids"]) == inference_frame_ids(lengths[r["video_id"]], num_frames).tolist()
        ]  # fmt: skip
        if not rows:
            continue
        for row in batch_rows(arrow_batch_to_numpy(pq.read_table(path).take(rows))):
            if row["video_id"] in found:  # a clip stored twice (clip_stride 1, short video)
                continue
            frames, target = transform(*decode_clip(row))
            found.add(target["video_id"])
            yield frames, target, min(lengths[target["video_id"]], num_frames)
    if videos - found:
        raise TrainError(
            f"the validation shards lack the inference clip (first {num_frames} frames) of video(s) "
            f"{sorted(videos - found)[:10]}; preprocess the valid split with data.clip_stride 1"
        )


def train_loop_per_worker(loop: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: restore, then ``run_epochs`` with Ray data, reports and MLflow."""
    import ray.train
    import ray.train.torch

    from pipelines.tracking import log_metrics
    from vistr.data.shard_settings import SCHEMA_VERSION
    from vistr.engine import NonFiniteLossError
    from vistr.trainer import build_state, run_epochs

    cfg = from_dict(loop["config"], "train loop config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir, nonfinite = loop["run_dir"], f"{loop['run_dir']}/{NONFINITE_MARKER}"
    if fsio.exists(nonfinite):  # a restart after a NaN loss: stop, the driver reports it
        return {"stopped": "nonfinite", "message": fsio.read_text(nonfinite)}

    device = ray.train.torch.get_device()
    state = build_state(cfg, device, wrap=ray.train.torch.prepare_model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state.restore(Path(folder) / CHECKPOINT_FILE)
    torch.manual_seed(cfg.train.seed + 1000 * state.epoch + rank)  # augmentation draws per rank

    client = None
    if rank == 0:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(loop["tracking_uri"])

    def on_log(record: dict[str, float], step: int) -> None:
        if client is not None:
            log_metrics(client, loop["run_id"], record, step)

    if checkpoint is not None:  # the step this attempt resumed from: restarts are visible in MLflow
        on_log({"restored_global_step": state.global_step}, state.global_step)

    shard, collate = ray.train.get_dataset_shard("train"), _collate(cfg, device.type == "cuda")
    batch_size, buffer = cfg.train.batch_size, cfg.data.shuffle_buffer
    # The time budget counts from here, once the workers are up: Ray Train's start-up (~50 s on
    # 2 CPUs) must not eat a short budget. Ranks differ by seconds; they agree on stopping.
    deadline = None if cfg.train.max_minutes is None else time.time() + 60 * cfg.train.max_minutes
    seen: list = []

    def batches(epoch: int) -> AgreedBatches:
        seen.clear()
        rows = shard.iter_torch_batches(
            batch_size=batch_size, collate_fn=collate, drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=max(buffer, batch_size) if buffer > 0 else None,
            local_shuffle_seed=cfg.train.seed + 7919 * epoch + rank,
        )  # fmt: skip
        return AgreedBatches(rows, device, deadline, seen if loop["trace_data"] else None)

    validate = None
    if loop["val"] is not None:
        val = loop["val"]
        lengths = {int(k): v for k, v in val["lengths"].items()}
        mine = {v for i, v in enumerate(sorted(lengths)) if i % world == rank}

        def validate(model: torch.nn.Module, epoch: int) -> dict[str, float]:
            import torch.distributed as dist

            from vistr.evaluation import evaluate
            from vistr.trainer import validate_clips

            clips = inference_clips(val["files"], lengths, cfg.model.num_frames, mine)
            results = validate_clips(state.unwrapped, clips, cfg.model.num_slots, device)
            parts = [results]
            if world > 1:
                parts = [None] * world
                dist.all_gather_object(parts, results)
            if rank != 0:
                return {}
            # lenient: predictions cover the first T frames, scored as the official evaluator zips them
            stats = evaluate(val["gt"], [r for part in parts for r in part], lenient=True)
            return {f"val_{k}": v for k, v in stats.items()}

    fail_at, fail_marker = loop["fail_at_step"], f"{run_dir}/injected_failure.txt"

    def before_step(step: int) -> None:
        if fail_at is not None and step == fail_at and rank == world - 1 and not fsio.exists(fail_marker):
            fsio.write_text(fail_marker, f"{FAIL_ENV}={fail_at}: rank {rank} killed before step {step + 1}\n")
            os._exit(1)  # a worker dying mid-epoch, not an exception it could handle

    score = loop["score_attribute"]

    def save(st: Any, record: dict[str, float]) -> None:
        metrics = dict(record)
        if score is not None:
            metrics.setdefault(score, float("nan"))  # not validated this epoch: first to be dropped
        if loop["trace_data"]:
            fsio.write_text(f"{run_dir}/{TRACE_DIR}/epoch{st.epoch:03d}-rank{rank}.json", json.dumps(seen))
        if rank != 0:  # only rank 0's metrics and checkpoint are kept
            ray.train.report(metrics)
            return
        # A fingerprint of the saved weights: a reloaded checkpoint must reproduce it exactly.
        metrics["weights_checksum"] = float(sum(p.double().sum() for p in st.unwrapped.state_dict().values()))
        on_log({"weights_checksum": metrics["weights_checksum"]}, st.global_step)
        with tempfile.TemporaryDirectory() as folder:
            st.save(Path(folder) / CHECKPOINT_FILE, cfg, st.epoch, extra={"shard_schema_version": SCHEMA_VERSION})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def time_up() -> bool:  # agreed by all ranks, so all of them stop after the same epoch
        return not _all_ranks(deadline is None or time.time() < deadline, device)

    try:
        run_epochs(cfg, state, batches, save, time_up=time_up, on_log=on_log, validate=validate,
                   before_step=before_step)  # fmt: skip
    except NonFiniteLossError as exc:
        fsio.write_text(nonfinite, f"rank {rank}: {exc}\n")
        raise
    return {"stopped": "done", "epoch": state.epoch, "global_step": state.global_step}


# ---------------------------------------------------------------- driver


@dataclass
class TrainOutcome:
    name: str
    run_id: str  # MLflow
    run_dir: str  # Ray Train run directory (storage/name)
    checkpoint: str | None  # latest checkpoint directory
    best_checkpoint: str | None
    metrics: dict[str, Any]  # rank 0's last report


def _validation_setup(cfg: Config, shards: Path, val_ann: str | None) -> dict[str, Any] | None:
    """Validation inputs for the workers: shard files, GT path and video lengths (None = disabled)."""
    from pipelines.shards import load_manifest, shard_files

    if cfg.train.validate_every <= 0:
        return None
    files = [str(f) for f in shard_files(shards, cfg, "valid")]
    gt = val_ann or load_manifest(shards).get("source", {}).get("valid", {}).get("annotation")
    if not gt or not Path(gt).is_file():
        raise TrainError(
            f"validation needs the valid split's annotation file ({gt or 'not in the manifest'} is not "
            "readable here): pass --val-ann FILE, or set train.validate_every: 0"
        )
    videos = json.loads(Path(gt).read_text())["videos"]
    return {"files": files, "gt": str(Path(gt).resolve()), "lengths": {str(v["id"]): v["length"] for v in videos}}


def _mlflow_run(client: Any, cfg: Config, name: str, storage: str, resume: bool, tags: dict[str, str]) -> str:
    from pipelines.tracking import config_params, find_run, get_or_create_experiment, log_params, set_tags

    experiment = get_or_create_experiment(client, cfg.tracking.experiment)
    keys = {"vistr_train_name": name, "vistr_storage": storage}
    run_id = find_run(client, experiment, keys) if resume else None
    if run_id is None:
        run_id = client.create_run(experiment, run_name=name, tags=keys).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    log_params(client, run_id, config_params(cfg))
    set_tags(client, run_id, tags)
    return run_id


def _log_checkpoint(client: Any, run_id: str, checkpoint: Any, artifact_path: str) -> str:
    with checkpoint.as_directory() as folder:
        client.log_artifacts(run_id, folder, artifact_path=artifact_path)
    return checkpoint.path


def train(
    cfg: Config,
    shards: str | Path,
    *,
    name: str | None = None,
    resume: str | None = None,
    storage: str | None = None,
    num_workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    address: str | None = None,
    val_ann: str | None = None,
    trace_data: bool = False,
    config_file: str | Path | None = None,
    run_tags: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
) -> TrainOutcome:
    """Run (or resume) a Ray Train fit of ``cfg`` on the shard directory ``shards``.

    ``run_tags`` go onto the MLflow run (``mlflow.parentRunId`` makes it a child of a workflow or
    campaign run); ``callbacks`` are ``ray.train.UserCallback``s (a Tune trial passes
    ``TuneReportCallback`` so every epoch report reaches its scheduler).
    """
    from pipelines.shards import shard_files
    from pipelines.tracking import client_for, log_loss_curve, resolve_tracking_uri, system_info

    overrides = {k: v for k, v in {"train.num_workers": num_workers, "train.gpus_per_worker": gpus_per_worker,
                                   "train.cpus_per_worker": cpus_per_worker, "train.storage_path": storage}.items()
                 if v is not None}  # fmt: skip
    cfg = cfg.with_overrides(overrides, "vistr train arguments")
    t = cfg.train
    shared = os.environ.get(STORAGE_ENV)  # set by the cluster image / manifests (ray_cluster.yaml)
    storage = t.storage_path or (f"{shared.rstrip('/')}/ray" if shared else str(PROJECT_ROOT / "runs" / "ray"))
    storage = fsio.canonical(storage)
    if resume and name and name != resume:
        raise TrainError(f"--name {name} and --resume {resume} differ; --resume NAME alone continues a run")
    name = resume or name or time.strftime("vistr-%Y%m%d-%H%M%S")
    run_dir = f"{storage}/{name}"
    if resume and not fsio.exists(run_dir):
        raise TrainError(f"--resume {resume}: no run {run_dir}; check --storage and the name")
    if not resume and fsio.exists(run_dir):
        raise TrainError(f"{run_dir} already exists: pass --resume {name} to continue it, or another --name")
    shards = Path(shards)
    shard_files(shards, cfg, "train")  # manifest, schema and settings checked before any Ray work
    val = _validation_setup(cfg, shards, val_ann)
    if resume:
        fsio.delete(f"{run_dir}/{NONFINITE_MARKER}")

    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.shards import open_shards

    started = connect(address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per epoch and rank floods logs
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    client = client_for(tracking_uri)
    tags = {**system_info(t.num_workers, t.gpus_per_worker), "shards": str(shards.resolve()), "ray_run_dir": run_dir,
            **(run_tags or {})}
    run_id = _mlflow_run(client, cfg, name, storage, bool(resume), tags)
    try:
        with tempfile.TemporaryDirectory() as folder:
            from vistr.config import save_config

            client.log_artifact(run_id, str(save_config(cfg, Path(folder) / "config.yaml")))
            if config_file is not None and Path(config_file).is_file():
                client.log_artifact(run_id, str(config_file), artifact_path="source_config")
        score = t.checkpoint_metric if (val is not None or not t.checkpoint_metric.startswith("val_")) else None
        fail_at = os.environ.get(FAIL_ENV)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.to_dict(), "run_dir": run_dir, "tracking_uri": tracking_uri, "run_id": run_id,
                "val": val, "trace_data": trace_data, "score_attribute": score,
                "fail_at_step": int(fail_at) if fail_at else None,
            },  # fmt: skip
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.gpus_per_worker else {})},
            ),  # fmt: skip
            datasets={"train": open_shards(shards, cfg, "train").randomize_block_order()},
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=score,
                    checkpoint_score_order=t.checkpoint_mode,
                ),
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                callbacks=callbacks,
            ),  # fmt: skip
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise TrainError(f"training run {name} failed after {t.max_failures} restart(s): {exc}") from exc
        stopped = result.return_value or {}
        if stopped.get("stopped") == "nonfinite":
            last = result.checkpoint.path if result.checkpoint else "none"
            raise TrainError(
                f"training run {name} stopped on a non-finite loss: {stopped['message'].strip()} "
                f"Last good checkpoint: {last} (--resume {name} continues from it with its optimizer state, "
                "lr included; fix the data, or start a new run with a lower train.lr)."
            )
        best = result.get_best_checkpoint(score, t.checkpoint_mode) if score and result.best_checkpoints else None
        outcome = TrainOutcome(name, run_id, run_dir, None, None, dict(result.metrics or {}))
        if result.checkpoint is not None:
            outcome.checkpoint = _log_checkpoint(client, run_id, result.checkpoint, "checkpoints/final")
        if best is not None:
            outcome.best_checkpoint = _log_checkpoint(client, run_id, best, "checkpoints/best")
        with tempfile.TemporaryDirectory() as folder:
            log_loss_curve(client, run_id, folder)
        client.set_terminated(run_id, "FINISHED")
        return outcome
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        if started:
            ray.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config YAML or preset name")
    parser.add_argument("--shards", required=True, type=Path, help="shard directory from `vistr preprocess`")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (default: train.num_workers)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default: train.gpus_per_worker)")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default: train.cpus_per_worker)")
    parser.add_argument("--storage", help="run storage: directory or pyarrow URI (default: train.storage_path, "
                        f"else ${STORAGE_ENV}/ray, else runs/ray); shared storage on a multi-node cluster")  # fmt: skip
    parser.add_argument("--name", help="run name (default: vistr-<date>-<time>)")
    parser.add_argument("--resume", metavar="RUN_NAME", help="continue the run of this name in --storage")
    parser.add_argument("--address", help="Ray cluster: 'auto', host:port or ray://host:port (default: local)")
    parser.add_argument("--val-ann", help="validation annotation JSON (default: the one the shards were built from)")
    parser.add_argument("--trace-data", action="store_true",
                        help="record the clips each rank trains on under <run>/data_trace/")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pipelines.shards import ShardError

    try:
        outcome = train(
            load_config(args.config), args.shards, name=args.name, resume=args.resume, storage=args.storage,
            num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker, address=args.address, val_ann=args.val_ann,
            trace_data=args.trace_data, config_file=args.config,
        )  # fmt: skip
    except (TrainError, ShardError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"name": outcome.name, "mlflow_run_id": outcome.run_id, "checkpoint": outcome.checkpoint,
                      "best_checkpoint": outcome.best_checkpoint}, indent=1))  # fmt: skip
    return 0
