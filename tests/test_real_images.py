"""What real images carry and phantoms do not (issue 14), on small synthetic fixtures only.

Burned-in labels, film borders and skin markers are never marked; the pectoral muscle of an
MLO view is found; the header's nipple direction is cross-checked against the pixels;
operating points come from the manifest by name; overlapping marks of several models are
one finding in the SR while the SEG keeps each model's segment; the SR stays dciodvfy-clean.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pydicom
import pytest

from dicom_ai.core.errors import BundleError
from dicom_ai.core.findings import ModelIdentity, ModelOutput, ProbabilityMap
from dicom_ai.imaging.mammogram import mammogram_from_array, orient, read_mammogram
from dicom_ai.imaging.mask import breast_mask, chest_wall_side, pectoral_mask
from dicom_ai.networks import Pipeline
from dicom_ai.networks.pipeline import allowed_region, restrict_to_breast
from dicom_ai.results.regions import Spacing, find_regions

from _results_sources import make_mg

ROWS, COLS = 256, 192


def _with_label_and_border(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with a bright film border (2 px), a burned-in label in the background and a
    round skin marker just outside the skin line, as digitised films and FFDM exports have."""
    pixels = ds.pixel_array.astype(np.uint16).copy()
    pixels[:2, :], pixels[-2:, :], pixels[:, :2], pixels[:, -2:] = 4000, 4000, 4000, 4000
    pixels[20:44, 140:176] = 4095  # label "L CC", far from the breast
    yy, xx = np.mgrid[:ROWS, :COLS]
    pixels[(yy - 128) ** 2 + (xx - 157) ** 2 <= 16] = 4095  # skin marker just past the skin line
    ds.PixelData = pixels.tobytes()
    return ds


class _EverywhereModel:
    """Marks the label, the border, the marker, the background and the breast alike."""

    identity = ModelIdentity("everywhere", "1")

    def predict(self, mammogram):
        prob = np.zeros(mammogram.shape, dtype=np.float32)
        prob[:4, :] = 0.9  # film border
        prob[18:46, 138:178] = 0.9  # the label
        prob[120:137, 150:166] = 0.9  # the skin marker
        prob[200:230, 170:190] = 0.9  # background
        prob[100:120, 30:50] = 0.9  # inside the breast
        return ModelOutput([ProbabilityMap("malignant_lesion", prob, 0.5, self.identity)])


def test_no_mark_outside_the_breast_with_label_and_film_border():
    ds = _with_label_and_border(make_mg("L", "CC", (ROWS, COLS)))
    m = read_mammogram(ds)
    mask = m.breast_mask
    assert not mask[20:44, 140:176].any() and not mask[:2].any() and not mask[:, -2:].any()
    assert mask[100:120, 30:50].all()
    (findings,) = Pipeline([_EverywhereModel()]).run([ds])
    (pm,) = findings.maps
    regions = find_regions(pm.probability, pm.threshold, Spacing(0.1, 0.1, "detector"))
    assert len(regions.regions) == 1  # only the mark in the breast
    for region in regions.regions:
        c, r = region.centre
        assert mask[int(r), int(c)]
    assert not (pm.probability[~allowed_region(m)] > 0).any()


def test_a_region_whose_centroid_is_outside_is_dropped():
    """A U-shaped mark around a notch of the breast (a skin fold): every pixel inside, its
    centroid in the notch, so it is no mark."""
    pixels = np.full((ROWS, COLS), 0.6, np.float32)
    m = mammogram_from_array(pixels, "L", "CC", (0.1, 0.1))
    mask = np.ones((ROWS, COLS), bool)
    mask[100:160, 60:120] = False  # the notch
    m._breast_mask = mask
    prob = np.zeros((ROWS, COLS), np.float32)
    prob[90:170, 50:130] = 0.9
    prob[100:170, 60:120] = 0.0  # a U open at the bottom around the notch
    keep = np.zeros((ROWS, COLS), np.float32)
    keep[20:30, 20:30] = 0.8
    ident = ModelIdentity("m", "1")
    out = restrict_to_breast(ModelOutput([ProbabilityMap("benign_lesion", prob, 0.5, ident),
                                          ProbabilityMap("malignant_lesion", keep, 0.5, ident)]), m)
    assert out.maps[0].probability.max() == 0.0
    assert out.maps[1].probability.max() == pytest.approx(0.8)


def _mlo(faces_left: bool) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic MLO: a breast half-disc on the chest wall and a brighter pectoral triangle
    from the top chest-wall corner (its front line from (row 0, col 90) to (row 150, col 0))."""
    yy, xx = np.mgrid[:ROWS, :COLS].astype(np.float32)
    rng = np.random.default_rng(0)
    breast = (xx / 170.0) ** 2 + ((yy - 128) / 126.0) ** 2 < 1
    muscle = breast & (xx < 90 - 90 * yy / 150.0)
    pixels = np.where(breast, 0.45, 0.02) + np.where(muscle, 0.35, 0.0) + rng.normal(0, 0.01, (ROWS, COLS))
    pixels = np.clip(pixels, 0, 1).astype(np.float32)
    if faces_left:
        return pixels[:, ::-1].copy(), muscle[:, ::-1].copy()
    return pixels, muscle


@pytest.mark.parametrize("faces_left", [False, True])
def test_pectoral_mask_on_a_synthetic_mlo(faces_left):
    pixels, truth = _mlo(faces_left)
    breast = breast_mask(pixels)
    found = pectoral_mask(pixels, breast, faces_left)
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.8, dice
    assert not (found & ~breast).any()
    m = mammogram_from_array(pixels, "R" if faces_left else "L", "MLO", (0.1, 0.1), faces_left=faces_left)
    assert (m.pectoral_mask == found).all() and not (allowed_region(m) & found).any()
    cc = mammogram_from_array(pixels, "L", "CC", (0.1, 0.1), faces_left=faces_left)
    assert not cc.pectoral_mask.any()  # no pectoral on a CC view


def test_orientation_cross_checked_on_a_flipped_image(caplog):
    ds = make_mg("L", "CC", (ROWS, COLS))  # Patient Orientation A\R: nipple towards the last column
    m = read_mammogram(ds)
    assert not m.faces_left and m.orientation == "header (pixels agree)"
    flipped = make_mg("L", "CC", (ROWS, COLS))
    flipped.PixelData = flipped.pixel_array[:, ::-1].copy().tobytes()  # pixels flipped, header not
    mf = read_mammogram(flipped)
    assert chest_wall_side(mf.breast_mask)[0] == "right"
    assert mf.faces_left and mf.orientation == "pixels (header disagrees)"
    del flipped.PatientOrientation
    flipped.ImageLaterality = ""
    mn = read_mammogram(flipped)
    assert mn.faces_left and mn.orientation == "pixels (no header)"
    # Unsure pixels never overrule the header.
    assert orient(False, np.zeros((ROWS, COLS), bool)) == (False, "header (pixels disagree, not sure)") or \
        orient(False, np.zeros((ROWS, COLS), bool))[1] == "header (pixels agree)"
    with caplog.at_level(logging.INFO, logger="dicom_ai.node.events"):
        (findings,) = Pipeline([_EverywhereModel()]).run([make_mg("L", "CC", (ROWS, COLS))])
    assert findings.orientation == "header (pixels agree)"
    assert any(r.getMessage() == "orientation" for r in caplog.records)
