"""DICOM Segmentation (SEG) for one mammogram: one segment per (finding, model) map.

Built with highdicom from the source MG image. What this module adds for mammography:

* Projection X-ray has no Frame of Reference, so highdicom writes no plane position or
  orientation and one frame per segment. Patient Orientation (General Image, type 2C) is
  copied from the source; series Laterality is *not* set (dciodvfy rejects it in a SEG series
  whose images are not all of one side; the side is in the referenced MG image).
* BINARY segments are the thresholded maps after region filtering (``dicom_ai.regions``:
  threshold at the bundle's operating point, components under the minimum area removed,
  holes filled), so a BINARY segment is exactly the union of the regions the SR reports.
  FRACTIONAL segments carry the raw probability, quantised to 0..255 (PROBABILITY type).
* Empty segments are written: a model that ran and found nothing still has its segment, with
  an all-zero frame (``omit_empty_frames=False``). Segment numbers are therefore stable for a
  given set of models, the reader can tell "model ran, nothing found" from "model not run",
  and frame N is always segment N (which the SR references rely on).
* Segment order: by finding key in ``FINDING_KEYS`` order, then model name and version.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicom_ai.codes import BREAST, algorithm_family, display_rgb, finding_codes
from dicom_ai.findings import FINDING_KEYS, ProbabilityMap
from dicom_ai.regions import RegionSet

__all__ = ["Segment", "order_maps", "build_segmentation", "COMPRESSIONS", "transfer_syntax_for"]

#: Compression option -> transfer syntax. BINARY (1 bit) can only be JPEG 2000 in highdicom;
#: FRACTIONAL (8 bit) can be any of them.
COMPRESSIONS: dict[str, str] = {
    "none": ExplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
}


class SegWriterError(ValueError):
    """The inputs cannot make a valid SEG; the message says which input to fix."""


@dataclass
class Segment:
    """One segment to write: its number (1-based, = frame number), map, and regions."""

    number: int
    map: ProbabilityMap
    regions: RegionSet

    @property
    def label(self) -> str:
        """Segment Label (LO, at most 64 characters): finding label and model name."""
        return f"{finding_codes(self.map.finding).label} ({self.map.model.name})"[:64]


def order_maps(maps: list[ProbabilityMap]) -> list[ProbabilityMap]:
    """The maps in segment order (finding key order, then model name, then version)."""
    rank = {k: i for i, k in enumerate(FINDING_KEYS)}
    return sorted(maps, key=lambda m: (rank[m.finding], m.model.name, m.model.version))


def transfer_syntax_for(segmentation_type: str, compression: str) -> str:
    """Transfer syntax UID for a SEG of ``segmentation_type`` with ``compression``."""
    if compression not in COMPRESSIONS:
        raise SegWriterError(f"unknown SEG compression {compression!r}; use one of {sorted(COMPRESSIONS)}")
    ts = COMPRESSIONS[compression]
    if segmentation_type == "BINARY" and compression not in ("none", "jpeg2000"):
        raise SegWriterError(
            f"compression {compression!r} cannot encode a BINARY (1 bit) SEG; use 'jpeg2000' or 'none', "
            "or segmentation type FRACTIONAL")
    return ts


def _description(segment: Segment, occurrence: int) -> hd.seg.SegmentDescription:
    codes = finding_codes(segment.map.finding)
    model = segment.map.model
    algo = hd.AlgorithmIdentificationSequence(
        name=model.name, version=model.version, family=algorithm_family(model.family),
        parameters={"threshold": f"{segment.map.threshold:g}"})
    desc = hd.seg.SegmentDescription(
        segment_number=segment.number,
        segment_label=segment.label,
        segmented_property_category=codes.category,
        segmented_property_type=codes.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo,
        anatomic_regions=[BREAST],
        display_color=hd.color.CIELabColor.from_rgb(*display_rgb(segment.map.finding, occurrence)),
    )
    if codes.modifier is not None:
        item = desc.SegmentedPropertyTypeCodeSequence[0]
        item.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(codes.modifier)]
    return desc


def build_segmentation(
    source: pydicom.Dataset,
    segments: list[Segment],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    manufacturer: str,
    model_name: str,
    software_version: str,
    device_serial_number: str,
    series_description: str = "AI findings (SEG)",
    segmentation_type: str = "BINARY",
    compression: str = "none",
    content_datetime: tuple[str, str] | None = None,
) -> hd.seg.Segmentation:
    """A SEG of ``source`` with one frame per segment.

    ``segments`` must be numbered 1..n in order. ``content_datetime`` is ``(DA, TM)`` used
    for Series/Content Date and Time (the job's creation time, so a resend is identical).
    """
    if not segments:
        raise SegWriterError("a SEG needs at least one segment; no model produced a map for this image")
    if [s.number for s in segments] != list(range(1, len(segments) + 1)):
        raise SegWriterError("segments must be numbered 1..n in order")
    shape = (int(source.Rows), int(source.Columns))
    for s in segments:
        if s.map.probability.shape != shape:
            raise SegWriterError(
                f"map {s.map.finding} of model {s.map.model.name} has shape {s.map.probability.shape}, "
                f"but the source image is {shape} (Rows, Columns); maps must be on the stored source grid")
    segmentation_type = segmentation_type.upper()
    # highdicom reads a 3-D array as (frames, rows, columns) of segment labels; one source
    # frame with n segments must be (1, rows, columns, n).
    if segmentation_type == "BINARY":
        pixels = np.stack([s.regions.mask for s in segments], axis=-1)[None].astype(np.uint8)
    elif segmentation_type == "FRACTIONAL":
        pixels = np.stack([np.clip(s.map.probability, 0.0, 1.0) for s in segments], axis=-1)[None].astype(np.float32)
    else:
        raise SegWriterError(f"segmentation type must be BINARY or FRACTIONAL, got {segmentation_type!r}")
    occurrences: dict[str, int] = {}
    descriptions = []
    for s in segments:
        n = occurrences.get(s.map.finding, 0)
        occurrences[s.map.finding] = n + 1
        descriptions.append(_description(s, n))
    findings = ", ".join(dict.fromkeys(finding_codes(s.map.finding).label.lower() for s in segments))
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=pixels,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name,
        software_versions=software_version,
        device_serial_number=device_serial_number,
        max_fractional_value=255,
        content_label="AI_FINDINGS",
        content_description=f"AI {findings}"[:64],
        series_description=series_description,
        transfer_syntax_uid=transfer_syntax_for(segmentation_type, compression),
        omit_empty_frames=False,
    )
    # Projection X-ray: General Image Patient Orientation (2C) is required without a Frame of
    # Reference; highdicom 0.28 does not copy it.
    if "PatientOrientation" in source:
        seg.PatientOrientation = source.PatientOrientation
    else:
        seg.PatientOrientation = ""
    # highdicom 0.28 copies Pixel Spacing into a Pixel Measures item without Slice Thickness
    # when the source has Pixel Spacing, and its own reader then rejects the SEG. Without a
    # Frame of Reference the macro is not required (dciodvfy agrees), and the spacing is the
    # source image's anyway, so it is left out.
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "FrameOfReferenceUID" not in seg and "PixelMeasuresSequence" in shared:
        pm = shared.PixelMeasuresSequence[0]
        if "SliceThickness" not in pm:
            del shared.PixelMeasuresSequence
    if content_datetime is not None:
        seg.SeriesDate, seg.SeriesTime = content_datetime
        seg.ContentDate, seg.ContentTime = content_datetime
    return seg
