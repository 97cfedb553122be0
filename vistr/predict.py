"""Prediction on one video: a video file or frame folder in; results JSON, overlay video and contact sheet out.

The video streams through four stages: decoding and resizing frames, the model (one window at
a time, in the calling thread), stitching (masks to the frame size, link windows, RLE-encode),
and drawing and encoding the overlay of the frames each window finalises. Where the model
leaves CPU to spare (a GPU, or more cores than torch's threads) the other three run in threads
joined by bounded queues, so the model never waits; where the model's threads already fill
every core they run inline, which measured faster than threads fighting OpenMP workers
(:func:`stages_overlap`). Only a few windows of frames are ever held, whatever the video's length.

Models come from a local checkpoint (ours or an official VisTR file, told apart by its keys);
the ``vistr predict`` command (``pipelines.predict``) also takes MLflow URIs.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistr.checkpoint import FORMAT, CheckpointError, load_official_vistr, model_from_checkpoint
from vistr.config import Config
from vistr.data.video_io import VideoDecodeError, VideoWriter, iter_frames, probe
from vistr.inference import ClipPredictor, OwnedFrames, Stitcher, plan_windows
from vistr.models.inference_opt import optimize_for_inference
from vistr.visualize import contact_sheet, draw_overlay, sample_indices

OFFICIAL_NUM_FRAMES = 36  # T of the released checkpoints (FACTS.md §a)
# sink(owned frames, their decoded RGB frames, {track id: (category id, score) so far}): a snapshot
# rather than the live stitcher, so the sink can run in its own thread, behind the stitcher.
Sink = Callable[[OwnedFrames, list[np.ndarray], dict[int, tuple[int, float]]], None]


# ---------------------------------------------------------------- models


def _official_config(state: dict[str, torch.Tensor], num_frames: int | None, source: str) -> dict[str, Any]:
    """ModelConfig fields of an official-layout state dict, read from its tensor shapes."""
    def layers(kind: str) -> int:
        prefix = f"vistr.transformer.{kind}.layers."
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    try:
        queries, hidden = state["vistr.query_embed.weight"].shape
        fields = {
            "hidden_dim": int(hidden),
            "enc_layers": layers("encoder"),
            "dec_layers": layers("decoder"),
            "dim_feedforward": int(state["vistr.transformer.decoder.layers.0.linear1.weight"].shape[0]),
            "num_classes": int(state["vistr.class_embed.weight"].shape[0]) - 1,
            "mask_dims": [int(state[f"mask_head.{k}.weight"].shape[0]) for k in ("lay2", "lay3", "lay4", "dcn")],
            "seq_head_dim": int(state["insmask_head.0.weight"].shape[0]),
        }
    except KeyError as exc:
        raise CheckpointError(f"{source}: official VisTR checkpoint lacks {exc.args[0]!r}") from exc
    num_frames = num_frames or OFFICIAL_NUM_FRAMES
    if queries % num_frames:
        raise CheckpointError(
            f"{source}: {queries} queries are not a multiple of T={num_frames}; pass --window T (the T it was trained with)"
        )
    return {**fields, "num_frames": num_frames, "num_slots": queries // num_frames}


def load_model_file(path: str | Path, num_frames: int | None = None) -> tuple[torch.nn.Module, Config]:
    """Our checkpoint (config inside) or an official VisTR file (config read from its shapes).

    ``num_frames`` is T for an official file (its queries are n·T; default 36); for ours it
    must match the stored config if given.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises pickle/zip/runtime errors for bad files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        model, cfg = model_from_checkpoint(path)
        if num_frames is not None and num_frames != cfg.model.num_frames:
            raise CheckpointError(
                f"{path}: the model was built for windows of T={cfg.model.num_frames} frames; "
                f"--window {num_frames} cannot change that (its queries are n·T)"
            )
        return model, cfg
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or "vistr.query_embed.weight" not in state:
        raise CheckpointError(
            f"{path}: neither a vistr checkpoint nor an official VisTR checkpoint (no 'vistr.query_embed.weight')"
        )
    fields = _official_config(state, num_frames, str(path))
    model = load_official_vistr(state, backbone=None, **fields)
    return model, Config(model=model.config)


def load_inference_model(path: str | Path, num_frames: int | None = None) -> tuple[torch.nn.Module, Config]:
    """(model in eval mode, frozen for inference, config) of a local checkpoint file; MLflow URIs
    are resolved by ``pipelines.model_source.load_model``."""
    model, cfg = load_model_file(path, num_frames)
    return optimize_for_inference(model), cfg


# ---------------------------------------------------------------- streaming


class _Stop(Exception):
    """Raised inside a stage thread when the pipeline is being torn down."""


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
    raise _Stop


def _offer(q: queue.Queue, item: Any, failure: list[BaseException]) -> bool:
    """Put ``item`` as soon as there is room (a blocking put wakes at once), unless a stage
    has failed meanwhile; returns whether it was put."""
    while not failure:
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class _StageThread:
    """A consumer thread running ``work(item)`` for each offered item, in order, one item queued.

    The first exception of any stage goes to the shared ``failure`` list (re-raised by the caller)
    and stops every stage from taking more work; items still queued are drained, not processed.
    """

    def __init__(self, work: Callable[[Any], None], name: str, failure: list[BaseException]) -> None:
        self.work, self.failure = work, failure
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, daemon=True, name=name)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.failure:
                continue
            try:
                self.work(item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                self.failure.append(exc)

    def offer(self, item: Any) -> bool:
        return _offer(self.queue, item, self.failure)

    def close(self) -> None:
        """Finish the queued work and end the thread (the consumer drains, so this put returns)."""
        self.queue.put(None)
        self.thread.join()


def _ahead(items: Iterable[Any], size: int, stop: threading.Event) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, at most ``size`` items ahead; errors re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                _put(q, item, stop)
            _put(q, done, stop)
        except _Stop:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            try:
                _put(q, exc, stop)
            except _Stop:
                return

    threading.Thread(target=produce, daemon=True, name="vistr-decode").start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def stages_overlap(device: str | torch.device) -> bool:
    """Whether decoding and postprocessing should run in threads beside the model.

    They pay off when the model leaves CPU to spare: on a GPU, or when torch's intra-op threads
    do not occupy every core. When they do (2-core CPU, model on both cores), the extra threads
    preempt OpenMP workers mid-region and the whole pipeline ran slower than doing the same work
    in turn (tiny_cpu, 120 frames, alternating runs: 1.33-1.61 s threaded vs 1.07-1.16 s inline).
    """
    if torch.device(device).type != "cpu":
        return True
    return (os.cpu_count() or 1) > torch.get_num_threads()


def predict_stream(
    predictor: ClipPredictor,
    frames: Iterable[np.ndarray],
    length: int,
    overlap: int,
    min_iou: float = 0.5,
    sink: Sink | None = None,
    progress: Callable[[int], Any] | None = None,
    concurrent: bool | None = None,
) -> Stitcher:
    """Run a ``length``-frame video through windows of the model's T frames overlapping by
    ``overlap``; returns the finished :class:`Stitcher` (``.results(video_id)`` gives the JSON).

    ``sink(owned, raw_frames, tracks)`` receives each window's finalised frames and their tracks'
    (category, score) so far (for overlays), ``progress(n)`` the number of frames finalised.
    ``concurrent`` runs decoding, stitching and the sink in threads beside the model (default:
    :func:`stages_overlap`); results, overlays included, are identical either way.
    """
    if concurrent is None:
        concurrent = stages_overlap(predictor.device)
    windows = plan_windows(length, predictor.num_frames, overlap)
    stitcher = Stitcher(windows, min_iou=min_iou)
    stop = threading.Event()
    failure: list[BaseException] = []

    def draw(job: tuple) -> None:
        sink(*job)
        if progress is not None:
            progress(job[0].count)

    def postprocess(job: tuple) -> None:
        (start, end), outputs, size, raws = job
        owned = stitcher.add(predictor.postprocess(outputs, end - start, size))
        if sink is None:
            if progress is not None:
                progress(owned.count)
            return
        summary = {tid: (stitcher.tracks[tid].category_id, stitcher.tracks[tid].score) for tid in owned.masks}
        drawing = (owned, raws[owned.first - start: owned.first - start + owned.count], summary)
        if drawer is None:
            draw(drawing)
        else:
            drawer.offer(drawing)  # refused only after a failure, which the caller re-raises

    decoded: Iterator = ((f, predictor.prepare(f)) for f in frames)
    # Concurrent: decode | model (this thread) | stitch | draw + encode (the sink), one thread each,
    # each a window ahead of the next; the sink is the slowest stage on a GPU (overlay + x264).
    drawer = _StageThread(draw, "vistr-sink", failure) if concurrent and sink is not None else None
    post = _StageThread(postprocess, "vistr-post", failure) if concurrent else None
    if concurrent:
        decoded = _ahead(decoded, predictor.num_frames + 2, stop)
    buffer: dict[int, tuple[np.ndarray | None, torch.Tensor]] = {}
    size: tuple[int, int] = (0, 0)
    try:
        for w, (start, end) in enumerate(windows):
            while len(buffer) + start < end:  # buffer holds frames start.. (earlier ones dropped)
                item = next(decoded, None)
                if item is None:
                    raise VideoDecodeError(f"the video ended after {start + len(buffer)} frames, {length} were expected")
                size = item[0].shape[:2]
                buffer[start + len(buffer)] = (item[0] if sink is not None else None, item[1])
            outputs = predictor.forward([buffer[i][1] for i in range(start, end)])
            job = ((start, end), outputs, size, [buffer[i][0] for i in range(start, end)])
            if post is None:
                postprocess(job)
            elif not post.offer(job):
                break
            keep_from = windows[w + 1][0] if w + 1 < len(windows) else end
            for i in range(start, keep_from):
                buffer.pop(i)
    finally:
        stop.set()
        for stage in (post, drawer):  # in pipeline order: the stitcher's last windows reach the sink
            if stage is not None:
                stage.close()
    if failure:
        raise failure[0]
    return stitcher


# ---------------------------------------------------------------- outputs


class OverlayWriter:
    """A sink that draws each finalised frame's masks (colour per track, running label and score)
    into an mp4 at the input's fps, and keeps a few sampled frames for the contact sheet.

    ``draw_threads`` > 1 draws a window's frames in parallel (numpy releases the GIL: 2 threads
    drew 36 frames of 540x300 in half the time); frames are still written in order."""

    def __init__(self, path: Path, fps: float, length: int, sheet_frames: int = 8, encoder_threads: int = 1,
                 draw_threads: int = 1) -> None:  # fmt: skip
        self.writer = VideoWriter(path, fps, threads=encoder_threads)
        self.samples = set(sample_indices(length, sheet_frames))
        self.sheet: list[tuple[int, np.ndarray]] = []
        self.pool = ThreadPoolExecutor(draw_threads, thread_name_prefix="vistr-draw") if draw_threads > 1 else None

    def __call__(self, owned: OwnedFrames, raws: list[np.ndarray], tracks: dict[int, tuple[int, float]]) -> None:
        labels = {tid: f"#{tid} c{category} {score:.2f}" for tid, (category, score) in tracks.items()}

        def draw(i: int) -> np.ndarray:
            return draw_overlay(raws[i], {tid: m[i].numpy() for tid, m in owned.masks.items()}, labels)

        drawn = self.pool.map(draw, range(len(raws))) if self.pool is not None else map(draw, range(len(raws)))
        for i, frame in enumerate(drawn):
            self.writer.write(frame)
            if owned.first + i in self.samples:
                self.sheet.append((owned.first + i, frame))

    def close(self, sheet_path: Path) -> None:
        self._stop_pool()
        self.writer.close()
        if self.sheet:
            sheet = contact_sheet([f for _, f in self.sheet], [f"frame {i}" for i, _ in self.sheet])
            sheet.save(sheet_path, compress_level=1)  # level 6 took 70 ms, more than drawing 120 overlays

    def abort(self) -> None:
        """After a failure: a half-written video would look like a result, so it is removed."""
        self._stop_pool()
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        self.writer.path.unlink(missing_ok=True)

    def _stop_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def predict_video(
    input_path: str | Path,
    model: torch.nn.Module,
    cfg: Config,
    out_dir: str | Path,
    overlap: int | None = None,
    min_iou: float = 0.5,
    score_threshold: float | None = None,
    top_k: int | None = None,
    video_id: int = 1,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Path]:
    """Write ``results.json``, ``overlay.mp4`` and ``contact_sheet.png`` for one video into ``out_dir``."""
    from tqdm import tqdm

    info = probe(input_path)
    if info.num_frames < 1:
        raise VideoDecodeError(f"{input_path}: the video has no frames")
    predictor = ClipPredictor(model, cfg, device)
    overlap = default_overlap(predictor.num_frames) if overlap is None else overlap
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "overlay": out / "overlay.mp4", "sheet": out / "contact_sheet.png"}
    # x264's threads and parallel drawing only where cores are spare (a GPU model: the overlay is
    # then the slowest stage); beside a CPU model that fills the cores they slow it down.
    spare = stages_overlap(predictor.device)
    overlay = OverlayWriter(paths["overlay"], info.fps, info.num_frames, encoder_threads=0 if spare else 1,
                            draw_threads=max(1, min(4, (os.cpu_count() or 1) // 4)) if spare else 1)
    with tqdm(total=info.num_frames, unit="frame", desc=info.path.name, disable=not progress) as bar:
        try:
            stitcher = predict_stream(predictor, iter_frames(input_path), info.num_frames, overlap, min_iou,
                                      sink=overlay, progress=bar.update)
        except BaseException:
            overlay.abort()
            raise
    overlay.close(paths["sheet"])
    results = stitcher.results(video_id, score_threshold, top_k)
    paths["results"].write_text(json.dumps(results))
    return paths


def default_overlap(num_frames: int) -> int:
    """A sixth of the window (6 of 36 frames): enough shared frames to link instances reliably
    at 1.2x the compute of non-overlapping windows."""
    return max(1, num_frames // 6) if num_frames > 1 else 0
