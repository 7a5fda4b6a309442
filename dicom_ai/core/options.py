"""What the result objects look like: the equipment that writes them and the encoding options.

:class:`ResultOptions` is the contract between the node's ``[results]`` configuration and
the result writers (:mod:`dicom_ai.results`); it lives here, free of highdicom, so the
configuration can be checked in the receiving process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

import dicom_ai

__all__ = ["Equipment", "ResultOptions", "SEGMENTATION_TYPES", "COMPRESSIONS", "encoding_problem"]

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
    """

    segmentation_type: str = "BINARY"
    compression: str = "none"
    cad_sr: bool = False
    equipment: Equipment = field(default_factory=Equipment)
    seg_series_number: int = 9001
    sr_series_number: int = 9002
    cad_series_number: int = 9003
    seg_series_description: str = "AI findings (SEG)"
    sr_series_description: str = "AI findings (SR)"
    cad_series_description: str = "AI CAD marks (Mammography CAD SR)"
    min_area_mm2: dict[str, float] = field(default_factory=dict)
    max_regions_per_segment: int = 20
    max_contour_points: int = 128
