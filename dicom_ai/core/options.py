"""What the result objects look like: the equipment that writes them and the encoding options.

:class:`ResultOptions` is the contract between the node's ``[results]`` configuration and
the result writers (:mod:`dicom_ai.results`); it lives here, free of highdicom, so the
configuration can be checked in the receiving process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

import dicom_ai

__all__ = ["Equipment", "ResultOptions", "SEGMENTATION_TYPES", "COMPRESSIONS", "RESULT_OBJECTS", "encoding_problem",
           "result_object_kind"]

#: SEG Segmentation Type values the node writes.
SEGMENTATION_TYPES: tuple[str, ...] = ("BINARY", "FRACTIONAL")

#: Compression option -> transfer syntax. BINARY (1 bit) can only be JPEG 2000 in highdicom;
#: FRACTIONAL (8 bit) can be any of them.
COMPRESSIONS: dict[str, str] = {
    "none": ExplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
}


#: The kinds of result object a destination can be given (``objects`` of ``[[destinations]]``
#: and ``[[peers]]``) -> their SOP Class UIDs: Segmentation; the TID 1500 Measurement Report
#: (Comprehensive 3D SR, or Enhanced/Comprehensive SR for other writers); Mammography CAD SR;
#: Grayscale Softcopy Presentation State; Secondary Capture.
RESULT_OBJECTS: dict[str, tuple[str, ...]] = {
    "SEG": ("1.2.840.10008.5.1.4.1.1.66.4",),
    "SR": ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33"),
    "CAD_SR": ("1.2.840.10008.5.1.4.1.1.88.50",),
    "GSPS": ("1.2.840.10008.5.1.4.1.1.11.1",),
    "SC": ("1.2.840.10008.5.1.4.1.1.7",),
}


def result_object_kind(sop_class_uid: str) -> str | None:
    """The :data:`RESULT_OBJECTS` kind of a SOP Class UID; None for any other class."""
    for kind, classes in RESULT_OBJECTS.items():
        if str(sop_class_uid) in classes:
            return kind
    return None


def encoding_problem(segmentation_type: str, compression: str) -> str | None:
    """Why a SEG of ``segmentation_type`` cannot be written with ``compression``; None if it can.

    Callers raise their own error with this text (the configuration names its key, the SEG
    writer its input).
    """
    if segmentation_type not in SEGMENTATION_TYPES:
        return f"segmentation type must be BINARY or FRACTIONAL, got {segmentation_type!r}"
    if compression not in COMPRESSIONS:
        return f"unknown SEG compression {compression!r}; use one of {sorted(COMPRESSIONS)}"
    if segmentation_type == "BINARY" and compression not in ("none", "jpeg2000"):
        return (f"compression {compression!r} cannot encode a BINARY (1 bit) SEG; use 'jpeg2000' or 'none', "
                "or segmentation type FRACTIONAL")
    return None


@dataclass(frozen=True)
class Equipment:
    """The device that writes the result objects (General Equipment module of SEG and SR).

    Every writer takes one; the SR's Device Observer UID derives from it.
    """

    manufacturer: str = "dicom_ai"
    model_name: str = "dicom_ai node"
    software_version: str = dicom_ai.__version__
    device_serial_number: str = "1"

    @property
    def device_uid(self) -> str:
        """Device Observer UID: stable for one node installation (manufacturer, model, serial)."""
        return generate_uid(entropy_srcs=["device", self.manufacturer, self.model_name, self.device_serial_number])


@dataclass(frozen=True)
class ResultOptions:
    """What the result objects look like; the node's configuration fills it.

    ``segmentation_type`` BINARY (at each map's bundle threshold) or FRACTIONAL (the
    probability, 0..255). ``compression``: ``none`` (Explicit VR Little Endian), ``jpeg2000``
    (lossless, BINARY or FRACTIONAL), ``rle`` or ``jpegls`` (FRACTIONAL only).
    ``min_area_mm2`` overrides :data:`dicom_ai.results.regions.DEFAULT_MIN_AREA_MM2` per finding key.
    ``gsps``: a Grayscale Softcopy Presentation State per image with findings (outlines and
    labels as graphic annotations); ``secondary_capture``: an "AI overlay" Secondary Capture
    per such image (outlines burned in, not for diagnosis).
    """

    segmentation_type: str = "BINARY"
    compression: str = "none"
    cad_sr: bool = False
    gsps: bool = True
    secondary_capture: bool = False
    equipment: Equipment = field(default_factory=Equipment)
    seg_series_number: int = 9001
    sr_series_number: int = 9002
    cad_series_number: int = 9003
    gsps_series_number: int = 9004
    sc_series_number: int = 9005
    seg_series_description: str = "AI findings (SEG)"
    sr_series_description: str = "AI findings (SR)"
    cad_series_description: str = "AI CAD marks (Mammography CAD SR)"
    gsps_series_description: str = "AI findings (presentation state)"
    sc_series_description: str = "AI overlay - not for diagnosis"
    min_area_mm2: dict[str, float] = field(default_factory=dict)
    max_regions_per_segment: int = 20
    max_contour_points: int = 128
