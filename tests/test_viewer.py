"""The node's findings in a real viewer (OHIF over Orthanc DICOMweb, headless Chromium).

The browser test needs Debian chromium, Node/npm and about 220 MB of npm packages (installed
into build/viewer on first use), and takes 2-4 minutes, so it runs only when
``DICOM_AI_VIEWER=1`` is set: ``DICOM_AI_VIEWER=1 make test``, or ``make viewer-check`` for the
full report with screenshots. The variant tests below run always; they pin down the facts
conformance/viewer.md relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "conformance" / "viewer"))

import fixtures  # noqa: E402

from conformance.validators import dciodvfy  # noqa: E402

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed (make debs)")


@pytest.fixture(scope="module")
def study():
    return fixtures.make_study(seed=2, shape=(416, 320))


def test_node_seg_has_no_plane_orientation(study):
    """The node's SEG is the standard form for an MG: no Frame of Reference, no plane geometry."""
    assert study.segs, "phantom seed 2 has findings, so there must be SEGs"
    for seg in study.segs:
        assert "FrameOfReferenceUID" not in seg
        assert "PlaneOrientationSequence" not in seg.SharedFunctionalGroupsSequence[0]
        assert all("PlaneOrientationSequence" not in fg for fg in seg.PerFrameFunctionalGroupsSequence)


@needs_dciodvfy
def test_plane_orientation_variant_passes_dciodvfy(study, tmp_path):
    """dciodvfy does not flag the plane geometry that PS3.3 A.51-2 forbids without a FoR."""
    seg = study.segs[0]
    source_uid = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    source = next(ds for ds in study.images if ds.SOPInstanceUID == source_uid)
    variant = fixtures.with_plane_orientation(seg, source)
    path = tmp_path / "seg_po.dcm"
    variant.save_as(path, enforce_file_format=True)
    report = dciodvfy(path)
    assert report.errors == []
    iop = variant.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in iop] == fixtures.CORNERSTONE_DEFAULT_IOP
    assert "PixelMeasuresSequence" in variant.SharedFunctionalGroupsSequence[0]


def test_geometry_only_sr_keeps_every_region(study):
    sr = study.srs[0]
    variant = fixtures.sr_geometry_groups_only(sr)
    before, after = fixtures.sr_contours(sr), fixtures.sr_contours(variant)
    assert sum(map(len, before.values())) > 0
    assert {k: len(v) for k, v in before.items()} == {k: len(v) for k, v in after.items()}
    measurements = [c for c in variant.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "126010"][0]
    for group in measurements.ContentSequence:
        assert any(c.ValueType == "SCOORD" for c in group.ContentSequence)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.environ.get("DICOM_AI_VIEWER") != "1",
                    reason="browser test is opt-in: set DICOM_AI_VIEWER=1 (needs chromium, npm)")
def test_findings_visible_in_ohif(tmp_path):
    import check_viewer

    rc = check_viewer.main(["--out", str(tmp_path), "--no-experiments", "--timeout", "240"])
    assert rc != 2, "the viewer check could not run (see stderr for what is missing)"
    report = json.loads((tmp_path / "report.json").read_text())
    failed = [f"{c['name']}: {c['detail'][:200]}" for c in report["checks"] if not c["ok"]]
    assert not failed, "OHIF does not show the findings as required:\n" + "\n".join(failed)
