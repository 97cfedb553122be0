"""Video IO against files written and decoded by the ffmpeg CLI itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vistr.data.video_io import (
    VideoDecodeError,
    iter_frames,
    list_frame_files,
    probe,
    read_frames,
    read_image,
    write_video,
)

H, W, N, FPS = 64, 96, 20, 10


def _ffmpeg(ffmpeg: str, *args: str) -> None:
    subprocess.run([ffmpeg, "-loglevel", "error", "-y", *args], check=True)


def _ffmpeg_decode(ffmpeg: str, path: Path, height: int, width: int) -> np.ndarray:
    """Reference decode by the ffmpeg CLI: raw rgb24 frames."""
    raw = subprocess.run(
        [ffmpeg, "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


@pytest.fixture(scope="module")
def testsrc(ffmpeg: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("testsrc")
    src = ["-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate={FPS}", "-frames:v", str(N)]
    _ffmpeg(ffmpeg, *src, "-pix_fmt", "yuv420p", str(out / "x.mp4"))
    _ffmpeg(ffmpeg, *src, "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(out / "fast.mp4"))
    _ffmpeg(ffmpeg, *src, str(out / "x.webm"))
    return {p.name: p for p in out.iterdir()}


def test_reads_ffmpeg_mp4_like_ffmpeg(testsrc: dict[str, Path], ffmpeg: str) -> None:
    info = probe(testsrc["x.mp4"])
    assert (info.num_frames, info.height, info.width, info.fps) == (N, H, W, FPS)
    frames = read_frames(testsrc["x.mp4"])
    assert frames.shape == (N, H, W, 3) and frames.dtype == np.uint8
    reference = _ffmpeg_decode(ffmpeg, testsrc["x.mp4"], H, W)
    # Same decoder; only the YUV->RGB conversion path may differ slightly.
    assert np.abs(frames.astype(int) - reference).mean() < 2.0
    # Frames really differ over time (testsrc has a moving pattern and a counter).
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 5


def test_webm_count_without_header_and_stride(testsrc: dict[str, Path]) -> None:
    assert probe(testsrc["x.webm"]).num_frames == N
    all_frames = read_frames(testsrc["x.webm"])
    strided = read_frames(testsrc["x.webm"], stride=3)
    assert strided.shape[0] == len(range(0, N, 3))
    np.testing.assert_array_equal(strided, all_frames[::3])
    first = list(iter_frames(testsrc["x.webm"], stride=2, max_frames=4))
    assert len(first) == 4
    np.testing.assert_array_equal(np.stack(first), all_frames[0:8:2])


@pytest.mark.parametrize("name", ["x.mp4", "fast.mp4"])
def test_truncated_file_names_file(testsrc: dict[str, Path], tmp_path: Path, name: str) -> None:
    data = testsrc[name].read_bytes()
    broken = tmp_path / f"truncated_{name}"
    broken.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(VideoDecodeError, match=str(broken)) as info:
        read_frames(broken)
    if name == "fast.mp4":  # the header survives, so decoding starts and must say where it stopped
        assert "decoding stopped at frame" in str(info.value)


def test_missing_and_non_video_files(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match="does not exist"):
        probe(tmp_path / "nope.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoDecodeError, match="junk.mp4"):
        probe(junk)


def test_write_read_roundtrip_odd_size(tmp_path: Path, ffmpeg: str) -> None:
    height, width, count, fps = 63, 95, 15, 12
    yy, xx = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([(xx * 2 + 8 * t) % 256, (yy * 3) % 256, np.full_like(xx, 40 + 10 * t)], -1).astype(np.uint8)
        for t in range(count)
    ]
    path = write_video(tmp_path / "out.mp4", iter(frames), fps=fps)
    info = probe(path)
    # yuv420p needs even sizes: padded by one row and column.
    assert (info.num_frames, info.fps, info.height, info.width) == (count, fps, height + 1, width + 1)
    back = read_frames(path)[:, :height, :width]
    err = np.abs(back.astype(int) - np.stack(frames))
    assert err.mean() < 3.0, err.mean()
    stream = subprocess.run(
        [
            str(Path(ffmpeg).with_name("ffprobe")),
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,pix_fmt",
            "-of",
            "csv=p=0",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert stream == "h264,yuv420p"


def test_frame_folder_and_corrupt_jpeg(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(20, 30, 3), dtype=np.uint8) for _ in range(5)]
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    (folder / "notes.txt").write_text("ignored")
    assert [p.name for p in list_frame_files(folder)] == [f"{i:05d}.png" for i in range(5)]
    info = probe(folder)
    assert (info.num_frames, info.height, info.width, info.is_folder) == (5, 20, 30, True)
    np.testing.assert_array_equal(read_frames(folder, stride=2), np.stack(images[::2]))

    jpeg = tmp_path / "good.jpg"
    Image.fromarray(images[0]).save(jpeg, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[:200])
    with pytest.raises(VideoDecodeError, match="truncated.jpg.*corrupt or truncated"):
        read_image(truncated)
    garbage = folder / "00005.jpg"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(VideoDecodeError, match="00005.jpg"):
        read_frames(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoDecodeError, match="empty: no frame images"):
        probe(tmp_path / "empty")
