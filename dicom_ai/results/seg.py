"""DICOM Segmentation (SEG) for one mammogram: one segment per (finding, model) map.

Built with highdicom from the source MG image. What this module adds for mammography:

* Projection X-ray has no Frame of Reference, so highdicom writes no plane position or
  orientation and one frame per segment. Patient Orientation (General Image, type 2C) is
  copied from the source; series Laterality is *not* set (dciodvfy rejects it in a SEG series
  whose images are not all of one side; the side is in the referenced MG image).
* BINARY segments are the thresholded maps after region filtering (:mod:`dicom_ai.results.regions`:
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

import highdicom as hd
import numpy as np
import pydicom

from dicom_ai.core.errors import SegWriterError
from dicom_ai.core.options import COMPRESSIONS, Equipment, encoding_problem
from dicom_ai.results.codes import BREAST, algorithm_family, display_rgb, finding_codes
from dicom_ai.results.types import ObjectIdentity, Segment

__all__ = ["build_segmentation", "transfer_syntax_for"]


def transfer_syntax_for(segmentation_type: str, compression: str) -> str:
    """Transfer syntax UID for a SEG of ``segmentation_type`` with ``compression``."""
    problem = encoding_problem(segmentation_type, compression)
    if problem is not None:
        raise SegWriterError(problem)
    return COMPRESSIONS[compression]


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
    identity: ObjectIdentity,
    equipment: Equipment,
    *,
    segmentation_type: str = "BINARY",
    compression: str = "none",
) -> hd.seg.Segmentation:
    """A SEG of ``source`` with one frame per segment.

    Parameters
    ----------
    source
        The MG image the segments were found on; every map is on its stored pixel grid
        ``(Rows, Columns)``.
    segments
        The segments, numbered 1..n in order (frame N holds segment N).
    identity
        Series and instance of the SEG (Series Description at most 64 characters).
    equipment
        The device written into the General Equipment module.
    segmentation_type
        ``BINARY`` (the thresholded, region-filtered masks) or ``FRACTIONAL`` (probability
        quantised to 0..255).
    compression
        A key of :data:`~dicom_ai.core.options.COMPRESSIONS`.

    Dates and times are left to the caller (:func:`dicom_ai.results.build.build_results` pins
    them to the job's creation time, so a resend is identical).
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
    if segmentation_type not in ("BINARY", "FRACTIONAL"):
        raise SegWriterError(f"segmentation type must be BINARY or FRACTIONAL, got {segmentation_type!r}")
    # highdicom wants (1, rows, columns, segments); the array is laid out segment by segment
    # in memory ((segments, rows, columns) transposed), so each segment's frame is contiguous:
    # stacking writes whole planes, and highdicom's checks (its sum over the segment axis) and
    # its per-segment frames read planes instead of every n-th byte. Same values, same object.
    if segmentation_type == "BINARY":
        # Each segment's regions painted straight into its plane (no full-size mask per segment).
        planes = np.zeros((len(segments), *shape), dtype=np.uint8)
        for plane, s in zip(planes, segments):
            s.regions.paint(plane)
    else:
        planes = np.stack([np.clip(s.map.probability, 0.0, 1.0) for s in segments], axis=0, dtype=np.float32)
    pixels = planes.transpose(1, 2, 0)[None]
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
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
        max_fractional_value=255,
        content_label="AI_FINDINGS",
        content_description=f"AI {findings}"[:64],
        series_description=identity.series_description,
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
    return seg
