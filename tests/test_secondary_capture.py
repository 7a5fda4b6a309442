"""The optional "AI overlay" Secondary Capture: off by default, dciodvfy clean, labelled derived and
not for diagnosis, and its outlines burned in where the SR's contours are."""

from __future__ import annotations

import functools

import highdicom as hd
import numpy as np
import pytest

from _results_sources import VARIANTS, make_study, roundtrip, sr_regions
from conformance.validators import dciodvfy
from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.results import build_results
from dicom_ai.results.codes import display_rgb

SC = "1.2.840.10008.5.1.4.1.1.7"


@functools.lru_cache(maxsize=None)
def _built(photometric: str, for_processing: bool):
    sources, findings = make_study(photometric, for_processing)
    uids = ResultUIDs.generate([str(d.SOPInstanceUID) for d in sources])
    results = build_results(sources, findings, uids, ResultOptions(secondary_capture=True))
    return sources, uids, results


def test_off_by_default():
    sources, findings = make_study()
    uids = ResultUIDs.generate([str(d.SOPInstanceUID) for d in sources])
    assert not [d for d in build_results(sources, findings, uids).datasets if d.SOPClassUID == SC]


@pytest.mark.parametrize("photometric,for_processing", VARIANTS)
def test_overlay_is_dciodvfy_clean_and_labelled_derived(photometric, for_processing, tmp_path):
    sources, uids, results = _built(photometric, for_processing)
    scs = [d for d in results.datasets if d.SOPClassUID == SC]
    assert len(scs) == 4 and results.notes == []
    assert [d.SeriesInstanceUID for d in scs] == [uids.sc_series_for(s.SOPInstanceUID) for s in sources]
    assert {d.SeriesNumber for d in scs} == {ResultOptions().sc_series_number}
    for k, (sc, source) in enumerate(zip(scs, sources)):
        path = tmp_path / f"sc{k}.dcm"
        sc.save_as(path, enforce_file_format=True)
        report = dciodvfy(path)
        assert report.ok, report.output
        back = hd.imread(path)
        assert back.SOPInstanceUID == uids.sc_instance(source.SOPInstanceUID)
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
        assert sc.BurnedInAnnotation == "YES"
        assert sc.DerivationCodeSequence[0].CodeValue == "113076"
        assert "not for diagnosis" in sc.DerivationDescription
        assert "NOT FOR DIAGNOSIS" in sc.SeriesDescription.upper()
        assert sc.Laterality == source.ImageLaterality
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sc.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert (sc.Rows, sc.Columns, sc.PhotometricInterpretation) == (source.Rows, source.Columns, "RGB")
        assert sc.PatientID == source.PatientID and sc.StudyInstanceUID == source.StudyInstanceUID
        assert list(sc.PatientOrientation) == list(source.PatientOrientation)
        assert sc.ContentDate == uids.created[:8]


def test_outlines_are_burned_in_where_the_sr_contours_are():
    sources, uids, results = _built("MONOCHROME1", False)
    (sr,) = [d for d in results.datasets if d.SOPClassUID.endswith("88.34")]
    regions = sr_regions(roundtrip(sr))
    scs = {d.SourceImageSequence[0].ReferencedSOPInstanceUID: d for d in results.datasets if d.SOPClassUID == SC}
    colours = {display_rgb(k, n) for k in ("malignant_lesion", "benign_lesion", "calcification",
                                           "calcification_cluster") for n in range(3)}
    checked = 0
    for r in regions:
        pixels = roundtrip(scs[r["source"]]).pixel_array
        c = r["contour"]
        at = pixels[np.floor(c[:, 1]).astype(int), np.floor(c[:, 0]).astype(int)]
        assert all(tuple(int(v) for v in p) in colours for p in at), "an SR contour vertex is not drawn in colour"
        checked += 1
    assert checked >= 2
    # Away from every outline the picture is grey (R = G = B): the mammogram itself.
    pixels = roundtrip(scs[sources[2].SOPInstanceUID]).pixel_array  # the right breast: no region
    body = pixels[40:]
    assert (body[..., 0] == body[..., 1]).all() and (body[..., 1] == body[..., 2]).all()
    assert body.std() > 20
