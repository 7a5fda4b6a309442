"""TID 1500 SR: dciodvfy for all source kinds, contours inside their SEG segments, PixelMed, dcmqi."""

import copy
import io
import json

import highdicom as hd
import numpy as np
import pytest

from dicom_ai.core.errors import ResultError
from dicom_ai.results import analyse_image
from dicom_ai.results.build import _pin_creation
from dicom_ai.results.tid1500 import comprehensive_3d_sr, merge_regions
from conformance.validators import dciodvfy, tid1500reader

from _results_sources import (VARIANTS, _items, _name, built, built_small, contour_inside, pixelmed_reports, roundtrip,
                              seg_masks, sr_regions)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _sr(datasets):
    (sr,) = [d for d in datasets if d.SOPClassUID == COMPREHENSIVE_3D_SR]
    return sr


@pytest.mark.parametrize("photometric,for_processing", VARIANTS)
def test_sr_valid_and_contours_inside_segments(tmp_path, photometric, for_processing):
    sources, findings, uids, datasets = built(photometric, for_processing)
    sr = _sr(datasets)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = dciodvfy(path)
    assert report.ok, report.output
    segs = {d.SOPInstanceUID: d for d in datasets if d.Modality == "SEG"}
    regions = sr_regions(roundtrip(sr))
    # Overlapping regions of several models are one finding (issue 14): one group per merged set.
    expected = sum(len(merge_regions([(s, g) for s in analyse_image(src, f) for g in s.regions.regions]))
                   for src, f in zip(sources, findings))
    assert len(regions) == expected > 0
    for reg in regions:
        seg = segs[reg["seg"]]
        src_uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        assert src_uid == reg["source"]  # the contour's image is the SEG's source image
        mask = seg_masks(seg, src_uid)[reg["frame"] - 1].astype(bool)
        ok, _ = contour_inside(reg["contour"], mask)
        assert ok, reg["tracking"]
        assert reg["graphic_type"] == "POLYLINE" and np.array_equal(reg["contour"][0], reg["contour"][-1])
        assert 4 <= len(reg["contour"]) <= 129 and len(np.unique(reg["contour"], axis=0)) >= 3


def test_sr_content():
    sources, findings, uids, datasets = built()
    sr = roundtrip(_sr(datasets))
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    items = list(_items(sr))
    # Device observer: the node and the model versions.
    name = next(str(i.TextValue) for i in items if _name(i) == "121013")
    assert "glam 1.0.0" in name and "dunet 0.3.1" in name and "microcalc 2.0" in name
    assert next(i for i in items if _name(i) == "121005").ConceptCodeSequence[0].CodeValue == "121007"  # Device
    tracking = [str(i.TextValue) for i in items if _name(i) == "112039"]
    uids_ = [str(i.UID) for i in items if _name(i) == "112040"]
    assert len(set(uids_)) == len(uids_) == len(tracking)
    assert "L CC malignant lesion (glam+dunet) region 1" in tracking  # merged (issue 14)
    # Every measurement group has a SCOORD (OHIF 3.13 stops on a group without one).
    measurements = next(i for i in sr.ContentSequence if _name(i) == "126010")
    for group in measurements.ContentSequence:
        assert any(c.ValueType == "SCOORD" for c in group.ContentSequence)
    # Image, breast and study scores, and a line per segment, in Qualitative Evaluations.
    evaluations = next(i for i in sr.ContentSequence if _name(i) == "C0034375")
    texts = [str(i.TextValue) for i in evaluations.ContentSequence]
    assert "L CC: malignant score 83 % (glam 1.0.0)" in texts
    assert "R MLO: benign score 2 % (glam 1.0.0)" in texts
    assert "Left breast: malignant score 83 % (maximum over its images) (glam 1.0.0)" in texts
    assert "Right breast: malignant score 4 % (maximum over its images) (glam 1.0.0)" in texts
    assert "Study: benign score 41 % (maximum over its images) (glam 1.0.0)" in texts
    assert any(t.startswith("L CC malignant lesion (glam): 1 region, ") and t.endswith("(SEG segment 2)")
               for t in texts)
    assert "R CC benign lesion (glam): no region above threshold 0.5 (SEG segment 3)" in texts
    probs = [i for i in items if _name(i) == "111047" and i.ValueType == "NUM"]
    assert probs and {i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for i in probs} == {"%"}
    areas = [i for i in items if _name(i) == "42798000"]
    assert {a.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for a in areas} == {"mm2"}
    # Evidence lists every source and every SEG.
    refs = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert refs == {d.SOPInstanceUID for d in sources} | {d.SOPInstanceUID for d in datasets if d.Modality == "SEG"}


def test_sr_areas_use_magnification_corrected_spacing():
    sources, findings, uids, datasets = built()
    regions = sr_regions(roundtrip(_sr(datasets)))
    src = sources[0]
    segments = analyse_image(src, findings[0])
    px_area = (0.1 / float(src.EstimatedRadiographicMagnificationFactor)) ** 2
    # A merged finding (issue 14) reports its most probable member's area, on that member's frame.
    match = next(r for r in regions if r["source"] == src.SOPInstanceUID)
    areas = [g.pixel_count * px_area for g in segments[match["frame"] - 1].regions.regions]
    assert any(match["area"] == pytest.approx(a, rel=1e-3) for a in areas)


def test_sr_pixelmed_and_dcmqi(tmp_path, tmp_path_factory):
    """The slow validators, once, on a small study: PixelMed DicomSRValidator (no errors) and
    dcmqi tid1500reader."""
    sources, findings, uids, datasets = built_small()
    pm = pixelmed_reports(str(tmp_path_factory.getbasetemp()))["tid1500"]
    assert "Found Root Template TID_1500" in pm.output
    assert pm.ok, "\n".join(pm.errors[:5])
    assert not pm.warnings, "\n".join(pm.warnings[:5])
    path = tmp_path / "sr.dcm"
    sr = _sr(datasets)
    sr.save_as(path, enforce_file_format=True)
    out = tmp_path / "sr.json"
    report = tid1500reader(path, out)
    assert report.ok, report.output
    groups = json.loads(out.read_text())["Measurements"]
    assert len(groups) >= len(sr_regions(roundtrip(sr))) > 0
    assert any(m["quantity"]["CodeValue"] == "42798000" for g in groups for m in g["measurementItems"])


def test_study_without_regions(tmp_path):
    """A normal study: no region anywhere, so no Imaging Measurements; scores still reported."""
    from dicom_ai.core.uids import ResultUIDs
    from dicom_ai.results import build_results

    from _results_sources import make_findings, make_study

    sources, _ = make_study()
    findings = [make_findings(s, lesion=False) for s in sources]
    sr = build_results(sources, findings, ResultUIDs.generate([s.SOPInstanceUID for s in sources])).datasets[-1]
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dciodvfy(tmp_path / "sr.dcm").ok
    back = roundtrip(sr)
    assert not any(_name(i) == "126010" for i in back.ContentSequence)
    texts = [str(i.TextValue) for i in next(i for i in back.ContentSequence if _name(i) == "C0034375").ContentSequence]
    assert "Study: malignant score 4 % (maximum over its images) (glam 1.0.0)" in texts


def test_report_object_is_what_highdicoms_constructor_makes():
    """comprehensive_3d_sr gives the root without its tree to highdicom's constructor and attaches
    the tree after: the bytes are those of the constructor given the whole tree, sr.content is
    the whole tree, and a reference outside the evidence is refused as the constructor would."""
    sources, findings, uids, datasets = built()
    root = _sr(datasets).content[0]
    assert len(root.ContentSequence) == len(_sr(datasets).ContentSequence) > 2
    evidence = list(sources) + [d for d in datasets if d.Modality == "SEG"]
    kwargs = dict(series_instance_uid="1.2.3.4", series_number=7, sop_instance_uid="1.2.3.5", instance_number=1,
                  manufacturer="m", is_complete=True, series_description="d", manufacturer_model_name="n",
                  software_versions="1", device_serial_number="s")
    objects = [comprehensive_3d_sr(copy.deepcopy(root), evidence, **kwargs),
               hd.sr.Comprehensive3DSR(evidence=evidence, content=copy.deepcopy(root), **kwargs)]
    encoded = []
    for sr in objects:
        _pin_creation(sr, "20261201120000")
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        encoded.append(buf.getvalue())
    assert encoded[0] == encoded[1]
    assert objects[0].content[0].ContentSequence is objects[0].ContentSequence
    with pytest.raises(ResultError, match="not among its evidence"):
        comprehensive_3d_sr(copy.deepcopy(root), evidence[:1], **kwargs)
    with pytest.raises(ValueError, match="No evidence"):
        hd.sr.Comprehensive3DSR(evidence=evidence[:1], content=copy.deepcopy(root), **kwargs)
