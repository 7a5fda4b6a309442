"""What the result writers may copy from a source image: a cleaned copy of each source.

highdicom's SEG and SR constructors copy every root-level attribute of the source's Patient
and Study information entities (the Patient, Clinical Trial Subject, General Study, Patient
Study and Clinical Trial Study modules, ``SOPClass.copy_patient_and_study_information``),
and pydicom refuses to write a value its VR does not allow (``19470323XX`` as a DA, a 70
character LO, a PN component over 64 characters, a DA sent with VR US). None of these
attributes is needed by the models, so none may fail a job: :func:`clean_sources` returns a
copy of each source in which every such attribute that is not valid for its VR is emptied
(type 2, the attribute stays) or left out (type 1 and 3), with a note that names the
attribute's keyword, never its value.

A study's results must agree on the patient, so the cleaned sources also carry the same
Patient and Study attributes: those of the first source; a note names the attributes that
differed between the images.

The writers also copy Specific Character Set, and highdicom refuses one it does not know or
one that breaks PS3.5 6.1.2.5 (``ISO 2022 IR 87`` alone, an unknown term). When a source's
character set is unusable, or the sources of a study differ in it, the copied text values are
read under the source's own character set (as pydicom decodes it, replacing what it cannot)
and every result is written in UTF-8 (``ISO_IR 192``), which holds any of them.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Sequence

import pydicom
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
from highdicom.valuerep import _check_specific_character_set
from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

__all__ = ["copied_attributes", "clean_sources", "invalid_attributes", "load_standard_tables", "unwritable_attributes"]

#: The information entities whose root attributes highdicom copies into every SEG and SR.
COPIED_ENTITIES = ("Patient", "Study")

# Needed to place the results (and checked when the image was received): never altered here.
_NEEDED = frozenset({"StudyInstanceUID"})

# Patient and General Study attributes (all type 2) that highdicom's SEG and SR constructors
# read from the source without a default.
_READ_BY_WRITERS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime")

# Outside the Patient and Study modules, what highdicom's image-based constructors (SEG) copy
# from the source: checked the same way, removed when invalid (then "00", not lossy, is written);
# and the source's acquisition equipment, which the SEG and SC constructors copy into a
# Contributing Equipment Sequence item (highdicom's ContributingEquipment.for_image_acquisition,
# skipped by highdicom when Manufacturer is absent).
_ALSO_COPIED = ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
                "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber", "InstitutionName",
                "InstitutionalDepartmentName", "InstitutionAddress", "StationName", "AcquisitionDateTime",
                "AcquisitionDate", "AcquisitionTime")

# Checked when the image was received and read by the models: never altered here.
_ADMITTED = frozenset({"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns",
                       "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                       "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames", "PixelData",
                       "SpecificCharacterSet"})

# Values that are not text and that pydicom's validators do not check.
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT"})
_NUMBER_VRS = frozenset({"US", "UL", "UV", "SS", "SL", "SV", "FL", "FD"})


@functools.lru_cache(maxsize=None)
def load_standard_tables() -> None:
    """Read highdicom's SOP class, IOD and module tables now (cached for the process).

    highdicom reads them on first use, about 1 s of JSON decoding on this kind of machine:
    the worker calls this when it starts, so its first job does not wait for them.
    """
    get_sop_class_iod_map()
    get_iod_module_map()
    get_module_attribute_map()


def copied_attributes(sop_class_uid: str) -> dict[str, str]:
    """Keyword -> type (``1``, ``1C``, ``2``, ``2C``, ``3``) of every attribute the writers copy
    from a source of this SOP class (the Patient and Study modules of its IOD).

    Parameters
    ----------
    sop_class_uid : str
        The source's SOP Class UID; an unknown class (no IOD in highdicom's tables) gives the
        attributes of the Digital Mammography X-Ray Image IOD.
    """
    iod = get_sop_class_iod_map().get(str(sop_class_uid), "digital-mammography-x-ray-image")
    attributes = get_module_attribute_map()
    out: dict[str, str] = {}
    for module in get_iod_module_map()[iod]:
        if module["ie"] in COPIED_ENTITIES:
            for item in attributes[module["key"]]:
                if not item["path"]:
                    out.setdefault(str(item["keyword"]), str(item["type"]))
    return out


def _vr_allowed(elem: DataElement) -> bool:
    """Whether ``elem``'s VR is one its tag allows (any VR for a tag the dictionary lacks)."""
    try:
        return elem.VR in dictionary_VR(elem.tag).split(" or ")
    except KeyError:
        return True


def _valid(elem: DataElement) -> bool:
    """Whether ``elem`` has its dictionary VR and a value that VR allows (recursively for SQ)."""
    if not _vr_allowed(elem):
        return False
    value = elem.value
    if elem.VR == "SQ":
        return all(_valid(inner) for item in value for inner in item)
    if elem.VR in _BINARY_VRS or value is None:
        return True
    for v in value if isinstance(value, (MultiValue, list, tuple)) else [value]:
        if v is None or v == "":
            continue
        # Text VRs are checked on the text that would be written (PersonName, DA, DSfloat
        # and IS objects print it); binary numbers as the numbers they are.
        validate_value(elem.VR, v if elem.VR in _NUMBER_VRS else str(v), config.RAISE)
    return True


@functools.lru_cache(maxsize=None)
def _specimen_attributes() -> tuple[str, ...]:
    """Root attributes of the Specimen module, which highdicom's SEG constructor copies."""
    return tuple(str(item["keyword"]) for item in get_module_attribute_map()["specimen"] if not item["path"])


def invalid_attributes(ds: pydicom.Dataset) -> list[str]:
    """Keywords of the attributes in ``ds`` the writers copy whose value or VR is not valid.

    An attribute whose value cannot even be read (a raw value pydicom cannot convert) is
    invalid too.
    """
    bad = []
    for keyword in [*copied_attributes(str(ds.get("SOPClassUID", ""))), *_ALSO_COPIED, *_specimen_attributes()]:
        if keyword in _NEEDED or keyword not in ds:
            continue
        # The checks quote the value in their messages; the note names the keyword instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ok = _valid(ds[keyword])
            except Exception:
                ok = False
        if not ok:
            bad.append(keyword)
    return bad


#: Attributes the presentation state and overlay writers read together (Modality LUT, VOI LUT).
_TOGETHER = (("RescaleIntercept", "RescaleSlope", "RescaleType"),
             ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction"))


def _writable(elem: DataElement) -> bool:
    """Whether ``elem`` has a VR its tag allows (recursively for SQ) and pydicom can encode its value."""
    if not _vr_allowed(elem):
        return False
    if elem.VR == "SQ":
        return all(_writable(inner) for item in elem.value for inner in item)
    if elem.VR in ("DS", "IS"):  # the writers compute with them (a VOI window): each must be a number
        values = elem.value if isinstance(elem.value, (MultiValue, list, tuple)) else [elem.value]
        if not all(v is None or v == "" or math.isfinite(float(v)) for v in values):
            return False
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    return True


def unwritable_attributes(ds: pydicom.Dataset, skip: Sequence[str] = ()) -> list[str]:
    """Keywords (or ``(gggg,eeee)`` tags) of the other public root attributes of ``ds`` that the
    writers could trip on: a VR the tag does not allow, a value that cannot be read or encoded.

    Neither copied wholesale nor needed by the models, they are still read by the writers
    here and there (a presentation state's VOI, an overlay's labels), and a Manufacturer sent
    as UL or a header byte flipped into a neighbour tag must cost that attribute, not the
    image's results. The attributes checked at admission, private ones and ``skip`` are left
    alone.
    """
    bad = []
    for tag in list(ds.keys()):
        if tag.is_private or tag.group == 0x0002:
            continue
        keyword = keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"
        if keyword in _ADMITTED or keyword in skip:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's messages quote the value
            try:
                ok = _writable(ds[tag])
            except Exception:
                ok = False
        if not ok:
            bad.append(keyword)
    return bad


def _empty(keyword: str) -> DataElement:
    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag).split(" or ")[0]
    return DataElement(tag, vr, [] if vr == "SQ" else None)


def _same(a: pydicom.Dataset, b: pydicom.Dataset, keyword: str) -> bool:
    if (keyword in a) != (keyword in b):
        return False
    if keyword not in a:
        return True
    try:
        return a[keyword].VR == b[keyword].VR and a[keyword].value == b[keyword].value
    except Exception:
        return False


#: What the results are written in when the sources' character sets cannot be copied.
UTF8 = "ISO_IR 192"


def _usable_charset(value) -> bool:
    """Whether highdicom's writers accept ``value`` as Specific Character Set (None: default)."""
    if value is None:
        return True
    try:
        _check_specific_character_set(value if isinstance(value, str) else list(value))
    except (ValueError, TypeError):
        return False
    return True


def _to_utf8(cleaned: list[pydicom.Dataset]) -> str | None:
    """Re-encode the copied text of every source in UTF-8 when the character sets cannot be
    copied as they are; returns the note, or None when nothing was changed."""
    charsets = [ds.get("SpecificCharacterSet") for ds in cleaned]
    unusable = [str(ds.SOPInstanceUID) for ds, cs in zip(cleaned, charsets) if not _usable_charset(cs)]
    distinct = {tuple(cs) if isinstance(cs, (list, MultiValue)) else cs for cs in charsets}
    if not unusable and len(distinct) <= 1:
        return None
    for ds in cleaned:
        types = copied_attributes(str(ds.get("SOPClassUID", "")))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the decoder's warnings quote the bytes
            for keyword in types:
                if keyword in ds:
                    try:
                        ds[keyword]  # converts the raw value under the source's own character set
                    except Exception:
                        del ds[keyword]  # not even readable: invalid_attributes would drop it too
        ds.SpecificCharacterSet = UTF8
    if unusable:
        return (f"Specific Character Set of {len(unusable)} image(s) ({', '.join(unusable)}) cannot be written "
                f"as it is; the results are in UTF-8 ({UTF8})")
    return f"the images differ in Specific Character Set; the results are in UTF-8 ({UTF8})"


def clean_sources(sources: Sequence[pydicom.Dataset]) -> tuple[list[pydicom.Dataset], list[str]]:
    """Copies of ``sources`` that the writers can copy from, and notes on what was changed.

    Parameters
    ----------
    sources : sequence of pydicom.Dataset
        The study's images (one study) as read; not changed.

    Returns
    -------
    cleaned : list of pydicom.Dataset
        One copy per source, in order: every attribute of :func:`copied_attributes` that is
        not valid for its VR is emptied (type 2 and 2C) or removed (others), and every copy
        carries the Patient and Study attributes of the first source, in UTF-8 when the
        sources' character sets cannot be copied as they are.
    notes : list of str
        One per changed attribute and one if the images disagreed; keywords and SOP
        Instance UIDs only, never a value.
    """
    cleaned = [copy.deepcopy(ds) for ds in sources]
    notes = []
    charset_note = _to_utf8(cleaned)
    if charset_note:
        notes.append(charset_note)
    changed: dict[str, list[str]] = {}
    partners: dict[str, list[str]] = {}
    for ds in cleaned:
        types = copied_attributes(str(ds.get("SOPClassUID", "")))
        invalid = invalid_attributes(ds)
        for keyword in invalid:
            if types.get(keyword, "3").startswith("2"):
                ds[keyword] = _empty(keyword)
            else:
                del ds[keyword]
            changed.setdefault(keyword, []).append(str(ds.SOPInstanceUID))
        dropped = unwritable_attributes(ds, skip=invalid)
        for keyword in dropped:
            del ds[tag_for_keyword(keyword) or Tag(int(keyword[1:5], 16), int(keyword[6:10], 16))]
            changed.setdefault(keyword, []).append(str(ds.SOPInstanceUID))
        # A modality rescale or a VOI window is only usable whole: half of one goes with the other.
        for group in _TOGETHER:
            if any(k in dropped or k in invalid for k in group):
                for keyword in group:
                    if keyword in ds:
                        del ds[keyword]
                        partners.setdefault(keyword, []).append(str(ds.SOPInstanceUID))
    for keyword, uids in changed.items():
        how = "sent empty" if copied_attributes(str(cleaned[0].get("SOPClassUID", ""))).get(keyword, "3").startswith("2") \
            else "left out"
        notes.append(f"{keyword} is not valid for its VR in {len(uids)} image(s) ({', '.join(uids)}); "
                     f"{how} in the results")
    for keyword, uids in partners.items():
        notes.append(f"{keyword} left out in the results of {len(uids)} image(s) ({', '.join(uids)}) with the "
                     "invalid attribute it is used together with")
    if cleaned:
        first = cleaned[0]
        differ = []
        for keyword in copied_attributes(str(first.get("SOPClassUID", ""))):
            if keyword in _NEEDED:
                continue
            for ds in cleaned[1:]:
                if not _same(first, ds, keyword):
                    if keyword in first:
                        ds[keyword] = copy.deepcopy(first[keyword])
                    else:
                        del ds[keyword]
                    if keyword not in differ:
                        differ.append(keyword)
        if differ:
            notes.append(f"the images disagree on {', '.join(differ)}; every result carries the values of "
                         f"image {first.SOPInstanceUID}")
        # highdicom's SEG and SR constructors read these (type 2) attributes from the source
        # unconditionally; a modality, or the consistency step above, may lack them.
        absent = [k for k in _READ_BY_WRITERS if k not in first]
        for ds in cleaned:
            for keyword in absent:
                ds[keyword] = _empty(keyword)
        if absent:
            notes.append(f"{', '.join(absent)} absent from the source; sent empty (type 2)")
    return cleaned, notes
