"""Result writers with hostile sources: unusable character sets, images whose results cannot be built (issue 13)."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_ai.core.uids import ResultUIDs
from dicom_ai.results import build_results
from dicom_ai.results.sources import UTF8, clean_sources
from node_harness import StandInPipeline, make_mg

_VIEWS = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]


def _study(charsets: list, name: bytes | None = None) -> list[pydicom.Dataset]:
    """A study whose images carry these Specific Character Sets, read back from files as the
    worker reads them (so values are decoded under each file's own character set)."""
    study, series = generate_uid(), generate_uid()
    out = []
    for i, (charset, (lat, view)) in enumerate(zip(charsets, _VIEWS), start=1):
        ds = make_mg(lat, view, study, series, i)
        if charset is not None:
            ds.SpecificCharacterSet = charset
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        if name is not None:  # the name's raw bytes, exactly as a modality in that character set sends them
            old = b"Secret^Patientname"
            data = data.replace(len(old).to_bytes(2, "little") + old, len(name).to_bytes(2, "little") + name)
        out.append(pydicom.dcmread(io.BytesIO(data)))
    return out


def _build(sources):
    findings = StandInPipeline().run(sources)
    uids = ResultUIDs.generate([str(ds.SOPInstanceUID) for ds in sources])
    return build_results(sources, findings, uids)


@pytest.mark.parametrize("charset", ["ISO_IR 999", "ISO 2022 IR 87", ["ISO_IR 100", "ISO_IR 192"]])
def test_an_unusable_character_set_does_not_fail_the_results(charset):
    sources = _study([charset] * 4)
    with pytest.raises(ValueError):  # what highdicom does with it unless the sources are cleaned
        _raise_without_cleaning(sources)
    results = _build(sources)
    assert results.datasets, "no result objects"
    for ds in results.datasets:
        again = pydicom.dcmread(io.BytesIO(_bytes(ds)))
        assert again.SpecificCharacterSet == UTF8
        assert str(again.PatientName) == "Secret^Patientname"
    assert any("Specific Character Set" in n for n in results.notes)


def _raise_without_cleaning(sources):
    import highdicom as hd
    hd.sr.ComprehensiveSR(evidence=sources, content=None, series_instance_uid=generate_uid(), series_number=1,
                          sop_instance_uid=generate_uid(), instance_number=1)


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_valid_japanese_name_in_iso_2022_survives_as_utf8():
    # PS3.5 H.3.1's example: Yamada^Tarou=山田^太郎=やまだ^たろう, in ISO 2022 IR 87 after the default set.
    raw = (b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B")
    sources = _study([["", "ISO 2022 IR 87"]] * 4, name=raw)
    assert str(sources[0].PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    results = _build(sources)
    for ds in results.datasets:
        again = pydicom.dcmread(io.BytesIO(_bytes(ds)))
        assert again.SpecificCharacterSet == UTF8
        assert str(again.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_sources_that_differ_in_character_set_get_one_in_the_results():
    cleaned, notes = clean_sources(_study(["ISO_IR 100", None, "ISO_IR 100", "ISO_IR 192"]))
    assert {ds.SpecificCharacterSet for ds in cleaned} == {UTF8}
    assert notes and "differ in Specific Character Set" in notes[0]


def test_usable_and_equal_character_sets_are_copied_unchanged():
    cleaned, notes = clean_sources(_study(["ISO_IR 100"] * 4))
    assert {ds.SpecificCharacterSet for ds in cleaned} == {"ISO_IR 100"} and not notes


def test_an_image_whose_results_cannot_be_built_is_left_out_not_the_study():
    sources = _study(["ISO_IR 100"] * 4)
    bad = sources[1]
    del bad.PixelSpacing
    bad.ImagerPixelSpacing = [0, 0]  # no area can be computed: RegionError for this image only
    results = _build(sources)
    kept = [str(i.source.SOPInstanceUID) for i in results.images]
    assert str(bad.SOPInstanceUID) not in kept and len(kept) == 3
    segs = [ds for ds in results.datasets if ds.Modality == "SEG"]
    assert len(segs) == 3
    assert any(str(bad.SOPInstanceUID) in n and "RegionError" in n for n in results.notes)


def test_a_study_none_of_whose_images_can_be_built_is_an_error():
    from dicom_ai.core.errors import ResultError
    sources = _study(["ISO_IR 100"] * 2)
    for ds in sources:
        ds.ImagerPixelSpacing = ds.PixelSpacing = [0, 0]
    with pytest.raises(ResultError, match="no image's results"):
        _build(sources)


def test_type_2_attributes_missing_from_the_first_image_are_sent_empty_for_every_image():
    sources = _study(["ISO_IR 100"] * 4)
    del sources[0].PatientBirthDate, sources[0].AccessionNumber  # a sloppy modality, or a corrupt header
    results = _build(sources)
    assert len([ds for ds in results.datasets if ds.Modality == "SEG"]) == 4
    for ds in results.datasets:
        assert ds.PatientBirthDate in ("", None) and ds.AccessionNumber in ("", None)
    assert any("absent from the source" in n for n in results.notes)


def test_a_lossy_compression_flag_of_the_wrong_vr_is_dropped_and_the_seg_still_written():
    # The fuzz target's case: a byte flip turned (0028,2110) into US; highdicom copies it into
    # the SEG, which pydicom then could not write, failing the job in the worker.
    sources = _study(["ISO_IR 100"] * 4)
    from pydicom.dataelem import DataElement
    sources[0][0x00282110] = DataElement(0x00282110, "US", 1)
    results = _build(sources)
    segs = [ds for ds in results.datasets if ds.Modality == "SEG"]
    assert len(segs) == 4
    for ds in results.datasets:
        ds.save_as(io.BytesIO(), enforce_file_format=True)
    assert any("LossyImageCompression" in n for n in results.notes)


def test_an_object_that_cannot_be_encoded_is_left_out_not_the_job(monkeypatch):
    import dicom_ai.results.build as build

    sources = _study(["ISO_IR 100"] * 2)
    bad_uid = str(sources[1].SOPInstanceUID)
    real = build.build_segmentation

    def poisoned(source, *args, **kwargs):
        seg = real(source, *args, **kwargs)
        if str(source.SOPInstanceUID) == bad_uid:
            seg.add_new(0x00282110, "CS", 7)  # an int under a text VR: pydicom cannot write it
        return seg
    monkeypatch.setattr(build, "build_segmentation", poisoned)
    results = _build(sources)
    assert [str(i.source.SOPInstanceUID) for i in results.images] == [str(sources[0].SOPInstanceUID)]
    assert any(bad_uid in n and "left out" in n for n in results.notes)
