"""SEG per mammogram: dciodvfy-clean for all source kinds, masks read back equal, coded segments."""

import numpy as np
import pytest

from dicom_ai.core.options import Equipment, ResultOptions
from dicom_ai.results import ObjectIdentity, analyse_image
from dicom_ai.core.errors import SegWriterError
from dicom_ai.results.seg import build_segmentation
from conformance.validators import dciodvfy

from _results_sources import VARIANTS, built, make_findings, make_mg, roundtrip, seg_masks

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.mark.parametrize("photometric,for_processing", VARIANTS)
def test_seg_valid_and_masks_read_back(tmp_path, photometric, for_processing):
    sources, findings, uids, datasets = built(photometric, for_processing)
    segs = [d for d in datasets if d.SOPClassUID == SEG]
    assert len(segs) == len(sources)
    for src, f, seg in zip(sources, findings, segs):
        path = tmp_path / f"{seg.SOPInstanceUID}.dcm"
        seg.save_as(path, enforce_file_format=True)
        report = dciodvfy(path)
        assert report.ok, report.output
        back = roundtrip(seg)
        assert back.PatientOrientation == src.PatientOrientation
        assert "Laterality" not in back  # series Laterality must not be set (dciodvfy rejects it)
        assert "FrameOfReferenceUID" not in back
        assert back.DerivationImageSequence if "DerivationImageSequence" in back else True
        expected = np.stack([s.regions.mask for s in analyse_image(src, f)])
        got = seg_masks(seg, src.SOPInstanceUID)
        assert got.shape == expected.shape
        assert np.array_equal(got.astype(bool), expected)


def test_segment_descriptions_are_coded():
    sources, findings, uids, datasets = built()
    seg = roundtrip(datasets[0])
    descs = seg.SegmentSequence
    assert [d.SegmentNumber for d in descs] == list(range(1, len(descs) + 1)) == list(range(1, 6))
    labels = [d.SegmentLabel for d in descs]
    assert labels == ["Malignant lesion (dunet)", "Malignant lesion (glam)", "Benign lesion (glam)",
                      "Calcification (microcalc)", "Calcification cluster (microcalc)"]
    for d in descs:
        assert d.SegmentAlgorithmType == "AUTOMATIC"
        assert d.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        algo = d.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName in ("glam", "dunet", "microcalc") and algo.AlgorithmVersion
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert len(d.RecommendedDisplayCIELabValue) == 3
        assert d.AnatomicRegionSequence[0].CodeValue == "76752008"
    mal = descs[1].SegmentedPropertyTypeCodeSequence[0]
    assert mal.CodeValue == "4147007" and mal.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "21594007"
    assert descs[2].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "30807003"
    assert descs[3].SegmentedPropertyTypeCodeSequence[0].CodeValue == "129770007"
    assert descs[4].SegmentedPropertyTypeCodeSequence[0].CodeValue == "129769006"
    # Empty segments are kept: one frame per segment, and frame N is segment N.
    assert int(seg.NumberOfFrames) == 5
    frames = [fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber for fg in seg.PerFrameFunctionalGroupsSequence]
    assert frames == [1, 2, 3, 4, 5]
    right = roundtrip(datasets[2])  # the right breast has no findings: all frames empty, still written
    assert int(right.NumberOfFrames) == 5 and not np.any(seg_masks(datasets[2], sources[2].SOPInstanceUID))


def test_fractional_and_compression(tmp_path):
    src = make_mg("L", "CC", (256, 192))
    f = make_findings(src)
    segments = analyse_image(src, f)
    common = dict(identity=ObjectIdentity(series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4", series_number=9001,
                                          series_description="AI findings (SEG)", instance_number=1),
                  equipment=Equipment(manufacturer="t", model_name="t", software_version="1", device_serial_number="1"))
    sizes = {}
    for seg_type, compression in [("BINARY", "none"), ("BINARY", "jpeg2000"), ("FRACTIONAL", "none"),
                                  ("FRACTIONAL", "jpegls")]:
        seg = build_segmentation(src, segments, segmentation_type=seg_type, compression=compression, **common)
        path = tmp_path / f"{seg_type}_{compression}.dcm"
        seg.save_as(path, enforce_file_format=True)
        sizes[(seg_type, compression)] = path.stat().st_size
        assert dciodvfy(path).ok, dciodvfy(path).output
        got = seg_masks(seg, src.SOPInstanceUID)
        if seg_type == "BINARY":
            assert np.array_equal(got.astype(bool), np.stack([s.regions.mask for s in segments]))
        else:
            want = np.stack([s.map.probability for s in segments])
            assert np.abs(got.astype(np.float32) - want).max() <= 1 / 255 + 1e-6
    # A compressed SEG is much smaller (sizes recorded in conformance/).
    assert sizes[("FRACTIONAL", "jpegls")] < sizes[("FRACTIONAL", "none")] / 5
    assert sizes[("BINARY", "jpeg2000")] < sizes[("BINARY", "none")] / 2
    with pytest.raises(SegWriterError, match="BINARY"):
        build_segmentation(src, segments, segmentation_type="BINARY", compression="rle", **common)
    with pytest.raises(SegWriterError, match="stored source grid"):
        bad = analyse_image(src, f)
        bad[0].map.probability = np.zeros((10, 10), np.float32)
        build_segmentation(src, bad, **common)
    with pytest.raises(SegWriterError, match="at least one segment"):
        build_segmentation(src, [], **common)


def test_result_options_fractional_study(tmp_path):
    sources, findings, uids, datasets = built(segmentation_type="FRACTIONAL", compression="rle", cad_sr=False)
    seg = datasets[0]
    assert seg.SegmentationType == "FRACTIONAL" and seg.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    seg.save_as(tmp_path / "f.dcm", enforce_file_format=True)
    assert dciodvfy(tmp_path / "f.dcm").ok
    assert ResultOptions().segmentation_type == "BINARY"
