"""The values the result writers share: a segment to write and everything known of one image.

The SEG writer, the TID 1500 writer, the Mammography CAD SR writer and the preview all read
these; none of them imports another.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom

from dicom_ai.core.findings import FINDING_KEYS, ImageFindings, ProbabilityMap
from dicom_ai.results.codes import finding_codes
from dicom_ai.results.regions import RegionSet

__all__ = ["ObjectIdentity", "Segment", "ImageResult", "order_maps"]


@dataclass(frozen=True)
class ObjectIdentity:
    """Where one result object sits: its series and instance UIDs and numbers, its series text.

    The UIDs come from the job's :class:`~dicom_ai.core.uids.ResultUIDs`, so a rebuild of the
    same job gives the same identity.
    """

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    series_description: str
    instance_number: int = 1


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


@dataclass
class ImageResult:
    """Everything the writers need of one source image: the image, its findings, its analysed
    segments (regions found once, in SEG order) and, once written, its SEG (None when the image
    has no maps)."""

    source: pydicom.Dataset
    findings: ImageFindings
    segments: list[Segment]
    segmentation: pydicom.Dataset | None = None
