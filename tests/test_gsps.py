"""The per-image Grayscale Softcopy Presentation State: valid, deterministic, and rendered by dcmtk
where the SR says.

dcmtk's ``dcmp2pgm`` is the real implementation: it applies the presentation state to the MG
(modality LUT, the GSPS's VOI window, its presentation LUT) and writes the rendered image, writes
each overlay activated in a graphic layer as a PGM of its own, and dumps the graphic objects it
parsed. It draws no vector graphics, so the outlines' pixels come from the overlay plane the GSPS
carries beside its polylines; the polylines are checked as dcmtk parsed them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from _results_sources import VARIANTS, built, roundtrip, sr_regions
from conformance.validators import dciodvfy
from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.results import build_results
from dicom_ai.results.gsps import GRAPHIC_LAYER
from dicom_ai.results.marks import _edge_samples, drawn_regions

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _split(datasets):
    prs = [d for d in datasets if d.SOPClassUID == GSPS]
    (sr,) = [d for d in datasets if d.SOPClassUID == COMPREHENSIVE_3D_SR]
    return prs, sr


@pytest.mark.parametrize("photometric,for_processing", VARIANTS)
def test_gsps_is_dciodvfy_clean_and_references_its_image(photometric, for_processing, tmp_path):
    sources, findings, uids, datasets = built(photometric, for_processing)
    prs, sr = _split(datasets)
    segs = [d for d in datasets if d.Modality == "SEG"]
    assert len(prs) == len(segs) == 4  # one per image with maps
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    for k, pr in enumerate(prs):
        path = tmp_path / f"pr{k}.dcm"
        pr.save_as(path, enforce_file_format=True)
        report = dciodvfy(path)
        assert report.ok, report.output
        back = pydicom.dcmread(path)  # highdicom 0.28 has no GSPS reader
        assert back.SOPClassUID == GSPS and back.Modality == "PR"
        ref = back.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
        source = by_uid[ref.ReferencedSOPInstanceUID]
        assert pr.SOPInstanceUID == uids.gsps_instance(source.SOPInstanceUID)
        assert pr.SeriesInstanceUID == uids.gsps_series_for(source.SOPInstanceUID)
        assert pr.SeriesNumber == ResultOptions().gsps_series_number
        assert pr.Laterality == source.ImageLaterality
        assert [l.GraphicLayer for l in pr.GraphicLayerSequence] == [GRAPHIC_LAYER]
        assert pr.PresentationLUTShape == ("INVERSE" if photometric == "MONOCHROME1" else "IDENTITY")
        window = pr.SoftcopyVOILUTSequence[0]
        if for_processing:  # no window in the source: the percentile window of its values
            assert window.WindowCenterWidthExplanation.startswith("AI node")
        else:
            assert (float(window.WindowCenter), float(window.WindowWidth)) == (2048.0, 4096.0)
        assert pr.PresentationCreationDate == uids.created[:8] and "ContentDate" not in pr


def test_gsps_polylines_are_the_sr_contours_and_labels_name_finding_model_probability():
    sources, findings, uids, datasets = built()
    results = build_results(sources, findings, uids, ResultOptions(cad_sr=True))
    prs, sr = _split(datasets)
    contours: dict[str, list[np.ndarray]] = {}
    for r in sr_regions(roundtrip(sr)):
        contours.setdefault(r["source"], []).append(r["contour"])
    for pr in prs:
        source_uid = pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
        (annotation,) = pr.GraphicAnnotationSequence
        assert annotation.GraphicLayer == GRAPHIC_LAYER
        drawn = [np.asarray(g.GraphicData, dtype=float).reshape(-1, 2) for g in annotation.get("GraphicObjectSequence", [])]
        assert all(g.GraphicAnnotationUnits == "PIXEL" and g.GraphicType == "POLYLINE"
                   for g in annotation.get("GraphicObjectSequence", []))
        # Every SR contour is drawn, point for point; the GSPS draws each model's region (the
        # SR may group overlapping regions of several models into one finding).
        want = contours.get(source_uid, [])
        key = lambda c: c.round(3).tobytes()  # noqa: E731
        assert {key(c) for c in want} <= {key(c) for c in drawn}
        regions = [r.contour for s in next(i for i in results.images if i.source.SOPInstanceUID == source_uid).segments
                   for r in drawn_regions(s, ResultOptions().max_regions_per_segment)]
        assert sorted(map(key, drawn)) == sorted(map(key, regions))
        texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
        if drawn:
            assert len(texts) == len(drawn)
            assert all(re.fullmatch(r"[A-Z][a-z ]+ \((glam|dunet|microcalc)\) \d+%", t) for t in texts), texts
        else:  # the right breast: maps, no region above threshold
            assert texts == ["AI (dunet, glam, microcalc): no region above threshold"]


def test_gsps_rebuild_is_identical_and_can_be_turned_off():
    sources, findings, uids, datasets = built()
    again = build_results(sources, findings, ResultUIDs.from_json(uids.to_json()), ResultOptions(cad_sr=True))
    before = [roundtrip(d) for d in _split(datasets)[0]]
    after = [roundtrip(d) for d in _split(again.datasets)[0]]
    assert [d.to_json() for d in before] == [d.to_json() for d in after]
    off = build_results(sources, findings, uids, ResultOptions(gsps=False)).datasets
    assert not [d for d in off if d.SOPClassUID == GSPS]


def test_result_uids_stored_before_gsps_read_back_and_derive_the_same():
    uids = ResultUIDs.generate(["1.2.3"])
    stored = uids.to_json()
    assert "gsps" not in stored  # derived, not stored: an old job's JSON has all it needs
    back = ResultUIDs.from_json(stored)
    assert back.gsps_instance("1.2.3") == uids.gsps_instance("1.2.3") != uids.sc_instance("1.2.3")
    assert back.gsps_series_for("1.2.3") != back.gsps_series_for("1.2.4")


def _dcmp2pgm(source: Path, pr: Path, work: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(rendered image, rendered overlay, dump) of dcmp2pgm applying ``pr`` to ``source``."""
    out = subprocess.run(["dcmp2pgm", "-v", "-p", str(pr), str(source), str(work / "out.pgm")],
                         capture_output=True, text=True, timeout=60, cwd=work)
    assert out.returncode == 0, out.stdout + out.stderr
    return (np.array(Image.open(work / "out.pgm")), np.array(Image.open(work / "ovl_0101.pgm")),
            out.stdout + out.stderr)


@pytest.mark.skipif(shutil.which("dcmp2pgm") is None, reason="dcmtk's dcmp2pgm not installed")
@pytest.mark.parametrize("photometric,for_processing", [("MONOCHROME2", False), ("MONOCHROME1", True)])
def test_dcmtk_renders_the_outlines_where_the_sr_says(photometric, for_processing, tmp_path):
    sources, findings, uids, datasets = built(photometric, for_processing)
    prs, sr = _split(datasets)
    regions = sr_regions(roundtrip(sr))
    source = next(s for s in sources if any(r["source"] == s.SOPInstanceUID for r in regions))
    pr = next(p for p in prs
              if p.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID)
    source.save_as(tmp_path / "mg.dcm", enforce_file_format=True)
    pr.save_as(tmp_path / "pr.dcm", enforce_file_format=True)
    image, overlay, dump = _dcmp2pgm(tmp_path / "mg.dcm", tmp_path / "pr.dcm", tmp_path)
    sr_contours = [r["contour"] for r in regions if r["source"] == source.SOPInstanceUID]
    contours = [np.asarray(g.GraphicData, dtype=float).reshape(-1, 2)
                for g in pr.GraphicAnnotationSequence[0].GraphicObjectSequence]
    key = lambda c: c.round(2).tobytes()  # noqa: E731
    assert {key(c) for c in sr_contours} <= {key(c) for c in contours}
    assert image.shape == overlay.shape == (source.Rows, source.Columns)

    # The rendered outline pixels are the pixels the contours (the SR's among them) pass
    # through: every vertex is on one, and each one is within a pixel's diagonal of an edge.
    lit = overlay > 0
    for c in contours:
        assert lit[np.floor(c[:, 1]).astype(int), np.floor(c[:, 0]).astype(int)].all()
    rows, cols = np.nonzero(lit)
    centres = np.column_stack([cols + 0.5, rows + 0.5])
    nearest = np.full(len(centres), np.inf)
    for c in contours:
        for a, b in zip(c[:-1], c[1:]):
            t = np.clip(((centres - a) @ (b - a)) / max(float((b - a) @ (b - a)), 1e-12), 0, 1)
            nearest = np.minimum(nearest, np.linalg.norm(centres - (a + t[:, None] * (b - a)), axis=1))
    assert nearest.max() <= np.sqrt(0.5) + 1e-6, f"a rendered outline pixel is {nearest.max():.2f} px from every SR contour"
    assert lit.sum() < 0.1 * lit.size

    # The polylines as dcmtk parsed them are the GSPS's, which hold every SR contour.
    parsed = [np.array([[float(v) for v in p.split("\\")] for p in line.split("coordinates:", 1)[1].split(",") if p.strip()])
              for line in dump.splitlines() if "coordinates:" in line]
    assert sorted(map(key, parsed)) == sorted(map(key, contours))
    assert f"[{GRAPHIC_LAYER}]" in dump

    # The rendered image is the source through the GSPS's window and keeps the image's look:
    # it correlates with dcmtk's rendering of the image alone (which applies MONOCHROME1), and
    # not inverted (MONOCHROME1 sources get an INVERSE presentation LUT).
    plain = subprocess.run(["dcmp2pgm", str(tmp_path / "mg.dcm"), str(tmp_path / "plain.pgm")],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    alone = np.array(Image.open(tmp_path / "plain.pgm")).astype(float)
    assert np.corrcoef(alone.ravel(), image.ravel().astype(float))[0, 1] > 0.9
    assert image.std() > 20  # a window, not a flat grey


def test_edge_samples_are_linspace_bit_for_bit():
    """outline_mask samples every contour edge at once (marks._edge_samples): the same points,
    bit for bit, as np.linspace per edge (the loop it replaced)."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(2, 60))
        c = rng.uniform(0, 3000, (n, 2)) if rng.random() < 0.5 else np.round(rng.uniform(0, 300, (n, 2))) + 0.5
        c = np.vstack([c, c[:1]])
        per_edge = [a + (b - a) * np.linspace(0, 1, max(2, int(np.ceil(np.abs(b - a).max() * 4)) + 1))[:, None]
                    for a, b in zip(c[:-1], c[1:])]
        assert np.array_equal(np.vstack(per_edge), _edge_samples(c[:-1], c[1:]))
