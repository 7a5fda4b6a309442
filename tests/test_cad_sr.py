"""Mammography CAD SR (TID 4000): dciodvfy, dsrdump renders it, PixelMed, and the marks it carries."""

import numpy as np

from dicom_ai.results.cad_sr import MAMMOGRAPHY_CAD_SR
from dicom_ai.results import analyse_image
from conformance.validators import dciodvfy, dsrdump

from _results_sources import VARIANTS, _items, _name, built, built_small, pixelmed_reports, roundtrip


def _cad(datasets):
    (cad,) = [d for d in datasets if d.SOPClassUID == MAMMOGRAPHY_CAD_SR]
    return cad


def test_cad_sr_valid_for_every_source_kind(tmp_path):
    for photometric, for_processing in VARIANTS:
        sources, findings, uids, datasets = built(photometric, for_processing)
        path = tmp_path / f"cad_{photometric}_{for_processing}.dcm"
        _cad(datasets).save_as(path, enforce_file_format=True)
        report = dciodvfy(path)
        assert report.output.startswith("MammographyCADSR"), report.output
        assert report.ok, report.output
    dump = dsrdump(path)
    assert dump.ok, dump.output
    assert "Mammography CAD SR Document" in dump.output
    assert '"Single Image Finding")=(129793001,SCT,"Mammography breast density")' in dump.output
    assert '"Outline")=(POLYLINE' in dump.output and '"Center")=(POINT' in dump.output


def test_cad_sr_marks_match_regions():
    sources, findings, uids, datasets = built()
    cad = roundtrip(_cad(datasets))
    root = cad.ContentSequence
    assert cad.ContentTemplateSequence[0].TemplateIdentifier == "4000"
    assert cad.ConceptNameCodeSequence[0].CodeValue == "111036"
    library = next(i for i in root if _name(i) == "111028")
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in library.ContentSequence] == \
        [d.SOPInstanceUID for d in sources]
    assert all("ConceptNameCodeSequence" not in e for e in library.ContentSequence)  # TID 4020 row 1
    summary = next(i for i in root if _name(i) == "111017")
    assert summary.ConceptCodeSequence[0].CodeValue == "111242"  # with findings
    findings_items = [i for i in _items(cad) if _name(i) == "111059"]
    regions = [(src, s, g) for src, f in zip(sources, findings) for s in analyse_image(src, f) for g in s.regions.regions]
    assert len(findings_items) == len(regions)
    for item, (src, segment, region) in zip(findings_items, regions):
        children = {(_name(c), c.ValueType): c for c in item.ContentSequence}
        outline = children[("111041", "SCOORD")]
        assert np.allclose(np.asarray(outline.GraphicData).reshape(-1, 2), region.contour, atol=1e-3)
        assert outline.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        certainty = float(children[("111012", "NUM")].MeasuredValueSequence[0].NumericValue)
        assert certainty == round(100 * region.max_probability, 2)
        assert str(children[("111001", "TEXT")].TextValue) == segment.map.model.name
        assert children[("111056", "CODE")].ConceptCodeSequence[0].CodeValue == "111150"  # presentation required


def test_cad_sr_pixelmed(tmp_path_factory):
    pm = pixelmed_reports(str(tmp_path_factory.getbasetemp()))["cad"]
    assert "Found Root Template TID_4000" in pm.output
    assert pm.ok, "\n".join(pm.errors[:5])
    assert built_small()[3][-1].SOPClassUID == MAMMOGRAPHY_CAD_SR


def test_cad_sr_of_a_normal_study(tmp_path):
    from dicom_ai.core.options import ResultOptions
    from dicom_ai.core.uids import ResultUIDs
    from dicom_ai.results import build_results

    from _results_sources import make_findings, make_study

    sources, _ = make_study()
    findings = [make_findings(s, lesion=False) for s in sources]
    cad = build_results(sources, findings, ResultUIDs.generate([s.SOPInstanceUID for s in sources]),
                        ResultOptions(cad_sr=True)).datasets[-1]
    cad.save_as(tmp_path / "cad.dcm", enforce_file_format=True)
    assert dciodvfy(tmp_path / "cad.dcm").ok and dsrdump(tmp_path / "cad.dcm").ok
    summary = next(i for i in cad.ContentSequence if _name(i) == "111017")
    assert summary.ConceptCodeSequence[0].CodeValue == "111241"  # without findings
    assert "ContentSequence" not in summary
