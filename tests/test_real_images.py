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


# --- operating points, merged findings, validity -------------------------------------------


def _bundle_with_points(tmp_path):
    import torch

    from dicom_ai.networks.bundle import save_bundle

    manifest = {"name": "toy", "version": "1", "architecture": {"kind": "toy"}, "input": {}, "intended_use": "test",
                "training": {}, "thresholds": {"malignant_lesion": 0.5, "benign_lesion": 0.5},
                "operating_points": {"default": "fp0.5", "findings": {
                    "malignant_lesion": [
                        {"name": "fp0.5", "threshold": 0.8, "target": "0.5 false marks per image", "sensitivity": 0.3,
                         "data": "fixture"},
                        {"name": "fp1", "threshold": 0.6, "target": "1 false mark per image", "sensitivity": 0.4,
                         "data": "fixture"}],
                    "benign_lesion": [{"name": "fp1", "threshold": 0.7, "target": "1 false mark per image",
                                       "sensitivity": 0.1, "data": "fixture"},
                                      {"name": "fp0.5", "off": True, "target": "0.5 false marks per image",
                                       "sensitivity": 0.0, "data": "fixture"}]}}}
    return save_bundle(tmp_path / "toy", manifest, {"w": torch.zeros(1)})


def test_operating_points_read_from_the_manifest_and_picked_by_name(tmp_path):
    from dicom_ai.networks.bundle import load_bundle

    path = _bundle_with_points(tmp_path)
    default = load_bundle(path)
    assert default.manifest["thresholds"] == {"malignant_lesion": 0.8, "benign_lesion": 0.5}
    assert default.identity.operating_point == "fp0.5"
    assert default.identity.operating_target == "0.5 false marks per image"
    assert default.identity.off == ("benign_lesion",)  # switched off at fp0.5: its map is not sent
    loose = load_bundle(path, operating_point="fp1")
    assert loose.manifest["thresholds"] == {"malignant_lesion": 0.6, "benign_lesion": 0.7}
    assert loose.identity.operating_point == "fp1" and loose.identity.off == ()
    with pytest.raises(BundleError, match="no operating point 'fp9'.*fp0.5, fp1"):
        load_bundle(path, operating_point="fp9")
    # A manifest without operating points: its thresholds, a plain identity; a name is refused.
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["operating_points"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    plain = load_bundle(path)
    assert plain.manifest["thresholds"]["malignant_lesion"] == 0.5 and type(plain.identity) is ModelIdentity
    with pytest.raises(BundleError, match="has no operating points"):
        load_bundle(path, operating_point="fp1")


def test_a_finding_switched_off_by_the_operating_point_is_not_sent():
    from dicom_ai.networks.bundle import OperatingIdentity

    model = _EverywhereModel()
    model.identity = OperatingIdentity("everywhere", "1", operating_point="strict", off=("malignant_lesion",))
    (findings,) = Pipeline([model]).run([make_mg("L", "CC", (ROWS, COLS))])
    assert findings.maps == []


def test_duplicate_marks_merged_in_the_sr_while_the_seg_keeps_each_segment(tmp_path):
    from conformance.validators import dciodvfy
    from dicom_ai.core.options import ResultOptions
    from dicom_ai.core.uids import ResultUIDs
    from dicom_ai.networks.bundle import OperatingIdentity
    from dicom_ai.results import build_results

    from _results_sources import _items, _name, blob, roundtrip

    ds = make_mg("L", "CC", (ROWS, COLS))
    shape = (ROWS, COLS)
    glam = OperatingIdentity("glam", "1", operating_point="fp0.5", operating_target="0.5 false marks per image")
    dunet = OperatingIdentity("dunet", "2", operating_point="fp0.5", operating_target="0.5 false marks per image")
    from dicom_ai.core.findings import ImageFindings

    findings = ImageFindings(ds.SOPInstanceUID)
    findings.maps = [ProbabilityMap("malignant_lesion", blob(shape, (120, 60), (20, 20)), 0.5, glam),
                     ProbabilityMap("malignant_lesion", blob(shape, (124, 62), (20, 20), 0.8), 0.4, dunet),
                     ProbabilityMap("benign_lesion", blob(shape, (40, 40), (24, 24), 0.7), 0.5, dunet)]
    findings.orientation = "header (pixels agree)"
    uids = ResultUIDs.generate([str(ds.SOPInstanceUID)])
    datasets = build_results([ds], [findings], uids, ResultOptions(cad_sr=True)).datasets
    (seg,) = [d for d in datasets if d.Modality == "SEG"]
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert len(labels) == 3  # each model's segment stays in the SEG
    srs = [d for d in datasets if d.Modality == "SR"]
    for i, sr in enumerate(srs):
        path = tmp_path / f"sr{i}.dcm"
        sr.save_as(path, enforce_file_format=True)
        report = dciodvfy(path)
        assert report.ok, report.output
    tid1500 = next(sr for sr in srs if sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34")
    items = list(_items(roundtrip(tid1500)))
    tracking = [str(i.TextValue) for i in items if _name(i) == "112039"]
    assert sum("malignant lesion (glam+dunet)" in t for t in tracking) == 1
    assert not any("malignant lesion (dunet)" in t for t in tracking)
    assert any("benign lesion (dunet)" in t for t in tracking)
    texts = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
    assert any("operating point fp0.5: threshold 0.4 (0.5 false marks per image)" in t for t in texts)
    assert any("nipple direction from the header (pixels agree)" in t for t in texts)
    cad = next(sr for sr in srs if sr.SOPClassUID != "1.2.840.10008.5.1.4.1.1.88.34")
    params = [str(i.TextValue) for i in _items(cad) if _name(i) == "111002"]
    assert params and all(p.startswith("operating point fp0.5") for p in params)
    import highdicom as hd

    assert hd.sr.srread(tmp_path / "sr0.dcm") is not None


def test_node_toml_operating_point_reaches_the_loaded_pipeline():
    from dicom_ai.networks.bundle import load_bundle
    from dicom_ai.node.config import load_config
    from dicom_ai.node.processing import load_pipeline

    default = load_bundle("dunet").identity.operating_point
    other = "phantom" if default != "phantom" else "fp2"  # both named in the shipped manifest
    cfg = load_config(None, {"pipeline.models": ["dunet"], "pipeline.device": "cpu",
                             "pipeline.operating_point": other})
    assert load_pipeline(cfg).models[0].identity.operating_point == other
    cfg = load_config(None, {"pipeline.models": ["dunet"], "pipeline.device": "cpu"})
    assert load_pipeline(cfg).models[0].identity.operating_point == default
