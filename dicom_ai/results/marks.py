"""What the per-image views of the findings draw: which regions, with which label, over which window.

The presentation state (:mod:`~dicom_ai.results.gsps`) and the "AI overlay" Secondary Capture
(:mod:`~dicom_ai.results.sc`) show the same regions as the TID 1500 SR (per segment the
``max_regions_per_segment`` most probable ones), labelled the same way, over the source's own
VOI window; they read these functions and not each other.

Coordinates: contours are SCOORD ``(column, row)`` with (0.0, 0.0) at the top-left corner of the
top-left pixel (:mod:`~dicom_ai.results.regions`); masks are ``(rows, columns)``.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from dicom_ai.results.codes import finding_codes
from dicom_ai.results.regions import Region
from dicom_ai.results.types import ImageResult, Segment

__all__ = ["drawn_regions", "region_label", "voi_window", "outline_mask", "displayed_inverse"]


def drawn_regions(segment: Segment, max_regions_per_segment: int) -> list[Region]:
    """The regions of ``segment`` the SR lists (and the views draw): the most probable first."""
    return sorted(segment.regions.regions, key=lambda g: -g.max_probability)[:max_regions_per_segment]


def region_label(segment: Segment, region: Region) -> str:
    """The label of one region: ``<finding> (<model>) <max probability>%``."""
    return f"{finding_codes(segment.map.finding).label} ({segment.map.model.name}) {100 * region.max_probability:.0f}%"


def _first(value: object) -> object:
    return value[0] if isinstance(value, MultiValue) else value


def voi_window(source: pydicom.Dataset) -> tuple[float, float, str]:
    """``(center, width, explanation)`` of the source's first VOI window, in modality units.

    A source without a window (For Processing images have none) gets the 0.5-99.5 percentile
    range of its modality values (stored values through Rescale Slope and Intercept).
    """
    if "WindowCenter" in source and "WindowWidth" in source:
        explanation = _first(source.get("WindowCenterWidthExplanation", "")) or "source window"
        return float(_first(source.WindowCenter)), max(float(_first(source.WindowWidth)), 1.0), str(explanation)[:64]
    lo, hi = np.percentile(modality_values(source), [0.5, 99.5])
    return float((lo + hi) / 2), float(max(hi - lo, 1.0)), "AI node: 0.5-99.5 percentile"


def modality_values(source: pydicom.Dataset) -> np.ndarray:
    """Stored values through Rescale Slope and Intercept, float64 ``(rows, columns)``."""
    return source.pixel_array.astype(np.float64) * float(source.get("RescaleSlope", 1) or 1) \
        + float(source.get("RescaleIntercept", 0) or 0)


def displayed_inverse(source: pydicom.Dataset) -> bool:
    """True when the source displays low values bright (MONOCHROME1, or Presentation LUT Shape INVERSE)."""
    shape = source.get("PresentationLUTShape")
    if shape:
        return shape == "INVERSE"
    return source.PhotometricInterpretation == "MONOCHROME1"


def outline_mask(image: ImageResult, max_regions_per_segment: int, segment: Segment | None = None) -> np.ndarray:
    """The drawn regions' SR contours rasterised on the source grid, ``(rows, columns)`` bool.

    A pixel is set when a contour passes through it: each polyline edge is sampled every 0.25
    pixel and each sample sets the pixel ``[floor(row), floor(column)]`` (SCOORD, so the pixel
    whose area contains the point). ``segment``: only that segment's regions; None: every segment's.
    """
    rows, cols = int(image.source.Rows), int(image.source.Columns)
    out = np.zeros((rows, cols), dtype=bool)
    for s in ([segment] if segment is not None else image.segments):
        for region in drawn_regions(s, max_regions_per_segment):
            c = np.asarray(region.contour, dtype=np.float64)
            pts = _edge_samples(c[:-1], c[1:])
            rr = np.clip(np.floor(pts[:, 1]).astype(int), 0, rows - 1)
            cc = np.clip(np.floor(pts[:, 0]).astype(int), 0, cols - 1)
            out[rr, cc] = True
    return out


def _edge_samples(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Points along the edges ``a[i] -> b[i]`` (``(n, 2)`` each): per edge ``m = max(2,
    ceil(4 * longest coordinate step) + 1)`` points ``a + (b - a) * t`` at ``t`` of
    ``np.linspace(0, 1, m)``, all edges at once. ``t`` is computed as linspace computes it
    (``k * (1 / (m - 1))``, the last exactly 1), so the points are the same bits."""
    if not len(a):
        return np.zeros((0, 2))
    m = np.maximum(2, np.ceil(np.abs(b - a).max(axis=1) * 4).astype(int) + 1)
    edge = np.repeat(np.arange(len(a)), m)
    first = np.cumsum(m) - m
    k = np.arange(edge.size) - first[edge]
    t = k * (1.0 / (m - 1))[edge]
    t[first + m - 1] = 1.0
    return a[edge] + (b - a)[edge] * t[:, None]
