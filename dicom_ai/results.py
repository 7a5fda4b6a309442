"""From model findings to the DICOM objects the node sends back: SEG per image, SR per study.

The interface the node uses::

    from dicom_ai.results import ResultUIDs, ResultOptions, build_results, write_previews
    uids = ResultUIDs.generate(source_sop_uids)        # at job creation; store uids.to_json()
    datasets = build_results(sources, findings, uids, options=ResultOptions())
    write_previews(sources, findings, out_dir)         # PNG per image for IT quality checks

Idempotency: every UID and every date/time written comes from ``ResultUIDs`` (the tracking
UIDs inside the SR derive from the SR's SOP Instance UID), so the same inputs with the same
``ResultUIDs`` give the same UIDs, and a resend after a restart replaces rather than duplicates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

import dicom_ai
from dicom_ai.findings import ImageFindings
from dicom_ai.regions import DEFAULT_MIN_AREA_MM2, area_spacing, find_regions
from dicom_ai.seg_writer import Segment, build_segmentation, order_maps
from dicom_ai.sr_writer import ImageResult, build_measurement_report

__all__ = ["ResultUIDs", "ResultOptions", "ResultError", "analyse_image", "build_results", "write_previews"]


class ResultError(ValueError):
    """Findings and sources do not fit together; the message names the instance."""


@dataclass
class ResultUIDs:
    """UIDs (and the creation time) of one job's result objects, fixed when the job is created.

    ``seg_instances`` maps source SOP Instance UID -> SEG SOP Instance UID. A source missing
    from it (an image that arrived after the job was created) gets a UID derived from
    ``seg_series`` and its own UID, so it is stable too. Each SEG is in a series of its own
    (OHIF 3.13 shows only the newest instance of a SEG series): :meth:`seg_series_for` derives
    that series' UID from ``seg_series`` and the source image. ``created`` is ``YYYYMMDDHHMMSS``
    (UTC) and is written as Series/Content Date and Time of every result object.
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


@dataclass(frozen=True)
class ResultOptions:
    """What the result objects look like; the node's configuration fills it.

    ``segmentation_type`` BINARY (at each map's bundle threshold) or FRACTIONAL (the
    probability, 0..255). ``compression``: ``none`` (Explicit VR Little Endian), ``jpeg2000``
    (lossless, BINARY or FRACTIONAL), ``rle`` or ``jpegls`` (FRACTIONAL only).
    ``min_area_mm2`` overrides :data:`dicom_ai.regions.DEFAULT_MIN_AREA_MM2` per finding key.
    """

    segmentation_type: str = "BINARY"
    compression: str = "none"
    cad_sr: bool = False
    manufacturer: str = "dicom_ai"
    model_name: str = "dicom_ai node"
    software_version: str = dicom_ai.__version__
    device_serial_number: str = "1"
    seg_series_number: int = 9001
    sr_series_number: int = 9002
    cad_series_number: int = 9003
    seg_series_description: str = "AI findings (SEG)"
    sr_series_description: str = "AI findings (SR)"
    cad_series_description: str = "AI CAD marks (Mammography CAD SR)"
    min_area_mm2: dict[str, float] = field(default_factory=dict)
    max_regions_per_segment: int = 20
    max_contour_points: int = 128

    @property
    def device_uid(self) -> str:
        """Device Observer UID: stable for one node installation (manufacturer, model, serial)."""
        return generate_uid(entropy_srcs=["device", self.manufacturer, self.model_name, self.device_serial_number])


def analyse_image(source: pydicom.Dataset, findings: ImageFindings, options: ResultOptions = ResultOptions()) -> list[Segment]:
    """Segments (numbered, with their regions) of one image, in SEG order."""
    spacing = area_spacing(source)
    shape = (int(source.Rows), int(source.Columns))
    segments = []
    for number, m in enumerate(order_maps(list(findings.maps)), start=1):
        if m.probability.shape != shape:
            raise ResultError(
                f"map {m.finding} of model {m.model.name} has shape {m.probability.shape} but image "
                f"{findings.sop_instance_uid} is {shape}; maps must be on the stored source grid")
        min_area = options.min_area_mm2.get(m.finding, DEFAULT_MIN_AREA_MM2[m.finding])
        regions = find_regions(m.probability, m.threshold, spacing, min_area,
                               max_points=options.max_contour_points)
        segments.append(Segment(number, m, regions))
    return segments


def _pair(sources: Sequence[pydicom.Dataset], findings: Sequence[ImageFindings]) -> list[tuple[pydicom.Dataset, ImageFindings]]:
    by_uid = {}
    for f in findings:
        if f.sop_instance_uid in by_uid:
            raise ResultError(f"two findings objects for image {f.sop_instance_uid}")
        by_uid[f.sop_instance_uid] = f
    uids = {str(ds.SOPInstanceUID) for ds in sources}
    unknown = sorted(set(by_uid) - uids)
    if unknown:
        raise ResultError(f"findings for image(s) not among the sources: {unknown}")
    if len({str(ds.StudyInstanceUID) for ds in sources}) > 1:
        raise ResultError("sources belong to more than one study; build results per study")
    return [(ds, by_uid.get(str(ds.SOPInstanceUID), ImageFindings(str(ds.SOPInstanceUID)))) for ds in sources]


def build_results(
    sources: Sequence[pydicom.Dataset],
    findings: Sequence[ImageFindings],
    uids: ResultUIDs,
    options: ResultOptions = ResultOptions(),
) -> list[pydicom.Dataset]:
    """SEG per source image that has maps, then the TID 1500 SR, then the CAD SR if enabled.

    ``sources`` are the study's MG images (one study); ``findings`` hold one entry per image
    that was analysed (matched by SOP Instance UID). An image without maps gets no SEG (a SEG
    needs at least one segment) but is still evidence in the SR.
    """
    if not sources:
        raise ResultError("no source images")
    pairs = _pair(sources, findings)
    when = uids.content_datetime
    common = dict(manufacturer=options.manufacturer, model_name=options.model_name,
                  software_version=options.software_version, device_serial_number=options.device_serial_number,
                  content_datetime=when)
    out: list[pydicom.Dataset] = []
    image_results = []
    for ds, f in pairs:
        segments = analyse_image(ds, f, options)
        seg = None
        if segments:
            view = " ".join(str(ds.get(k, "")) for k in ("ImageLaterality", "ViewPosition")).strip()
            seg = build_segmentation(
                ds, segments, series_instance_uid=uids.seg_series_for(str(ds.SOPInstanceUID)),
                sop_instance_uid=uids.seg_instance(str(ds.SOPInstanceUID)), series_number=options.seg_series_number,
                instance_number=1, series_description=f"{options.seg_series_description} {view}".strip()[:64],
                segmentation_type=options.segmentation_type, compression=options.compression, **common)
            out.append(seg)
        image_results.append(ImageResult(ds, f, segments, seg))
    sr = build_measurement_report(
        image_results, series_instance_uid=uids.sr_series, sop_instance_uid=uids.sr_instance,
        series_number=options.sr_series_number, instance_number=1, device_uid=options.device_uid,
        series_description=options.sr_series_description,
        max_regions_per_segment=options.max_regions_per_segment, **common)
    out.append(sr)
    if options.cad_sr:
        from dicom_ai.cad_sr import build_mammography_cad_sr

        out.append(build_mammography_cad_sr(
            image_results, series_instance_uid=uids.cad_series, sop_instance_uid=uids.cad_instance,
            series_number=options.cad_series_number, instance_number=1,
            series_description=options.cad_series_description,
            max_regions_per_segment=options.max_regions_per_segment, **common))
    for ds in out:
        _pin_creation(ds, uids.created)
    return out


def _pin_creation(ds: pydicom.Dataset, created: str) -> None:
    """Replace the values highdicom takes from the clock or a random source with ones derived
    from the job, so a rebuild is identical: Instance Creation Date/Time, highdicom's own
    Contribution DateTime, and the SEG Dimension Organization UID."""
    ds.InstanceCreationDate, ds.InstanceCreationTime = created[:8], created[8:14]
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = created
    if "DimensionOrganizationSequence" in ds:
        uid = generate_uid(entropy_srcs=[ds.SOPInstanceUID, "dimension organization"])
        for item in ds.DimensionOrganizationSequence:
            item.DimensionOrganizationUID = uid
        for item in ds.get("DimensionIndexSequence", []):
            item.DimensionOrganizationUID = uid


def write_previews(
    sources: Sequence[pydicom.Dataset],
    findings: Sequence[ImageFindings],
    out_dir: str | Path,
    options: ResultOptions = ResultOptions(),
) -> list[Path]:
    """One PNG per source image (segment outlines, SR contours, labels); returns the paths."""
    from dicom_ai.preview import render_preview

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds, f in _pair(sources, findings):
        segments = analyse_image(ds, f, options)
        path = out / f"{ds.SOPInstanceUID}.png"
        render_preview(ds, segments, f.scores).save(path)
        paths.append(path)
    return paths
