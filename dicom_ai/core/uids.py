"""The UIDs and creation time of one job's result objects, fixed when the job is created.

The receiving node creates them (it must not import the result writers, which load highdicom),
the job store keeps them as JSON, and the worker hands them to the writers, so a job run again
after a crash writes the same objects under the same UIDs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from pydicom.uid import generate_uid

from dicom_ai.core.errors import ResultError

__all__ = ["ResultUIDs"]


@dataclass
class ResultUIDs:
    """UIDs (and the creation time) of one job's result objects, fixed when the job is created.

    ``seg_instances`` maps source SOP Instance UID -> SEG SOP Instance UID. A source missing
    from it (an image that arrived after the job was created) gets a UID derived from
    ``seg_series`` and its own UID, so it is stable too. Each SEG is in a series of its own
    (OHIF 3.13 shows only the newest instance of a SEG series): :meth:`seg_series_for` derives
    that series' UID from ``seg_series`` and the source image. ``created`` is ``YYYYMMDDHHMMSS``
    (UTC) and is written as Series/Content Date and Time of every result object.

    The presentation states (GSPS) and the "AI overlay" Secondary Captures, one of each per image
    and each in a series of its own, are not stored: their UIDs derive from
    ``sr_series`` (random per job, stored) and the source image, so a rerun writes the same
    UIDs and a job stored before they existed reads back unchanged (:meth:`from_json`).
    """

    seg_series: str
    seg_instances: dict[str, str]
    sr_series: str
    sr_instance: str
    cad_series: str
    cad_instance: str
    created: str

    @classmethod
    def generate(cls, source_sop_uids: Sequence[str], created: datetime | None = None) -> "ResultUIDs":
        """Fresh UIDs for a job over ``source_sop_uids``."""
        when = (created or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
        return cls(seg_series=generate_uid(), seg_instances={str(u): generate_uid() for u in source_sop_uids},
                   sr_series=generate_uid(), sr_instance=generate_uid(), cad_series=generate_uid(),
                   cad_instance=generate_uid(), created=when)

    def seg_instance(self, source_sop_uid: str) -> str:
        """SEG SOP Instance UID for a source image."""
        uid = self.seg_instances.get(str(source_sop_uid))
        return uid or generate_uid(entropy_srcs=[self.seg_series, str(source_sop_uid)])

    def seg_series_for(self, source_sop_uid: str) -> str:
        """Series Instance UID of the SEG of one source image."""
        return generate_uid(entropy_srcs=[self.seg_series, "series", str(source_sop_uid)])

    def gsps_series_for(self, source_sop_uid: str) -> str:
        """Series Instance UID of the presentation state of one source image (a series per
        image, like the SEGs: its Laterality is the image's)."""
        return generate_uid(entropy_srcs=[self.sr_series, "gsps series", str(source_sop_uid)])

    def gsps_instance(self, source_sop_uid: str) -> str:
        """SOP Instance UID of the presentation state of one source image."""
        return generate_uid(entropy_srcs=[self.sr_series, "gsps", str(source_sop_uid)])

    def sc_series_for(self, source_sop_uid: str) -> str:
        """Series Instance UID of the "AI overlay" Secondary Capture of one source image (a
        series per image: its Laterality is the image's)."""
        return generate_uid(entropy_srcs=[self.sr_series, "sc series", str(source_sop_uid)])

    def sc_instance(self, source_sop_uid: str) -> str:
        """SOP Instance UID of the "AI overlay" Secondary Capture of one source image."""
        return generate_uid(entropy_srcs=[self.sr_series, "sc", str(source_sop_uid)])

    @property
    def content_datetime(self) -> tuple[str, str]:
        """``(DA, TM)`` of ``created``."""
        return self.created[:8], self.created[8:14]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ResultUIDs":
        data = json.loads(text)
        try:
            return cls(**data)
        except TypeError as exc:
            raise ResultError(f"stored result UIDs are not in the expected form: {exc}") from exc
