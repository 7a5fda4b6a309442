"""Regions of a probability map: threshold, connected components, contours, areas in mm2.

Coordinates: masks and maps are ``(rows, columns)`` on the stored grid of the source image.
Contours are returned in DICOM SCOORD image coordinates, ``(column, row)`` as floats with
(0.0, 0.0) at the top-left corner of the top-left pixel, so the centre of pixel ``[r, c]`` is
``(c + 0.5, r + 0.5)`` (PS3.3 C.18.6.1.2). A contour is a closed POLYLINE (first point
repeated last) through the centres of boundary pixels of the region, so every vertex and every
pixel enclosed by it belongs to the region.

Pixel spacing (which spacing an area in mm2 is computed with) follows PS3.3 10.7.1.3 for
projection radiography, the same order cornerstone.js (and so OHIF) uses:

1. Pixel Spacing (0028,0030) when Pixel Spacing Calibration Type (0028,0A02) is present: the
   modality has calibrated it to the patient (GEOMETRY or FIDUCIAL); use it as is.
2. Imager Pixel Spacing (0018,1164) divided by Estimated Radiographic Magnification Factor
   (0018,1114) when both are present: the spacing estimated at the breast rather than at the
   detector. For contact mammography ERMF is about 1.05-1.10, i.e. detector-plane areas would
   overstate breast areas by 10-20 %.
3. Imager Pixel Spacing alone: detector-plane spacing (basis ``detector``).
4. Pixel Spacing alone (uncalibrated, meaning unknown): used, basis ``uncalibrated``.

The basis is kept in :class:`Spacing` so the writers can state it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.path import Path as MplPath

from dicom_ai.core.errors import RegionError

__all__ = [
    "Spacing",
    "Region",
    "RegionSet",
    "area_spacing",
    "find_regions",
    "trace_contour",
    "simplify_polygon",
    "polygon_pixels",
    "DEFAULT_MIN_AREA_MM2",
]

#: Minimum region area per finding key, in mm2 (at the area spacing). Lesion maps below
#: ~2 mm diameter are noise for the lesion models; single calcifications are 0.1-1 mm across.
DEFAULT_MIN_AREA_MM2: dict[str, float] = {
    "malignant_lesion": 3.0,
    "mass": 3.0,
    "benign_lesion": 3.0,
    "calcification": 0.03,
    "calcification_cluster": 3.0,
}


@dataclass(frozen=True)
class Spacing:
    """Row and column spacing in mm used for areas, and which attribute it came from.

    ``basis`` is one of ``calibrated`` (Pixel Spacing with a calibration type), ``ermf``
    (Imager Pixel Spacing / ERMF), ``detector`` (Imager Pixel Spacing) or ``uncalibrated``
    (Pixel Spacing without calibration type).
    """

    row_mm: float
    column_mm: float
    basis: str

    @property
    def pixel_area_mm2(self) -> float:
        return self.row_mm * self.column_mm


def _pair(value: object) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        row, col = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if row <= 0 or col <= 0:
        return None
    return row, col


def area_spacing(ds: pydicom.Dataset) -> Spacing:
    """The spacing areas are computed with for source image ``ds`` (rules in the module doc)."""
    pixel = _pair(ds.get("PixelSpacing"))
    imager = _pair(ds.get("ImagerPixelSpacing"))
    if pixel and ds.get("PixelSpacingCalibrationType"):
        return Spacing(pixel[0], pixel[1], "calibrated")
    if imager:
        try:
            ermf = float(ds.get("EstimatedRadiographicMagnificationFactor") or 0)
        except (TypeError, ValueError):
            ermf = 0.0
        if ermf >= 1.0:
            return Spacing(imager[0] / ermf, imager[1] / ermf, "ermf")
        return Spacing(imager[0], imager[1], "detector")
    if pixel:
        return Spacing(pixel[0], pixel[1], "uncalibrated")
    raise RegionError(
        "source image has neither Imager Pixel Spacing (0018,1164) nor Pixel Spacing (0028,0030); "
        "areas in mm2 cannot be computed. Configure the modality to send Imager Pixel Spacing."
    )


@dataclass
class Region:
    """One connected region of a thresholded map.

    ``bbox`` is half-open ``(r0, r1, c0, c1)``; ``mask`` is the region on that box (holes
    filled). ``contour`` is the closed SCOORD polyline ``(N, 2)`` in ``(column, row)``.
    """

    index: int
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    pixel_count: int
    area_mm2: float
    max_probability: float
    mean_probability: float
    contour: np.ndarray

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of mass in SCOORD ``(column, row)``."""
        rr, cc = np.nonzero(self.mask)
        return float(cc.mean() + self.bbox[2] + 0.5), float(rr.mean() + self.bbox[0] + 0.5)


@dataclass
class RegionSet:
    """All regions of one map, largest first, on a grid of ``shape`` (rows, columns)."""

    shape: tuple[int, int]
    regions: list[Region]
    spacing: Spacing

    @property
    def mask(self) -> np.ndarray:
        """The regions' union on the full grid (bool, holes filled).

        Built on each call and not kept: a study's analysed images would otherwise hold a
        full-size mask per segment (8.5 MB for a 3328 x 2560 image) until their results are
        written. It equals :func:`find_regions`' thresholded components with their holes
        filled, since a component dropped there lies wholly inside a kept region.
        """
        return self.paint(np.zeros(self.shape, dtype=bool))

    def paint(self, out: np.ndarray) -> np.ndarray:
        """Set the regions' pixels of ``out`` (``(rows, columns)`` on this grid, any dtype) to 1
        (True), leaving the others as they are; returns ``out``. The SEG writer paints each
        segment straight into its frame, without a full-size mask per segment first."""
        for reg in self.regions:
            r0, r1, c0, c1 = reg.bbox
            out[r0:r1, c0:c1][reg.mask] = 1
        return out

    def mask_at(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """``mask[np.ix_(rows, columns)]`` without the full-size mask: the union read at the
        given rows and columns (each nondecreasing, e.g. the pixels a nearest-neighbour
        downscale reads)."""
        rows, columns = np.asarray(rows), np.asarray(columns)
        out = np.zeros((len(rows), len(columns)), dtype=bool)
        for reg in self.regions:
            r0, r1, c0, c1 = reg.bbox
            a, b = np.searchsorted(rows, [r0, r1])
            c, d = np.searchsorted(columns, [c0, c1])
            if a < b and c < d:
                out[a:b, c:d] |= reg.mask[np.ix_(rows[a:b] - r0, columns[c:d] - c0)]
        return out


# 8-neighbourhood, clockwise in image coordinates (rows grow downwards), starting West.
_RING = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))
_RING_INDEX = {d: i for i, d in enumerate(_RING)}


def trace_contour(mask: np.ndarray) -> np.ndarray:
    """Outer boundary of the single 8-connected component in ``mask`` (Moore tracing).

    Returns ``(N, 2)`` integer ``(row, column)`` boundary pixels in clockwise order (on screen),
    not closed. ``mask`` must hold exactly one 8-connected component.
    """
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    nz = np.flatnonzero(padded)
    if nz.size == 0:
        raise RegionError("cannot trace an empty mask")
    start = divmod(int(nz[0]), padded.shape[1])
    # The pixel West of the first pixel in raster order is background: begin the sweep there.
    back = 0
    cur = start
    points = [start]
    second = None
    limit = 4 * padded.size + 8
    for _ in range(limit):
        for k in range(1, 9):
            d = (back + k) % 8
            nxt = (cur[0] + _RING[d][0], cur[1] + _RING[d][1])
            if padded[nxt]:
                break
        else:
            break  # isolated pixel
        prev_bg = (cur[0] + _RING[(d - 1) % 8][0], cur[1] + _RING[(d - 1) % 8][1])
        if cur == start and second is not None and nxt == second:
            break
        if second is None:
            second = nxt
        cur = nxt
        back = _RING_INDEX[(prev_bg[0] - cur[0], prev_bg[1] - cur[1])]
        points.append(cur)
    if len(points) > 1 and points[-1] == start:
        points.pop()
    return np.asarray(points, dtype=np.int64) - 1


def simplify_polygon(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a closed polygon ``(N, 2)``; returns it unclosed.

    Keeps the first point and the point farthest from it as anchors, so the ring is split
    into two open chains.
    """
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    if n <= 4:
        return pts
    far = int(np.argmax(((pts - pts[0]) ** 2).sum(axis=1)))
    keep = np.zeros(n + 1, dtype=bool)
    ring = np.vstack([pts, pts[:1]])
    keep[[0, far, n]] = True
    stack = [(0, far), (far, n)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        seg = ring[b] - ring[a]
        rel = ring[a + 1:b] - ring[a]
        length = float(np.hypot(*seg))
        if length == 0.0:
            dist = np.hypot(rel[:, 0], rel[:, 1])
        else:
            dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / length
        i = int(np.argmax(dist))
        if dist[i] > tolerance:
            m = a + 1 + i
            keep[m] = True
            stack.extend([(a, m), (m, b)])
    return ring[keep][:-1]


def polygon_pixels(polygon_rc: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of a grid of ``shape`` whose centres lie inside or on a polygon.

    The polygon is given as ``(row, column)`` pixel-centre coordinates (the centre of pixel
    ``[r, c]`` is ``(r, c)`` here). This is the containment the writers guarantee: no pixel
    outside the region has its centre enclosed by, or on, the region's contour.

    Polygons with whole-pixel vertices (the traced contours and their simplifications) are
    filled by scanlines in exact arithmetic (:func:`_lattice_polygon_pixels`, matplotlib only
    for the pixels on an edge); others by matplotlib's point-in-path test. Both use the
    even-odd rule.
    """
    pts = np.asarray(polygon_rc, dtype=np.float64)
    if len(pts) >= 3 and np.all(pts == np.rint(pts)) and np.abs(pts).max() < 2**31:
        return _lattice_polygon_pixels(pts.astype(np.int64), shape)
    return _matplotlib_polygon_pixels(pts, shape)


def _matplotlib_polygon_pixels(pts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """:func:`polygon_pixels` by matplotlib's point-in-path test (any vertices)."""
    out = np.zeros(shape, dtype=bool)
    if len(pts) < 3:
        idx = np.rint(pts).astype(int)
        out[idx[:, 0], idx[:, 1]] = True
        return out
    r0, c0 = np.maximum(np.floor(pts.min(axis=0)).astype(int), 0)
    r1, c1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + 1, shape)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    centres = np.column_stack([xx.ravel(), yy.ravel()]).astype(np.float64)
    path = MplPath(pts[:, ::-1])
    # matplotlib's sign of ``radius`` depends on the polygon's orientation; the union of both
    # signs includes centres lying on an edge.
    inside = path.contains_points(centres, radius=1e-6) | path.contains_points(centres, radius=-1e-6)
    out[r0:r1, c0:c1] = inside.reshape(yy.shape)
    return out


def _lattice_polygon_pixels(pts: np.ndarray, shape: tuple[int, int], edges: bool = True) -> np.ndarray:
    """:func:`polygon_pixels` of a polygon with integer ``(row, col)`` vertices (``(n, 2)``, n >= 3).

    matplotlib tests every pixel of the bounding box against every edge, which took seconds for
    a large cluster's traced contour. Here each pixel row is filled between pairs of edge
    crossings (even-odd, edges half-open in rows), and the pixels lying on an edge are added.
    Pixel centres and vertices are integers, so "on an edge" is exact.

    ``edges=False`` leaves the pixels on an edge as the row fill has them: for a caller that
    sets them anyway (:func:`_contour_for`'s traced contour, whose edges join 8-neighbours, so
    the only pixels on an edge are its vertices, region pixels all).
    """
    out = np.zeros(shape, dtype=bool)
    r0, c0 = np.maximum(pts.min(axis=0), 0)
    r1, c1 = np.minimum(pts.max(axis=0) + 1, shape)
    if r1 <= r0 or c1 <= c0:
        return out
    a, b = pts, np.roll(pts, -1, axis=0)
    box = np.zeros((r1 - r0, c1 - c0 + 1), dtype=np.int32)
    # Crossings of each non-horizontal edge with the rows lo .. hi - 1.
    lo, hi = np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 0], b[:, 0])
    span = hi - lo
    edge = np.repeat(np.arange(len(a)), span)
    if edge.size:
        y = lo[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(span) - span, span))
        ya, xa = a[edge, 0], a[edge, 1]
        x = xa + (y - ya) * (b[edge, 1] - xa) / (b[edge, 0] - ya)
        order = np.lexsort((x, y))
        y, x = y[order], x[order]
        # Sorted by row then column, each row holds an even number of crossings: pair them up.
        first, second = x[0::2], x[1::2]
        rows = y[0::2]
        start = np.floor(first).astype(np.int64) + 1
        stop = np.ceil(second).astype(np.int64)  # exclusive
        keep = (stop > start) & (rows >= r0) & (rows < r1)
        rows, start, stop = rows[keep] - r0, np.clip(start[keep], c0, c1) - c0, np.clip(stop[keep], c0, c1) - c0
        np.add.at(box, (rows, start), 1)
        np.add.at(box, (rows, stop), -1)
    inside = np.cumsum(box, axis=1)[:, :-1] > 0
    if not edges:
        out[r0:r1, c0:c1] = inside
        return out
    # Pixels on an edge (the lattice points of each segment): matplotlib decides those, as
    # polygon_pixels always has (its offset contours leave out, e.g., the tip of a retraced
    # spike), so the result is the same pixel for pixel; there are about as many as vertices.
    d = b - a
    steps = np.gcd(np.abs(d[:, 0]), np.abs(d[:, 1]))
    edge = np.repeat(np.arange(len(a)), steps + 1)
    k = np.arange(edge.size) - np.repeat(np.cumsum(steps + 1) - (steps + 1), steps + 1)
    unit = d[edge] // np.maximum(steps[edge], 1)[:, None]
    on = a[edge] + unit * k[:, None]
    on = on[(on[:, 0] >= r0) & (on[:, 0] < r1) & (on[:, 1] >= c0) & (on[:, 1] < c1)]
    # The distinct points in (row, column) order, as np.unique(on, axis=0) but by their flat
    # index in the box (a 1-D sort instead of a sort of row records).
    flat = np.unique((on[:, 0] - r0) * (c1 - c0) + (on[:, 1] - c0))
    on = np.column_stack([flat // (c1 - c0) + r0, flat % (c1 - c0) + c0])
    path = MplPath(pts[:, ::-1].astype(np.float64))
    centres = on[:, ::-1].astype(np.float64)
    inside[on[:, 0] - r0, on[:, 1] - c0] = (path.contains_points(centres, radius=1e-6)
                                            | path.contains_points(centres, radius=-1e-6))
    out[r0:r1, c0:c1] = inside
    return out


def _contour_for(mask: np.ndarray, tolerance: float, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Trace, fill and simplify one component; returns (filled mask, polygon in (row, col))."""
    raw = trace_contour(mask)
    # The pixels on the traced contour's edges are its vertices (8-neighbours are joined), all
    # in the mask, so the row fill alone gives the same union as polygon_pixels.
    filled = mask | (_lattice_polygon_pixels(raw, mask.shape, edges=False) if len(raw) >= 3 else mask)
    best = raw.astype(np.float64)
    if len(raw) <= 4:
        return filled, best
    # Search the tolerance: loosen while the polygon has too many points, tighten when it
    # leaves the region; a bounded number of steps keeps the cost predictable.
    tol, lo, hi = tolerance, 0.0, None
    for _ in range(10):
        cand = simplify_polygon(raw, tol)
        if len(cand) >= 3 and not (polygon_pixels(cand, mask.shape) & ~filled).any():
            best, lo = cand, tol
            if len(cand) <= max_points:
                break
            tol = tol * 2.0 if hi is None else (tol + hi) / 2.0
        else:
            hi = tol
            tol = (lo + tol) / 2.0
            if tol < 0.25:
                break
    return filled, best


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def _small_region_outline(centres: np.ndarray, r: float = 0.4) -> np.ndarray:
    """Outline of a region of one or two pixels (whose trace is a point or a segment): the
    convex hull of small diamonds around the pixel centres, so the POLYLINE has an area and
    every vertex still lies inside a region pixel."""
    pts = np.unique(np.vstack([centres + d for d in ((r, 0), (0, r), (-r, 0), (0, -r))]), axis=0)
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(points):
        out: list = []
        for p in points:
            while len(out) >= 2 and _cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.asarray(lower[:-1] + upper[:-1])


def find_regions(
    probability: np.ndarray,
    threshold: float,
    spacing: Spacing,
    min_area_mm2: float = 0.0,
    tolerance_px: float = 1.0,
    max_points: int = 128,
) -> RegionSet:
    """Threshold ``probability`` at ``threshold`` (>=), split into 8-connected regions.

    Parameters
    ----------
    probability
        ``(rows, columns)`` map on the stored source grid, values in [0, 1].
    threshold
        Operating point; pixels ``>= threshold`` are foreground.
    spacing
        Row and column spacing (mm) the areas are computed with.
    min_area_mm2
        Regions smaller than this area (mm2) are dropped.
    tolerance_px
        Douglas-Peucker tolerance of the contours, in pixels.
    max_points
        Contours are loosened until they have at most this many vertices.

    Regions smaller than ``min_area_mm2`` are dropped; holes inside a region are filled (a
    lesion contour has no holes, and the SEG then equals the union of the SR contours'
    regions). Contours are simplified by Douglas-Peucker with ``tolerance_px`` (pixels),
    loosened until at most ``max_points`` vertices, but never so far that the polygon
    leaves its region. Regions are returned largest first.
    """
    prob = np.asarray(probability, dtype=np.float32)
    if prob.ndim != 2:
        raise RegionError(f"probability map must be 2-D, got shape {prob.shape}")
    binary = prob >= threshold
    rows = np.flatnonzero(binary.any(axis=1))
    if not rows.size:
        return RegionSet(prob.shape, [], spacing)
    # Components of the foreground's bounding box only (maps are mostly empty): the same
    # labels in the same (raster, then size) order as on the whole map, at a fraction of the cost.
    cols = np.flatnonzero(binary.any(axis=0))
    top, left = int(rows[0]), int(cols[0])
    crop = binary[top:int(rows[-1]) + 1, left:int(cols[-1]) + 1].astype(np.uint8)
    min_pixels = max(1, int(np.ceil(min_area_mm2 / spacing.pixel_area_mm2 - 1e-9)))
    labels_img = sitk.ConnectedComponent(sitk.GetImageFromArray(crop), True)
    labels_img = sitk.RelabelComponent(labels_img, minimumObjectSize=min_pixels, sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOff()  # only the bounding boxes are read; the perimeter is its costliest part
    stats.Execute(labels_img)
    labels = sitk.GetArrayViewFromImage(labels_img)
    regions: list[Region] = []
    for lab in stats.GetLabels():
        c0, r0, w, h = stats.GetBoundingBox(lab)
        comp = labels[r0:r0 + h, c0:c0 + w] == lab
        box = (r0 + top, r0 + top + h, c0 + left, c0 + left + w)
        filled, poly = _contour_for(comp, tolerance_px, max_points)
        vals = prob[box[0]:box[1], box[2]:box[3]][filled]
        contour = np.column_stack([poly[:, 1] + box[2] + 0.5, poly[:, 0] + box[0] + 0.5])
        if len(np.unique(contour, axis=0)) < 3:
            contour = _small_region_outline(contour)
        contour = np.vstack([contour, contour[:1]])
        regions.append(Region(
            index=len(regions) + 1, bbox=box, mask=filled, pixel_count=int(filled.sum()),
            area_mm2=float(filled.sum()) * spacing.pixel_area_mm2,
            max_probability=float(vals.max()), mean_probability=float(vals.mean()), contour=contour))
    # Holes were filled, so other (smaller) components inside a region are absorbed: drop
    # the components swallowed by an earlier region's hole filling.
    kept: list[Region] = []
    covered = np.zeros(prob.shape, dtype=bool)
    for reg in regions:
        r0, r1, c0, c1 = reg.bbox
        if (covered[r0:r1, c0:c1] & reg.mask).all():
            continue
        covered[r0:r1, c0:c1] |= reg.mask
        reg.index = len(kept) + 1
        kept.append(reg)
    return RegionSet(prob.shape, kept, spacing)
