"""The breast mask on synthetic images that real films and detectors resemble (issue 26).

These fail with the previous method (MASK_VERSION 3) and pass now: film padded to a square
in both laterality orientations (the whole film became "breast"), a bright label on the skin
line, a collimated digital view whose bright bands the breast runs into, and an image with no
plausible breast, which must be flagged and fall back with a warning, never silently the whole
frame. Guards that passed before too: a bright film-edge strip, a blank image, a pectoral
triangle that must stay breast.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from dicom_ai.imaging.mask import MASK_VERSION, _to_grid, breast_mask, breast_mask_report
from dicom_ai.imaging.resample import resize

ROWS, COLS = 400, 400


def _breast(rows: int = ROWS, cols: int = COLS, chest: str = "left", seed: int = 0,
            film: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """A film-like view: a half-ellipse breast on the chest-wall side over a noisy film base
    of level ``film``, a fatty periphery fading to the skin; (pixels, true breast)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols].astype(np.float32)
    d = ((yy - rows / 2) / (0.42 * rows)) ** 2 + (xx / (0.55 * cols)) ** 2
    truth = d <= 1.0
    tissue = 0.25 + 0.45 * np.clip(1.0 - d, 0, 1) ** 0.5
    pixels = np.where(truth, tissue, film) + rng.normal(0, 0.01, (rows, cols))
    pixels = np.clip(pixels, 0, 1).astype(np.float32)
    if chest == "right":
        pixels, truth = pixels[:, ::-1].copy(), truth[:, ::-1].copy()
    return pixels, truth


def _padded(pixels: np.ndarray, truth: np.ndarray, size: int = 560) -> tuple[np.ndarray, np.ndarray]:
    """Film placed in a square of zeros at its chest-wall side, as mini-MIAS pads its scans."""
    out = np.zeros((size, size), np.float32)
    tr = np.zeros((size, size), bool)
    r0 = (size - pixels.shape[0]) // 2
    out[r0:r0 + pixels.shape[0], :pixels.shape[1]] = pixels
    tr[r0:r0 + pixels.shape[0], :pixels.shape[1]] = truth
    return out, tr


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_mask_version_bumped():
    # caches of model outputs restricted by the mask are keyed by it
    assert MASK_VERSION >= 4


@pytest.mark.parametrize("chest", ["left", "right"])
def test_padded_film_is_not_the_whole_film(chest):
    pixels, truth = _breast(chest=chest)
    pixels, truth = _padded(pixels, truth)
    if chest == "right":
        pixels, truth = pixels[:, ::-1].copy(), truth[:, ::-1].copy()
    report = breast_mask_report(pixels)
    assert report.ok, report.problems
    film = pixels > 0
    # the previous method took the film base for breast: the mask was ~the whole film
    assert report.mask[film].mean() < 0.8
    assert _dice(report.mask, truth) > 0.95


def test_label_on_the_skin_line_is_excluded():
    pixels, truth = _breast()
    # a bright film label ("ML") touching the skin line, with dark letters in it
    r, c = 60, 150
    pixels[r:r + 40, c:c + 60] = 1.0
    pixels[r + 10:r + 30, c + 10:c + 20] = 0.2
    pixels[r + 10:r + 30, c + 35:c + 45] = 0.2
    assert truth[r + 39, c].any() or truth[r:r + 40, c - 5:c].any()  # it touches the breast
    mask = breast_mask(pixels)
    label = np.zeros_like(truth)
    label[r:r + 40, c:c + 60] = True
    assert mask[label & ~truth].mean() < 0.05
    assert _dice(mask, truth & ~label) > 0.93
    # the breast away from the label (and inside the 1 % frame, always background) is all in
    cols = np.arange(COLS)[None, :]
    assert mask[truth & (cols >= 5) & (cols < 100)].mean() > 0.98


def test_bright_film_edge_strip_is_not_the_breast():
    pixels, truth = _breast(chest="right")
    pixels[:, 6:20] = 0.97  # saturated film edge on the nipple side, full height
    mask = breast_mask(pixels)
    assert not mask[:, 6:20].any()
    assert _dice(mask, truth) > 0.95


def test_collimated_digital_image():
    """Digital view with air at exactly 0, bright unexposed collimator bands at top and
    bottom that the breast runs into (an MLO runs off the top and bottom of the detector),
    and a small text label in the far corner."""
    rows, cols = ROWS, COLS
    yy, xx = np.mgrid[:rows, :cols].astype(np.float32)
    d = ((yy - rows / 2) / (0.52 * rows)) ** 2 + (xx / (0.55 * cols)) ** 2
    truth = d <= 1.0
    rng = np.random.default_rng(1)
    pixels = np.where(truth, 0.25 + 0.45 * np.clip(1.0 - d, 0, 1) ** 0.5 + rng.normal(0, 0.01, d.shape), 0.0)
    pixels = np.clip(pixels, 0, 1).astype(np.float32)
    pixels[:10, :] = 0.95
    pixels[-10:, :] = 0.95
    pixels[330:345, 330:380] = 1.0  # "L MLO" label block in the far corner
    truth[:10], truth[-10:] = False, False
    report = breast_mask_report(pixels)
    assert report.ok, report.problems
    assert not report.mask[:10].any() and not report.mask[-10:].any()
    assert not report.mask[330:345, 330:380].any()
    assert _dice(report.mask, truth) > 0.95


def test_whole_frame_bright_is_flagged_and_not_silent(caplog):
    """An image with no background at all (e.g. a blank exposure or wrong windowing): no
    plausible breast, so the node logs a warning and falls back to the film less its
    frame; never silently the whole frame."""
    rng = np.random.default_rng(3)
    pixels = np.clip(0.6 + rng.normal(0, 0.02, (300, 240)), 0, 1).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="dicom_ai.imaging.mask"):
        report = breast_mask_report(pixels)
    assert not report.ok and report.problems
    assert report.method in ("fallback-v3", "fallback-field")
    assert any("breast mask implausible" in r.getMessage() for r in caplog.records)
    # the frame itself is never in
    assert not report.mask[:2].any() and not report.mask[:, -2:].any()


def test_blank_image_gives_an_empty_mask():
    assert not breast_mask(np.zeros((64, 48), np.float32)).any()


def test_pectoral_muscle_stays_in_the_breast():
    """An MLO-like view: a bright pectoral triangle at the top chest-wall corner, touching
    the top of the film; it is breast (the pectoral mask removes it separately)."""
    pixels, truth = _breast()
    yy, xx = np.mgrid[:ROWS, :COLS]
    pect = (xx < 120 - 0.6 * yy) & truth
    pixels[pect] = 0.9
    mask = breast_mask(pixels)
    assert mask[pect & (xx >= 5) & (yy >= 5)].mean() > 0.98  # the 1 % frame is always background


@pytest.mark.parametrize("shape,to", [((3328, 2560), (416, 320)), ((333, 257), (41, 33)), ((41, 33), (333, 257)),
                                      ((512, 400), (3328, 2560)), ((100, 100), (100, 37)), ((7, 5), (13, 3))])
def test_nearest_grid_by_repeats_equals_the_float_resize(shape, to):
    """mask._to_grid (rows and columns repeated or skipped) gives the pixels of the float
    round trip through resize(..., mode="nearest") it replaces, growing and shrinking."""
    mask = np.random.default_rng(sum(shape) + sum(to)).random(shape) > 0.6
    np.testing.assert_array_equal(_to_grid(mask, to), resize(mask.astype(np.float32), to, mode="nearest") > 0.5)


def test_chest_wall_side_reads_each_rows_first_and_last_mask_column():
    """chest_wall_side's per-row outermost columns (argmax) are those of a row-by-row search."""
    from dicom_ai.imaging.mask import chest_wall_side

    rng = np.random.default_rng(5)
    for _ in range(20):
        rows, cols = rng.integers(20, 120, 2)
        mask = np.zeros((rows, cols), dtype=bool)
        for r in range(rows):
            if rng.random() < 0.9:
                a, b = sorted(rng.integers(0, cols, 2))
                mask[r, a:b + 1] = True
        rr = np.nonzero(mask.any(axis=1))[0]
        if rr.size < 10:
            continue
        rr = rr[int(0.1 * rr.size): int(0.9 * rr.size)]
        first = np.array([np.nonzero(mask[r])[0][0] for r in rr], dtype=float)
        last = np.array([np.nonzero(mask[r])[0][-1] for r in rr], dtype=float)
        spread_l = float(np.subtract(*np.percentile(first, [75, 25]))) + 1.0
        spread_r = float(np.subtract(*np.percentile(last, [75, 25]))) + 1.0
        confidence = float(1.0 - min(spread_l, spread_r) / max(spread_l, spread_r))
        side, got = chest_wall_side(mask)
        assert got == confidence
        if confidence >= 0.3:
            assert side == ("left" if spread_l < spread_r else "right")


def test_a_mammograms_masks_share_one_working_copy_and_equal_the_functions():
    """Mammogram makes the masks' shrunk copy once for both masks: the same masks as
    breast_mask and pectoral_mask make on their own."""
    from dicom_ai.data.phantom import generate_study
    from dicom_ai.imaging import read_mammogram
    from dicom_ai.imaging.mask import pectoral_mask

    study = generate_study(3, shape=(832, 640), normal=False)
    found = 0
    for image in study.images:
        m = read_mammogram(image.dataset)
        alone = breast_mask(m.pixels)
        np.testing.assert_array_equal(m.breast_mask, alone)
        if "MLO" in m.view:
            expected = pectoral_mask(m.pixels, alone, m.faces_left)
            np.testing.assert_array_equal(m.pectoral_mask, expected)
            found += int(expected.any())
    assert found  # a pectoral muscle was found on an MLO view
