"""`vistr preprocess`: YouTube-VIS -> versioned Parquet clip shards with Ray Data (DESIGN.md §3).

The driver validates the annotation files, then *plans*: videos (in file order) are packed into
shards of about ``--shard-mb`` each, so the assignment of videos to shard files is a pure
function of (annotations, preprocessing settings, shard size). Ray Data then fans the shards out
as tasks; a task decodes its videos (JPEG folders with Pillow, or ``--frames-from videos``:
``<split>/videos/<folder>.mp4`` beside ``<split>/JPEGImages`` via PyAV), builds each video's target
once with ``vistr.data.clips.build_target``, resizes frames and target with the data layer's
deterministic training resize, cuts the official clips (``clip_frame_ids``) and writes one Parquet
file: to a temporary name first, renamed when complete.

Hence the safety properties: a shard file under its final name is always complete; a re-run keeps
those and builds only the missing ones (a crash costs at most the shards in flight); the
``manifest.json`` that makes the directory readable is written last, atomically; a re-run of a
finished directory with the same inputs does nothing and says so. A video whose frames are
missing or undecodable fails the run with the video id and the file; with ``--skip-bad`` it is
skipped and listed, with the reason, in the manifest. ``VISTR_FAIL_AFTER_SHARDS=k`` makes every
shard at plan position >= k crash after writing its temporary file (for tests of all this).

Ray is imported inside functions only: ``vistr --help`` imports this module.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.ray_runtime import connect
from vistr.config import Config, ConfigError, load_config
from vistr.data.shard_settings import SCHEMA_VERSION, preprocess_settings, settings_hash
from vistr.data.ytvis import YTVIS, AnnotationError

FAIL_ENV = "VISTR_FAIL_AFTER_SHARDS"
ROW_GROUP_BYTES = 64 * 2**20  # readers load whole row groups: keep them well below worker memory
FRAME_SOURCES = ("jpeg", "videos")


class PreprocessError(RuntimeError):
    """The run cannot go on (bad source videos, a directory holding other shards...)."""


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``VISTR_FAIL_AFTER_SHARDS`` to test crash recovery."""


@dataclass(frozen=True)
class SplitSource:
    split: str  # "train" | "valid"
    ann_file: Path
    frames_root: Path
    videos_root: Path  # <split>/videos beside <split>/JPEGImages


def resolve_sources(cfg: Config, src: str | Path | None, splits: list[str]) -> list[SplitSource]:
    """``--src`` is a dataset directory (config-relative layout) or one split's annotation JSON."""
    from pipelines.shards import canonical_split

    splits = [canonical_split(s) for s in splits]
    if src is None:
        if cfg.data.root is None:
            raise PreprocessError("no --src given and the config has no data.root; pass --src DATASET_DIR")
        src = cfg.data.root
    src = Path(src)
    if src.is_file():
        if len(splits) != 1:
            raise PreprocessError(
                f"--src {src} is one annotation file: name its split with --splits train|valid"
            )
        root = (
            Path(cfg.data.root)
            if cfg.data.root
            else (src.parent.parent if src.parent.name == "annotations" else src.parent)
        )
        anns = {splits[0]: src}
    elif src.is_dir():
        root = src
        anns = {s: root / (cfg.data.train_ann if s == "train" else cfg.data.val_ann) for s in splits}
    else:
        raise PreprocessError(
            f"--src {src} does not exist (expected a dataset directory or an annotation JSON)"
        )
    out = []
    for split in splits:
        frames_root = root / (cfg.data.train_frames if split == "train" else cfg.data.val_frames)
        out.append(SplitSource(split, anns[split], frames_root, frames_root.parent / "videos"))
    return out


def plan_shards(
    source: SplitSource, data: dict[str, Any], settings: dict[str, Any], shard_mb: float, start: int
) -> list[dict[str, Any]]:
    """Pack the split's videos, in file order, into shards of about ``shard_mb`` (estimated bytes)."""
    from vistr.data.transforms import resized_size  # torchvision: not at import, so --help stays quick

    ytvis = YTVIS(data, str(source.ann_file))  # full validation before any work is scheduled
    budget = shard_mb * 2**20
    groups: list[list[int]] = []
    size = 0.0
    for vid, video in ytvis.videos.items():
        h, w = resized_size(video.height, video.width, settings["min_size"], settings["max_size"])
        k, t = len(ytvis.tracks_of_video(vid)), settings["num_frames"]
        clip_bytes = t * h * w * 3 + k * t * ((h * w + 7) // 8 + 17)
        video_bytes = math.ceil(video.length / settings["clip_stride"]) * clip_bytes
        if not groups or (size + video_bytes > budget and groups[-1]):
            groups.append([])
            size = 0.0
        groups[-1].append(vid)
        size += video_bytes
    by_video = defaultdict(list)
    for ann in data.get("annotations") or []:
        by_video[int(ann["video_id"])].append(ann)
    raw_videos = {int(v["id"]): v for v in data["videos"]}
    return [
        {
            "position": start + i,
            "split": source.split,
            "file": f"{source.split}-{i:05d}-of-{len(groups):05d}.parquet",
            "videos": vids,
            "source": str(source.ann_file),
            "frames_root": str(source.frames_root),
            "videos_root": str(source.videos_root),
            "annotation": {
                "categories": data["categories"],
                "videos": [raw_videos[v] for v in vids],
                "annotations": [a for v in vids for a in by_video[v]],
            },
        }
        for i, vids in enumerate(groups)
    ]


def build_shard(item: dict[str, Any], **opts: Any) -> dict[str, Any]:
    """Ray Data map UDF: one shard task -> its Parquet file (temp + rename) and a stats row.

    Videos are written as they are processed (a row group or more each), so a worker holds one
    video's clips at a time, whatever the shard size.
    """
    from pipelines.shards import file_sha256, open_shard_writer, rows_to_table, set_shard_metadata
    from vistr.data.shards import StageTimer, video_clip_rows
    from vistr.data.video_io import VideoDecodeError

    started = time.perf_counter()
    task = json.loads(item["task"])
    ytvis = YTVIS(task["annotation"], task["source"], frames_root=task["frames_root"], check_files=False)
    timer, skipped, errors, rows, frames = StageTimer(), [], [], 0, 0
    final = Path(opts["out_dir"]) / task["file"]
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    writer = open_shard_writer(tmp, opts["compression"])
    try:
        for vid in task["videos"]:
            folder = Path(ytvis.videos[vid].file_names[0]).parent
            mp4 = (
                Path(task["videos_root"]) / f"{folder.as_posix()}.mp4"
                if opts["frames_from"] == "videos"
                else None
            )
            try:
                video = video_clip_rows(ytvis, vid, task["split"], opts["settings"], mp4, timer)
            except (VideoDecodeError, AnnotationError, FileNotFoundError) as exc:
                bad = {"split": task["split"], "video_id": vid, "video": str(folder), "reason": str(exc)}
                (skipped if opts["skip_bad"] else errors).append(bad)
                continue
            with timer("write"):
                table = rows_to_table(video)
                writer.write_table(
                    table, row_group_size=max(1, ROW_GROUP_BYTES * len(video) // max(1, table.nbytes))
                )
            rows, frames = rows + len(video), frames + ytvis.videos[vid].length
        bad_ids = {s["video_id"] for s in skipped}
        videos = [v for v in task["videos"] if v not in bad_ids]
        meta = {"file": task["file"], "split": task["split"], "schema_version": SCHEMA_VERSION}
        set_shard_metadata(writer, {**meta, "rows": rows, "videos": videos, "skipped": skipped})
    finally:
        with timer("write"):
            writer.close()
    stats = {**meta, "position": task["position"], "timings": timer, "errors": errors, "rows": rows,
             "frames_decoded": frames}  # fmt: skip
    if errors:  # not renamed: the shard is rebuilt once the source is fixed
        tmp.unlink()
        return {"stats": json.dumps(stats)}
    if opts["fail_after"] is not None and task["position"] >= opts["fail_after"]:
        raise InjectedFailure(
            f"{FAIL_ENV}={opts['fail_after']}: crashing on shard {task['file']} before its rename"
        )
    os.replace(tmp, final)
    stats.update(bytes=final.stat().st_size, sha256=file_sha256(final))
    timer["task"] = time.perf_counter() - started  # everything in the task, stages included
    return {"stats": json.dumps(stats)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run_tasks(tasks: list[dict[str, Any]], opts: dict[str, Any]) -> list[dict[str, Any]]:
    import ray.data

    items = [{"task": json.dumps(t)} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
        build_shard, fn_kwargs=opts, num_cpus=1
    )
    return [json.loads(row["stats"]) for row in ds.iter_rows()]


def plan_build(
    cfg: Config, src: str | Path | None, splits: tuple[str, ...], frames_from: str, shard_mb: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(plan, shard tasks): what to build and its identity. ``plan["plan_hash"]`` changes iff a
    shard file's content or name could change (settings, annotations, frame source, shard size)."""
    if frames_from not in FRAME_SOURCES:
        raise PreprocessError(f"--frames-from {frames_from!r}; expected one of {FRAME_SOURCES}")
    settings = preprocess_settings(cfg)
    tasks, source_info = [], {}
    for source in resolve_sources(cfg, src, list(splits)):
        if not source.ann_file.is_file():
            raise AnnotationError(
                f"{source.ann_file}: annotation file of split {source.split!r} does not exist"
            )
        raw = source.ann_file.read_bytes()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{source.ann_file}: not valid JSON ({exc})") from exc
        source_info[source.split] = {"annotation": str(source.ann_file), "sha256": _sha256(raw)}
        tasks += plan_shards(source, data, settings, shard_mb, len(tasks))
    plan = {
        "schema_version": SCHEMA_VERSION,
        "config_hash": settings_hash(settings),
        "settings": settings,
        "frames_from": frames_from,
        "shard_mb": shard_mb,
        "source": source_info,
        "source_hash": _sha256(json.dumps(source_info, sort_keys=True).encode())[:16],
        "shard_files": [t["file"] for t in tasks],
    }
    plan["plan_hash"] = _sha256(json.dumps(plan, sort_keys=True).encode())[:16]
    return plan, tasks


def _manifest(out: Path, plan: dict[str, Any], tasks: list[dict], results: dict[str, dict]) -> dict[str, Any]:
    """The manifest, from every shard's own footer (shards of a crashed earlier run included)."""
    from pipelines.shards import file_sha256, read_shard_metadata

    shards, skipped = [], []
    counts = {split: {"videos": 0, "clips": 0, "shards": 0, "skipped_videos": 0} for split in plan["source"]}
    for task in tasks:
        path = out / task["file"]
        meta = read_shard_metadata(path)
        built = results.get(task["file"]) or {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        shards.append({
            "file": task["file"], "split": task["split"], "rows": meta["rows"], "videos": meta["videos"],
            "bytes": built["bytes"], "sha256": built["sha256"],
        })  # fmt: skip
        skipped += meta["skipped"]
        count = counts[task["split"]]
        count["videos"] += len(meta["videos"])
        count["clips"] += meta["rows"]
        count["shards"] += 1
        count["skipped_videos"] += len(meta["skipped"])
    return {
        **plan,
        "counts": counts,
        "shards": shards,
        "skipped": skipped,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timings": {file: r["timings"] for file, r in results.items()},  # seconds per stage, shards built now
    }


def run_preprocess(
    cfg: Config,
    src: str | Path | None,
    out: str | Path,
    splits: tuple[str, ...] = ("train", "valid"),
    frames_from: str = "jpeg",
    shard_mb: float = 256.0,
    skip_bad: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    compression: str = "zstd",
) -> dict[str, Any]:
    """Build (or complete, or confirm) the shard directory ``out``; returns its manifest."""
    from pipelines.shards import MANIFEST, PLAN_FILE, prepare_out_dir, write_json_atomic

    out = Path(out)
    plan, tasks = plan_build(cfg, src, splits, frames_from, shard_mb)
    done = prepare_out_dir(out, plan, overwrite)
    if done is not None:
        print(f"{out}: up to date ({len(done['shards'])} shards, plan {plan['plan_hash']}); nothing to do")
        return done
    todo = [t for t in tasks if not (out / t["file"]).is_file()]
    print(f"{out}: {len(tasks) - len(todo)} of {len(tasks)} shards already complete; building {len(todo)}")
    results = {}
    if todo:
        fail_after = os.environ.get(FAIL_ENV)
        opts = {
            "out_dir": str(out.resolve()),
            "settings": plan["settings"],
            "frames_from": frames_from,
            "skip_bad": skip_bad,
            "compression": compression,
            "fail_after": int(fail_after) if fail_after else None,
        }
        started = connect(address, num_cpus)
        try:
            results = {r["file"]: r for r in _run_tasks(todo, opts)}
        finally:
            if started:
                import ray

                ray.shutdown()
    errors = [e for r in results.values() for e in r["errors"]]
    if errors:
        lines = "\n".join(
            f"  {e['split']} video {e['video_id']} ({e['video']}): {e['reason']}" for e in errors
        )
        raise PreprocessError(
            f"{len(errors)} video(s) could not be read:\n{lines}\nFix or remove them, or re-run with "
            "--skip-bad to skip them (they are then listed in manifest.json); completed shards are kept"
        )
    manifest = _manifest(out, plan, tasks, results)
    write_json_atomic(out / MANIFEST, manifest)
    (out / PLAN_FILE).unlink(missing_ok=True)
    for s in manifest["skipped"]:
        print(f"skipped {s['split']} video {s['video_id']} ({s['video']}): {s['reason']}", file=sys.stderr)
    print(
        f"{out}: {sum(c['clips'] for c in manifest['counts'].values())} clips in {len(tasks)} shards "
        f"({len(results)} built now, {len(manifest['skipped'])} video(s) skipped); manifest {out / MANIFEST}"
    )
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config YAML or preset name (T, resolution, stride)")
    parser.add_argument(
        "--src", help="dataset directory, or one split's annotation JSON (default: data.root)"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="shard directory (created; the driver and all workers must see it: shared storage on a multi-node cluster)",
    )
    parser.add_argument(
        "--address", help="Ray cluster: 'auto', host:port or ray://host:port (default: local)"
    )
    parser.add_argument("--splits", default="train,valid", help="comma-separated: train,valid (default both)")
    parser.add_argument(
        "--frames-from",
        choices=FRAME_SOURCES,
        default="jpeg",
        help="decode <split>/JPEGImages/<video>/ (jpeg) or <split>/videos/<video>.mp4 (videos)",
    )
    parser.add_argument(
        "--shard-mb", type=float, default=256.0, help="target shard size in MiB (default 256)"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable videos (listed in manifest.json)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards built from other inputs in --out"
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local cluster started without --address")
    parser.add_argument("--compression", default="zstd", help="Parquet compression (zstd, snappy, none)")


def run(args: argparse.Namespace) -> int:
    from pipelines.shards import ShardError

    try:
        run_preprocess(
            load_config(args.config),
            args.src,
            args.out,
            tuple(s for s in args.splits.split(",") if s),
            frames_from=args.frames_from,
            shard_mb=args.shard_mb,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            address=args.address,
            num_cpus=args.num_cpus,
            compression=args.compression,
        )
    except (PreprocessError, AnnotationError, ShardError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
