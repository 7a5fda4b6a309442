"""An attribute the models do not need never costs an image its results (issue 24, fault 4).

The result writers copy attributes from the sources (Patient and Study, the acquisition
equipment, Specimen) and read a few more (a presentation state's VOI window). A hostile or
damaged header, such as Manufacturer (0008,0070) sent with VR UL or a byte flipped near
(0028,1040), must cost that attribute, dropped with a note naming its keyword, and the image
keeps its SEG, presentation state, overlay and SR entries. The sources are read back from
bytes as the worker reads them from the spool, and only headers the admission checks accept
are tried.
"""

from __future__ import annotations

import io
import struct
import warnings

import pydicom
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.uid import generate_uid

from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.node.admission import Rejected, check_dataset
from dicom_ai.results import build_results
from mutations import _raw, part10
from node_harness import StandInPipeline, make_mg

#: Every writer on: SEG, presentation state, overlay SC, TID 1500 SR, Mammography CAD SR.
OPTIONS = ResultOptions(cad_sr=True, gsps=True, secondary_capture=True)
#: What the admission checks read (and the models need): refused there when wrong, not tried here.
ADMITTED = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns",
            "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
            "PixelRepresentation", "PixelData", "SpecificCharacterSet"}
SEG, GSPS, SC = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.7"


def _results(data: bytes, findings) -> tuple[list[str], list[str]]:
    """(SOP classes of the objects built, notes) for the one-image study in ``data``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = pydicom.dcmread(io.BytesIO(data))
        results = build_results([source], findings, ResultUIDs.generate([str(source.SOPInstanceUID)]), OPTIONS)
        for ds in results.datasets:  # what the worker does next: every object must encode
            ds.save_as(io.BytesIO(), enforce_file_format=True)
    return [str(ds.SOPClassUID) for ds in results.datasets], results.notes


def _complete(classes: list[str], notes: list[str]) -> bool:
    return classes[:3] == [SEG, GSPS, SC] and len(classes) == 5 and not any("left out" in n and "image" in n
                                                                              and "results:" in n for n in notes) \
        and not any("left out:" in n for n in notes)


@pytest.fixture(scope="module")
def image():
    ds = make_mg("L", "CC", generate_uid(), generate_uid(), 1)
    return ds, StandInPipeline().run([ds])


@pytest.mark.parametrize("value", [bytes(range(1, 9)), b"\x01\x02\x03\x04"])
def test_manufacturer_sent_as_ul_is_dropped_with_a_note_and_the_image_keeps_its_results(image, value):
    ds, findings = image
    classes, notes = _results(_raw(ds, 0x00080070, "UL", value), findings)
    assert _complete(classes, notes), (classes, notes)
    assert any(n.startswith("Manufacturer is not valid for its VR in 1 image(s)") for n in notes), notes
    assert not any(str(int.from_bytes(value[:4], "little")) in n for n in notes)  # the keyword, never the value


def test_any_root_attribute_with_a_wrong_vr_costs_only_that_attribute(image):
    """The class: every public root attribute the admission checks do not read, sent as UL."""
    ds, findings = image
    tried = []
    for elem in ds:
        keyword = keyword_for_tag(elem.tag)
        if keyword in ADMITTED or elem.tag.is_private:
            continue
        classes, notes = _results(_raw(ds, int(elem.tag), "UL", bytes(range(1, 9))), findings)
        assert _complete(classes, notes), (keyword, classes, notes)
        assert any(n.startswith(f"{keyword} is not valid for its VR") for n in notes), (keyword, notes)
        tried.append(keyword)
    assert {"Manufacturer", "WindowCenter", "PixelIntensityRelationship", "PatientBirthDate",
            "ViewCodeSequence", "PixelSpacing"} <= set(tried)


def test_every_admitted_byte_flip_near_pixel_intensity_relationship_keeps_the_results(image, tmp_path):
    """Each byte from 16 before to 40 after the (0028,1040) element header flipped (one bit, all
    bits): what the admission checks accept gets its full results."""
    ds, findings = image
    data = part10(ds)
    at = data.find(struct.pack("<HH", 0x0028, 0x1040))
    path = tmp_path / "flipped.dcm"
    accepted = 0
    for offset in range(-16, 40):
        for flip in (0x10, 0xFF):
            damaged = bytearray(data)
            damaged[at + offset] ^= flip
            path.write_bytes(damaged)
            try:
                check_dataset(path, ds.SOPClassUID, ds.SOPInstanceUID, pydicom.uid.ExplicitVRLittleEndian)
            except Rejected:
                continue
            accepted += 1
            classes, notes = _results(bytes(damaged), findings)
            assert _complete(classes, notes), (offset, hex(flip), classes, notes)
    assert accepted >= 40  # the sweep reached the values, not only refusals
