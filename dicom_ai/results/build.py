"""From model findings to the DICOM objects the node sends back: SEG per image, SR per study.

The one entry point::

    from dicom_ai.core import ResultUIDs, ResultOptions
    from dicom_ai.results import build_results
    uids = ResultUIDs.generate(source_sop_uids)        # at job creation; store uids.to_json()
    results = build_results(sources, findings, uids, options=ResultOptions())
    results.datasets                                   # SEGs, GSPSs, SCs, the SR, the CAD SR
    results.write_previews(out_dir)                    # PNG per image for IT quality checks

Regions are found once per image (:func:`analyse_image`) and every writer and the preview
read that one analysis. The writers copy the Patient and Study attributes from cleaned copies
of the sources (:func:`~dicom_ai.results.sources.clean_sources`): an attribute that is not
valid for its VR is emptied or left out, as is any other attribute with a VR its tag does not
allow or a value that cannot be read or encoded, and ``results.notes`` says which (keywords,
never values), so a malformed Patient's Birth Date or a Manufacturer sent as UL never costs an
image its results.

One image's results that cannot be built (no usable pixel spacing, a map on the wrong grid, a
region highdicom refuses) leave that image out of the results, with a note naming it and the
error type; the other images' results are built. Only when no image is left is it an error.

Idempotency: every UID and every date/time written comes from ``ResultUIDs`` (the tracking
UIDs inside the SR derive from the SR's SOP Instance UID), so the same inputs with the same
``ResultUIDs`` give the same UIDs, and a resend after a restart replaces rather than duplicates.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from dicom_ai.core.errors import DicomAIError, ResultError
from dicom_ai.core.findings import ImageFindings
from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.core.views import image_name
from dicom_ai.results.cad_sr import build_mammography_cad_sr
from dicom_ai.results.gsps import build_presentation_state
from dicom_ai.results.preview import render_preview
from dicom_ai.results.regions import DEFAULT_MIN_AREA_MM2, area_spacing, find_regions
from dicom_ai.results.sc import build_overlay_capture
from dicom_ai.results.seg import build_segmentation
from dicom_ai.results.sources import clean_sources
from dicom_ai.results.tid1500 import build_measurement_report
from dicom_ai.results.types import ImageResult, ObjectIdentity, Segment, order_maps

__all__ = ["ResultsBuilder", "StudyResults", "analyse_image", "build_results"]


@dataclass
class StudyResults:
    """What :func:`build_results` made of one study.

    ``images`` holds one :class:`~dicom_ai.results.types.ImageResult` per source image, in
    source order (its segments and regions, and its SEG or None); ``datasets`` the objects
    to send: one SEG per image that has maps, then (as enabled) one presentation state and one
    "AI overlay" Secondary Capture per such image, then the TID 1500 SR, then the CAD SR if enabled;
    ``notes`` what was left out of the copied source attributes and why (keywords only).
    """

    images: list[ImageResult]
    datasets: list[pydicom.Dataset]
    notes: list[str] = field(default_factory=list)
    #: Wall seconds per step, summed over images: ``regions``, ``seg``, ``gsps``, ``sc``, ``sr``, ``cad_sr``.
    seconds: dict[str, float] = field(default_factory=dict)
    #: The file bytes (``save_as(..., enforce_file_format=True)``) of the objects already encoded
    #: when they were checked (SEGs, presentation states, overlay captures), by SOP Instance UID.
    encoded: dict[str, bytes] = field(default_factory=dict)

    def write_previews(self, out_dir: str | Path) -> list[Path]:
        """One PNG per source image (segment outlines, SR contours, labels); returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for image in self.images:
            path = out / f"{image.source.SOPInstanceUID}.png"
            render_preview(image.source, image.segments, image.findings.scores).save(path)
            paths.append(path)
        return paths


def analyse_image(source: pydicom.Dataset, findings: ImageFindings, options: ResultOptions = ResultOptions()) -> list[Segment]:
    """Segments (numbered, with their regions) of one image, in SEG order.

    Parameters
    ----------
    source
        The MG image; its Rows and Columns are the grid every map must be on, and its
        spacing attributes give the area of a pixel (:func:`~dicom_ai.results.regions.area_spacing`).
    findings
        The image's maps and scores.
    options
        Per finding key minimum region area (mm2) and the contour point limit.

    Returns
    -------
    list of Segment
        Numbered 1..n in segment order (:func:`~dicom_ai.results.types.order_maps`), one per map.
    """
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
) -> StudyResults:
    """SEG per source image that has maps, its GSPS and "AI overlay" SC (as enabled), then the
    TID 1500 SR, then the CAD SR if enabled.

    Parameters
    ----------
    sources
        The study's MG images (one study); not changed (the writers get cleaned copies).
    findings
        One entry per image that was analysed, matched by SOP Instance UID; maps are on each
        image's stored pixel grid. An image without maps gets no SEG (a SEG needs at least one
        segment) but is still evidence in the SR.
    uids
        The job's result UIDs and creation time; every UID and date written comes from it.
    options
        Segmentation type, compression, equipment, series numbers and region limits.
    """
    builder = ResultsBuilder(sources, uids, options)
    for ds, f in _pair(builder.sources, findings):
        builder.add(f)
    return builder.finish()


class ResultsBuilder:
    """A study's results built image by image, as :func:`build_results` builds them.

    The worker adds each image's findings as soon as its models have run and asks for its
    full-size maps to be released once its SEG is built (``add(..., release_maps=True)``): the
    writers that come after (presentation state, overlay capture, SR, previews) read only the
    regions, so a study's peak memory holds one image's maps rather than all of them. The
    objects are the same, in the same order, as :func:`build_results` makes.

    Parameters
    ----------
    sources
        Every image of the study that may be added (one study); the Patient and Study
        attributes of the results come from the first (:func:`~dicom_ai.results.sources.clean_sources`).
    uids, options
        As for :func:`build_results`.
    """

    def __init__(self, sources: Sequence[pydicom.Dataset], uids: ResultUIDs,
                 options: ResultOptions = ResultOptions()) -> None:
        if not sources:
            raise ResultError("no source images")
        if len({str(ds.StudyInstanceUID) for ds in sources}) > 1:
            raise ResultError("sources belong to more than one study; build results per study")
        #: Cleaned copies of the sources, in order (what the writers copy from).
        self.sources, self.notes = clean_sources(sources)
        self._by_uid = {str(ds.SOPInstanceUID): ds for ds in self.sources}
        self._uids, self._options = uids, options
        self._images: list[ImageResult] = []
        self._segs: list[pydicom.Dataset] = []
        self._seconds: dict[str, float] = {}
        self._encoded: dict[str, bytes] = {}

    def _span(self, step: str, started: float) -> None:
        self._seconds[step] = self._seconds.get(step, 0.0) + time.perf_counter() - started

    def add(self, findings: ImageFindings, release_maps: bool = False) -> ImageResult | None:
        """Analyse one image and build its SEG; returns its result, or None if it was left out
        (with a note).

        With ``release_maps`` the probability arrays of ``findings`` are replaced by empty
        ``(0, 0)`` arrays once the SEG is built, so nothing holds them: a writer that still read
        one would fail on its shape rather than draw from stale pixels.
        """
        uid = findings.sop_instance_uid
        ds = self._by_uid.get(uid)
        if ds is None:
            raise ResultError(f"findings for image(s) not among the sources: {[uid]}")
        if any(str(image.source.SOPInstanceUID) == uid for image in self._images):
            raise ResultError(f"two findings objects for image {uid}")
        options = self._options
        try:
            started = time.perf_counter()
            image = ImageResult(ds, findings, analyse_image(ds, findings, options))
            self._span("regions", started)
            started = time.perf_counter()
            if image.segments:
                identity = ObjectIdentity(self._uids.seg_series_for(uid), self._uids.seg_instance(uid),
                                          options.seg_series_number,
                                          f"{options.seg_series_description} {image_name(ds)}".strip()[:64])
                image.segmentation = build_segmentation(ds, image.segments, identity, options.equipment,
                                                        segmentation_type=options.segmentation_type,
                                                        compression=options.compression)
                _pin_creation(image.segmentation, self._uids.created)
                _check_encodes(image.segmentation, self._encoded)
                self._span("seg", started)
        except Exception as exc:  # this image only; highdicom's and pydicom's errors may quote values
            why = f"{type(exc).__name__}: {exc}" if isinstance(exc, DicomAIError) else type(exc).__name__
            self.notes.append(f"image {ds.SOPInstanceUID} left out of the results: {why}")
            image = None
        if release_maps:
            for m in findings.maps:
                m.probability = _RELEASED
        if image is None:
            return None
        self._images.append(image)
        if image.segmentation is not None:
            self._segs.append(image.segmentation)
        return image

    def finish(self) -> StudyResults:
        """The per-image views, the SR and the CAD SR of the images added, and every object.

        Raises ResultError when no image's results could be built.
        """
        images, notes, seconds, options, uids = self._images, self.notes, self._seconds, self._options, self._uids
        if not images:
            raise ResultError("no image's results could be built: " + "; ".join(notes))
        out = list(self._segs)
        out += _per_image_views(images, uids, options, notes, seconds, self._encoded)
        started = time.perf_counter()
        sr = ObjectIdentity(uids.sr_series, uids.sr_instance, options.sr_series_number, options.sr_series_description)
        out.append(build_measurement_report(images, sr, options.equipment,
                                            max_regions_per_segment=options.max_regions_per_segment))
        self._span("sr", started)
        if options.cad_sr:
            started = time.perf_counter()
            cad = ObjectIdentity(uids.cad_series, uids.cad_instance, options.cad_series_number,
                                 options.cad_series_description)
            out.append(build_mammography_cad_sr(images, cad, options.equipment,
                                                max_regions_per_segment=options.max_regions_per_segment))
            self._span("cad_sr", started)
        for ds in out:
            if str(ds.SOPInstanceUID) not in self._encoded:  # the SEGs and views are pinned already
                _pin_creation(ds, uids.created)
        encoded = {uid: data for uid, data in self._encoded.items()
                   if uid in {str(ds.SOPInstanceUID) for ds in out}}
        return StudyResults(images=images, datasets=out, notes=notes, seconds=seconds, encoded=encoded)


#: What a released map's probability becomes (:meth:`ResultsBuilder.add`).
_RELEASED = np.empty((0, 0), dtype=np.float32)
_RELEASED.flags.writeable = False


def _check_encodes(ds: pydicom.Dataset, encoded: dict[str, bytes]) -> None:
    """Raise if ``ds`` cannot be written as a file: a value copied from a hostile source that
    highdicom accepted but pydicom cannot encode must cost that object, not the job when the
    worker writes its outbox. The file's bytes are kept in ``encoded`` (by SOP Instance UID), so
    the outbox writes them instead of encoding the object a second time (``ds`` is final here:
    its creation values are pinned before the check)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    encoded[str(ds.SOPInstanceUID)] = buffer.getvalue()


def _per_image_views(images: list[ImageResult], uids: ResultUIDs, options: ResultOptions,
                     notes: list[str], seconds: dict[str, float],
                     encoded: dict[str, bytes]) -> list[pydicom.Dataset]:
    """The presentation states, then the "AI overlay" Secondary Captures, of the images that
    have a SEG (as enabled), each in a series of its own like the SEGs; one that cannot be
    built is left out with a note."""
    out: list[pydicom.Dataset] = []
    kinds = [("presentation state", "gsps", options.gsps, uids.gsps_series_for, uids.gsps_instance,
              options.gsps_series_number, options.gsps_series_description, build_presentation_state),
             ("AI overlay", "sc", options.secondary_capture, uids.sc_series_for, uids.sc_instance,
              options.sc_series_number, options.sc_series_description, build_overlay_capture)]
    for what, step, enabled, series_for, instance, number, description, build in kinds:
        if not enabled:
            continue
        started = time.perf_counter()
        with_segments = [image for image in images if image.segmentation is not None]
        for image in with_segments:
            uid = str(image.source.SOPInstanceUID)
            identity = ObjectIdentity(series_for(uid), instance(uid), number,
                                      f"{description} {image_name(image.source)}".strip()[:64])
            try:
                obj = build(image, identity, options.equipment, max_regions_per_segment=options.max_regions_per_segment)
                _pin_creation(obj, uids.created)
                _check_encodes(obj, encoded)
                out.append(obj)
            except Exception as exc:  # this object only; the SEG and SR of the image stand
                why = f"{type(exc).__name__}: {exc}" if isinstance(exc, DicomAIError) else type(exc).__name__
                notes.append(f"{what} of image {uid} left out: {why}")
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - started
    return out


def _pin_creation(ds: pydicom.Dataset, created: str) -> None:
    """Replace the values highdicom takes from the clock or a random source with ones derived
    from the job, so a rebuild is identical: Series, Content and Instance Creation Date/Time,
    highdicom's own Contribution DateTime, a presentation state's Presentation Creation Date/Time,
    a Secondary Capture's Date/Time of Secondary Capture,
    and the SEG Dimension Organization UID."""
    date, time = created[:8], created[8:14]
    ds.SeriesDate, ds.SeriesTime = date, time
    if "PresentationCreationDate" in ds:  # a presentation state has no Content Date/Time
        ds.PresentationCreationDate, ds.PresentationCreationTime = date, time
    else:
        ds.ContentDate, ds.ContentTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    if "TimeOfSecondaryCapture" in ds:  # highdicom takes it from the clock
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = created
    if "DimensionOrganizationSequence" in ds:
        uid = generate_uid(entropy_srcs=[ds.SOPInstanceUID, "dimension organization"])
        for item in ds.DimensionOrganizationSequence:
            item.DimensionOrganizationUID = uid
        for item in ds.get("DimensionIndexSequence", []):
            item.DimensionOrganizationUID = uid
