"""dicom_ai.results: the node's interface, idempotent UIDs, input errors, previews, phantom study."""

import numpy as np
import pytest
from PIL import Image

from dicom_ai.core.findings import ImageFindings, ImageScore, ModelIdentity, ProbabilityMap
from dicom_ai.core.errors import ResultError
from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.results import build_results
from conformance.validators import dciodvfy

from _results_sources import built, contour_inside, make_study, roundtrip, seg_masks, sr_regions


def _uids_of(ds):
    return (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SeriesDate, ds.SeriesTime,
            ds.get("ContentDate", ds.get("PresentationCreationDate")),  # a GSPS has no Content Date
            ds.get("ContentTime", ds.get("PresentationCreationTime")))


def test_uids_json_roundtrip_and_derived():
    u = ResultUIDs.generate(["1.2.3", "1.2.4"])
    v = ResultUIDs.from_json(u.to_json())
    assert v == u and len(u.created) == 14
    assert u.seg_instance("1.2.3") == u.seg_instances["1.2.3"]
    assert u.seg_instance("1.2.9") == v.seg_instance("1.2.9") != u.seg_instance("1.2.8")
    with pytest.raises(ResultError):
        ResultUIDs.from_json('{"seg_series": "1"}')


def test_idempotent_resend():
    sources, findings, uids, first = built()
    again = build_results(sources, findings, ResultUIDs.from_json(uids.to_json()), ResultOptions(cad_sr=True)).datasets
    assert [_uids_of(d) for d in again] == [_uids_of(d) for d in first]
    for a, b in zip(first, again):  # the whole objects, not only their UIDs
        assert roundtrip(a) == roundtrip(b)
    assert {d.SOPInstanceUID for d in first if d.Modality == "SEG"} == set(uids.seg_instances.values())
    seg_series = [d.SeriesInstanceUID for d in first if d.Modality == "SEG"]
    assert len(set(seg_series)) == len(sources)  # one series per SEG (OHIF lists one SEG per series)
    assert seg_series == [uids.seg_series_for(s.SOPInstanceUID) for s in sources]
    sr = [d for d in first if d.Modality == "SR"]
    assert sr[0].SOPInstanceUID == uids.sr_instance and sr[1].SOPInstanceUID == uids.cad_instance


def test_options_series_and_equipment():
    sources, findings, uids, datasets = built()
    opts = ResultOptions()
    assert [d.SeriesNumber for d in datasets] == [opts.seg_series_number] * 4 + [opts.gsps_series_number] * 4 + [
        opts.sr_series_number, opts.cad_series_number]
    assert {d.Manufacturer for d in datasets} == {opts.equipment.manufacturer}
    assert all(d.StudyInstanceUID == sources[0].StudyInstanceUID for d in datasets)
    assert all(d.PatientID == sources[0].PatientID for d in datasets)
    assert [d for d in build_results(sources, findings, uids).datasets if d.Modality == "SR"][-1].SOPClassUID.endswith("88.34")


def test_input_errors():
    sources, findings = make_study()
    uids = ResultUIDs.generate([d.SOPInstanceUID for d in sources])
    stray = ImageFindings("1.2.3.999")
    with pytest.raises(ResultError, match="not among the sources"):
        build_results(sources, findings + [stray], uids)
    wrong = ImageFindings(sources[0].SOPInstanceUID, maps=[ProbabilityMap(
        "calcification", np.zeros((10, 10), np.float32), 0.5, ModelIdentity("m", "1"))])
    with pytest.raises(ResultError, match="stored source grid"):
        build_results(sources[:1], [wrong], uids)
    with pytest.raises(ResultError, match="no source images"):
        build_results([], [], uids)
    # An image without maps: no SEG, but the SR is still written with its scores.
    bare = ImageFindings(sources[0].SOPInstanceUID, scores=[ImageScore("malignant", 0.2, ModelIdentity("m", "1"))])
    out = build_results(sources[:1], [bare], uids).datasets
    assert [d.Modality for d in out] == ["SR"]


def test_previews(tmp_path):
    sources, findings, uids, datasets = built()
    paths = build_results(sources, findings, uids).write_previews(tmp_path / "previews")
    assert [p.name for p in paths] == [f"{d.SOPInstanceUID}.png" for d in sources]
    img = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert img.shape[:2] == (int(sources[0].Rows), int(sources[0].Columns))
    colourful = (np.abs(img[..., 0].astype(int) - img[..., 1]) > 60).sum()
    assert colourful > 50  # outlines and labels drawn on the L CC with findings
    plain = np.asarray(Image.open(paths[2]).convert("RGB"))[20:]  # the R CC has none (below the header)
    assert (np.abs(plain[..., 0].astype(int) - plain[..., 1]) > 60).sum() == 0


def test_phantom_study_end_to_end(tmp_path):
    """Maps made from the phantom's ground truth (a perfect model) on a MONOCHROME1 For
    Processing study: every object validates and the SR contours follow the lesions."""
    from dicom_ai.data.phantom import generate_study

    study = generate_study(11, shape=(416, 320), photometric="MONOCHROME1", presentation="FOR PROCESSING", normal=False)
    model = ModelIdentity("truth", "1")
    sources, findings = [], []
    for im in study.images:
        lesion = (im.masks["mass_malignant"] | im.masks["mass_benign"]).astype(np.float32)
        cluster = (im.masks["cluster_malignant"] | im.masks["cluster_benign"]).astype(np.float32)
        f = ImageFindings(im.dataset.SOPInstanceUID)
        f.maps = [ProbabilityMap("malignant_lesion", lesion * 0.9, 0.5, model),
                  ProbabilityMap("calcification_cluster", cluster * 0.8, 0.5, model)]
        f.scores = [ImageScore("malignant", 0.9 if im.labels["malignant"] else 0.1, model)]
        sources.append(im.dataset)
        findings.append(f)
    uids = ResultUIDs.generate([d.SOPInstanceUID for d in sources])
    out = build_results(sources, findings, uids, ResultOptions(cad_sr=True)).datasets
    for i, ds in enumerate(out):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy(path).ok, dciodvfy(path).output
    segs = {d.SOPInstanceUID: d for d in out if d.Modality == "SEG"}
    regions = sr_regions(roundtrip(out[-2]))
    truth_regions = sum(1 for im in study.images if im.masks["mass_malignant"].any() or im.masks["mass_benign"].any())
    assert len(regions) >= truth_regions > 0
    for reg in regions:
        seg = segs[reg["seg"]]
        mask = seg_masks(seg, reg["source"])[reg["frame"] - 1].astype(bool)
        assert contour_inside(reg["contour"], mask)[0]
