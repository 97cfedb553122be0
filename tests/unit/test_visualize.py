"""Overlays and contact sheets."""

import numpy as np
import pytest

from vistr.visualize import contact_sheet, draw_overlay, sample_indices, track_colour


def test_track_colours_are_stable_and_distinct():
    assert track_colour(3) == track_colour(3)
    colours = [track_colour(i) for i in range(10)]
    assert len(set(colours)) == 10
    # neighbouring ids differ clearly (max channel difference), so a switch is visible
    assert min(max(abs(a - b) for a, b in zip(colours[i], colours[i + 1], strict=True)) for i in range(9)) > 40


def test_overlay_blends_mask_pixels_only():
    frame = np.full((60, 80, 3), 100, np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[20:50, 10:70] = True
    out = draw_overlay(frame, {2: mask}, labels={2: "cat 0.90"}, alpha=0.5)
    expected = (100 * 128 + np.array(track_colour(2)) * 128 + 128) // 256  # alpha 0.5 = 128/256, rounded
    assert (out[45, 40] == expected).all()  # inside the mask, away from the label at its top-left corner
    assert (out[5, 5] == 100).all() and (out[55, 75] == 100).all()  # outside: untouched
    assert (out[20:30, 10:30] != out[45, 40]).any()  # the label was drawn at the mask's corner
    assert (frame == 100).all()  # input not modified


def _label_width(width: int, label: str) -> int:
    """Columns the label covers on a ``width``-wide frame whose mask fills it all."""
    frame = np.full((64, width, 3), 100, np.uint8)
    out = draw_overlay(frame, {3: np.ones((64, width), bool)}, labels={3: label})
    blended = draw_overlay(frame, {3: np.ones((64, width), bool)})
    return int((out != blended).any(axis=(0, 2)).nonzero()[0].max()) + 1


def test_labels_drop_trailing_words_to_stay_within_half_the_frame():
    full, short = _label_width(400, "#3 c2 0.87"), _label_width(400, "#3")
    assert short < full <= 200  # a wide frame shows the whole label
    assert _label_width(64, "#3 c2 0.87") <= 32  # a 64-px frame: only the words that fit
    assert _label_width(64, "#3 c2 0.87") >= short  # ...but never less than the first word
    assert _label_width(8, "#3 c2") == min(8, short)  # one word is kept even when it cannot fit


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.7, 1.0])
def test_overlay_blend_is_the_weighted_mean_to_within_rounding(alpha):
    frame = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    mask = np.zeros((6, 7), bool)
    mask[2:, 3:] = True
    out = draw_overlay(frame, {5: mask}, alpha=alpha).astype(float)
    exact = (1 - alpha) * frame + alpha * np.array(track_colour(5))
    assert np.abs(out[mask] - exact[mask]).max() <= 0.5 + 255 / 512  # rounding + alpha in 1/256ths
    assert (out[~mask] == frame[~mask]).all()
    if alpha in (0.0, 1.0):  # the ends are exact: the frame, or the colour
        assert (out[mask] == exact[mask]).all()


def test_overlay_without_masks_is_the_frame():
    frame = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    assert (draw_overlay(frame, {}) == frame).all()
    assert (draw_overlay(frame, {0: np.zeros((8, 8), bool)}, {0: "x"}) == frame).all()


@pytest.mark.parametrize("length,count,expected", [(5, 8, [0, 1, 2, 3, 4]), (10, 4, [0, 3, 6, 9]), (7, 1, [0])])
def test_sample_indices(length, count, expected):
    assert sample_indices(length, count) == expected


def test_contact_sheet_layout():
    frames = [np.full((30, 40, 3), 10 * i, np.uint8) for i in range(6)]
    sheet = contact_sheet(frames, captions=[str(i) for i in range(6)], columns=4, width=80)
    assert sheet.size == (4 * 80, 2 * (60 + 14))
    pixels = np.asarray(sheet)
    assert (pixels[14 + 30, 80 + 40] == 10).all()  # second thumbnail, below its caption strip
    assert (pixels[74 + 14 + 30, 80 + 40] == 50).all()  # sixth thumbnail: row 2, column 2
