"""The breast mask and the pectoral-muscle mask: which pixels of a mammogram are breast.

Owns :func:`breast_mask`, :func:`breast_mask_report`, :func:`pectoral_mask`,
:func:`chest_wall_side` and :data:`MASK_VERSION`. The breast mask is computed once per image and
cached on the :class:`~dicom_ai.imaging.mammogram.Mammogram` (``Mammogram.breast_mask``, and
``Mammogram.pectoral_mask`` for MLO views), so every model of a study sees the same mask at
no extra cost, and the pipeline drops every mark outside it.

Conventions: masks are boolean ``(rows, columns)`` on the stored grid of ``pixels`` (no flip);
intensities are in [0, 1], dense tissue bright. All sizes are given in pixels of the working
copy (the image shrunk so its longer side is at most ``max_side``), which makes the method
independent of the source pixel size to first order (a mammogram's field of view is 18-30 cm
whatever its detector).

What the breast mask removes, and how (each step is needed by real images, not phantoms;
mini-MIAS reference numbers are examples):

1. Padding: digitised film is often padded to a square with one constant value (mini-MIAS:
   0); pixels within 0.004 of the image minimum are padding. The film is the box of rows
   and columns at least 5 % non-padding.
2. Background: a triangle threshold on the histogram of the median-filtered copy, drawn
   from the *background* peak (the darkest clear peak: padding, film base, detector air) to
   the bright end at height 0, so a bright film edge or saturated strip at the bright end
   cannot pull it up (mdb131, mdb149). Two levels are tried, in this order: over all pixels
   (the lowest peak is the background: right for digital air and for clipped film scans,
   whose faint skin and scanner glare sit just above it, and it keeps the fatty periphery
   that Otsu would cut), then over the non-padding pixels only (right where a film base lies
   between the padding and the breast: with the padding in, the level sat below the film
   base and the whole film became "breast", 50 of 322 mini-MIAS images with the previous
   method, mdb121, mdb123, ...). The first level is kept unless its mask fails the strict
   check below (it reaches the side opposite the chest wall over half its height).
3. Scanner edges and film borders: a frame of 1 % of each side is background, and thin runs
   (<= 3 % of the side) of nearly full rows or columns within 6 % of the film's edges
   (the film inside the padding), followed by a line at most 60 % full, are too: film
   edges, collimator strips, bright borders.
4. Labels and markers: bright blobs (above the 99.5th percentile of the foreground and
   0.85) of at most 2 % of the frame with dark pixels (background, or under half their
   level: film, air, printed letters) in at least a tenth of the ring around them are
   removed with a margin of ~1 % of the long side, whether or not they touch the breast
   (the film's "ML" label of mdb006 / mdb313 lay on the skin line). Interior blobs come
   back when holes are filled (step 5).
5. The breast is the largest component touching the film's left or right side (the chest
   wall), after an opening of radius ~1 % of the long side that cuts thin bridges; the
   opened component is dilated back inside the foreground so the skin line returns but a
   bridged label does not. Holes are filled (a lesion or a dark duct is breast).
6. Skin / nipple markers (metal beads, stickers) on the skin line: near-saturated compact
   components within the breast's outer band are removed.

A finished mask is checked (:func:`breast_mask_report`): it must cover 2-96 % of the film,
touch the film's left or right side (the chest wall) over 10 % of its height and not reach
both sides over 90 % (strict, for choosing the level: the far side under 50 %). When
neither level passes the strict check, the second level is kept if it passes the plain
one (a breast that fills the film, mdb151). When both fail the plain check, the first of
these that passes is used: the previous method (MASK_VERSION 3), else the whole film less
padding, frame and separate labels (generous on purpose: a finding in the true breast is
not dropped for a failed mask), and a warning without patient data is logged, so the mask
is never silently the whole frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from dicom_ai.imaging.resample import resize

__all__ = ["MASK_VERSION", "MaskReport", "breast_mask", "breast_mask_report", "pectoral_mask", "chest_wall_side",
           "working_copy"]

#: Bump when the mask method changes: caches of model outputs that depend on it are keyed by it.
MASK_VERSION = 4

_log = logging.getLogger(__name__)

#: Pixels within this of the image minimum are padding (constant fill around digitised film).
PAD_TOLERANCE = 0.004
#: A plausible breast covers this share of the film (non-padding bounding box), at least/at most.
MIN_FIELD_SHARE, MAX_FIELD_SHARE = 0.02, 0.96


@dataclass
class MaskReport:
    """The breast mask of one image and how it was found.

    ``method`` is ``"breast"`` (the method of the module docstring, checks passed),
    ``"fallback-v3"`` (the previous method, used because the first failed its checks) or
    ``"fallback-field"`` (the whole film less padding, frame and separate labels: nothing
    plausible was found, so marks are not restricted beyond that). ``problems`` lists why the
    first mask failed (empty when it passed); ``field_share`` is the mask's share of the film.
    """

    mask: np.ndarray
    method: str
    problems: list[str] = field(default_factory=list)
    field_share: float = 0.0

    @property
    def ok(self) -> bool:
        return self.method == "breast"


def working_copy(pixels: np.ndarray, max_side: int = 512) -> np.ndarray:
    """``pixels`` shrunk (antialiased) by a whole factor to at most ``max_side`` pixels per
    side: the grid :func:`breast_mask` and :func:`pectoral_mask` work on. A caller that needs
    both masks of one image makes it once and hands it to each (``working``)."""
    return _working_copy(pixels, max_side)[0]


def _working_copy(pixels: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    rows, cols = pixels.shape
    factor = max(1, int(np.ceil(max(rows, cols) / max_side)))
    small = resize(np.asarray(pixels, dtype=np.float32), (int(np.ceil(rows / factor)), int(np.ceil(cols / factor))))
    return small, factor


def _components(binary: np.ndarray) -> np.ndarray:
    """Labels (8-connected), sorted by size: 1 is the largest."""
    return sitk.GetArrayFromImage(sitk.RelabelComponent(
        sitk.ConnectedComponent(sitk.GetImageFromArray(binary.astype(np.uint8)), True), sortByObjectSize=True))


def _largest(binary: np.ndarray) -> np.ndarray:
    if not binary.any():
        return binary
    return _components(binary) == 1


def _disk(binary: np.ndarray, radius: int, op: str) -> np.ndarray:
    img = sitk.GetImageFromArray(binary.astype(np.uint8))
    f = {"open": sitk.BinaryMorphologicalOpening, "close": sitk.BinaryMorphologicalClosing,
         "dilate": sitk.BinaryDilate, "erode": sitk.BinaryErode}[op]
    return sitk.GetArrayFromImage(f(img, [radius, radius], sitk.sitkBall)).astype(bool)


def _fill(binary: np.ndarray) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(binary.astype(np.uint8)))).astype(bool)


def _background_level(values: np.ndarray, bins: int = 256) -> float:
    """Triangle threshold drawn from the background peak (step 2 of the module docstring).

    The background peak is the first local maximum (5-bin smoothed histogram, at least 5 % of
    the highest bin) in the darker half of the range, else the highest bin of the darkest
    35 %; the line runs from it to the bright end (99.9th percentile) at height 0, and the
    level is the bin farthest below that line. A peak above 8 % of the range is no
    background: the level is then the lowest value (all of ``values`` is object).
    """
    lo, hi = float(values.min()), float(np.quantile(values, 0.999))
    if hi <= lo:
        return lo
    h, edges = np.histogram(values, bins=bins, range=(lo, hi + 1e-6))
    h = np.convolve(h.astype(np.float64), np.ones(5) / 5, mode="same")
    big = h >= 0.05 * h.max()
    rising = (h[1:bins // 2] >= h[:bins // 2 - 1]) & (h[1:bins // 2] >= h[2:bins // 2 + 1]) & big[1:bins // 2]
    found = np.nonzero(rising)[0]
    p = int(found[0]) + 1 if found.size else int(np.argmax(h[:max(2, int(0.35 * bins))]))
    if p > 0.08 * bins:
        # No dark peak: every non-padding pixel is object (a digital view whose air is the
        # constant padding value), so the level is the darkest of them.
        return lo
    x = np.arange(p, bins, dtype=np.float64)
    # Distance below the line from (p, h[p]) to (bins - 1, 0), times the line's length.
    below = (bins - 1 - p) * (h[p] - h[p:]) + (0.0 - h[p]) * (x - p)
    return float(edges[p + int(np.argmax(below)) + 1])


def _film_box(pad: np.ndarray) -> tuple[slice, slice]:
    """The film inside the padding: rows and columns at least 5 % non-padding."""
    field_ = ~pad
    rr = np.nonzero(field_.mean(axis=1) >= 0.05)[0]
    cc = np.nonzero(field_.mean(axis=0) >= 0.05)[0]
    if not rr.size or not cc.size:
        return slice(0, pad.shape[0]), slice(0, pad.shape[1])
    return slice(int(rr[0]), int(rr[-1]) + 1), slice(int(cc[0]), int(cc[-1]) + 1)


def _without_border_lines(fg: np.ndarray, band: float = 0.06, full: float = 0.9, thin: float = 0.03) -> np.ndarray:
    """``fg`` less thin runs (<= ``thin`` of the side) of nearly full (>= ``full``) rows or
    columns that start within ``band`` of an edge and are followed by a line at most 60 %
    full: film edges and collimator strips. A breast clipped by the frame makes a wide run or
    a gradual fall, not a thin strip with a step, and stays."""
    out = fg.copy()
    for axis in (0, 1):
        n = fg.shape[axis]
        share = fg.mean(axis=1 - axis)
        reach, widest = max(2, int(band * n)), max(2, int(thin * n))
        for order in (np.arange(n), np.arange(n)[::-1]):
            k = 0
            while k < reach:
                if share[order[k]] < full:
                    k += 1
                    continue
                j = k
                while j < n and share[order[j]] >= full:
                    j += 1
                # A strip stands apart from what lies inside it (a gap or a step down);
                # the breast's own chest-wall columns fall off gradually and stay.
                if j - k <= widest and (j >= n or share[order[j]] <= 0.6):
                    if axis == 0:
                        out[order[k:j]] = False
                    else:
                        out[:, order[k:j]] = False
                k = j
    return out


def _blob_boxes(labels: np.ndarray) -> list[tuple[int, slice, slice, int]]:
    """(label, row slice, column slice, pixel count) of each labelled component."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.GetImageFromArray(labels.astype(np.uint32)))
    out = []
    for lab in stats.GetLabels():
        c0, r0, w, h = stats.GetBoundingBox(lab)
        out.append((int(lab), slice(r0, r0 + h), slice(c0, c0 + w), int(stats.GetNumberOfPixels(lab))))
    return out


def _grown(rs: slice, cs: slice, by: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    return (slice(max(0, rs.start - by), min(shape[0], rs.stop + by)),
            slice(max(0, cs.start - by), min(shape[1], cs.stop + by)))


def _without_labels(small: np.ndarray, s: np.ndarray, fg: np.ndarray, level_bg: float, radius: int,
                    ignore: np.ndarray | None = None, sides: np.ndarray | None = None) -> np.ndarray:
    """``fg`` less labels and markers (step 4), each removed with a margin of ``radius``.

    A label is a bright blob (above the 99.5th percentile of ``fg`` and 0.85, closed with
    ``radius`` so a card split by its letters is one blob) of at most 2 % of the frame of which at least a tenth of the ring of width ``radius`` around it is dark:
    at most the background level or half the blob's level (film base or air beside the card,
    dark letters printed on it). Saturated dense tissue is ringed by tissue (mini-MIAS: the
    ring's 10th percentile >= 0.82, against <= 0.3 for its labels). Ring pixels in
    ``ignore`` (padding outside the film) do not count: a pectoral muscle running to the
    film's top edge meets them. Blobs reaching ``sides`` (the film's left and right edges,
    where the chest wall is) are tissue: bright pectoral muscle or dense tissue there meets
    the dark film edge, and a label is not printed over the chest wall.
    """
    values = s[fg]
    if values.size < 100:
        return fg
    level = max(0.85, float(np.quantile(values, 0.995)))
    # Unsmoothed: the median filter would round off a small marker's edge by a pixel.
    bright = (small >= level) & fg
    if not bright.any():
        return fg
    dark = s <= max(level_bg, 0.5 * level)
    # Closed first: the letters printed on a card split it into pieces, which are one label
    # (dilate then erode: merging is all it needs, at a tenth of the cost of the closing filter).
    bright = _disk(_disk(bright, radius, "dilate"), radius, "erode") & fg
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(bright.astype(np.uint8)), True))
    out = fg.copy()
    limit = 0.02 * fg.size
    for lab, rs, cs, n in _blob_boxes(labels):
        if n < 4 or n > limit:
            continue
        rs, cs = _grown(rs, cs, radius + 1, fg.shape)
        blob = labels[rs, cs] == lab
        if sides is not None and (blob & sides[rs, cs]).any():
            continue
        ring = _disk(blob, radius, "dilate") & ~blob
        if ignore is not None:
            ring &= ~ignore[rs, cs]
        if ring.any() and (ring & dark[rs, cs]).sum() >= 0.1 * ring.sum():
            # A margin of the ring's width only: skin markers flag palpable lumps, so the
            # breast next to one must stay in.
            out[rs, cs] &= ~_disk(blob, radius, "dilate")
    return out


def _chest_wall_component(core: np.ndarray, box: tuple[slice, slice], margin: int) -> np.ndarray:
    """The largest component of ``core`` touching the film's left or right side (within
    ``margin`` pixels), when it holds at least a quarter of the largest's area; else the largest."""
    if not core.any():
        return core
    labels = _components(core)
    rs, cs = box
    sides = np.zeros(core.shape, dtype=bool)
    sides[rs, cs.start:cs.start + margin] = True
    sides[rs, max(cs.start, cs.stop - margin):cs.stop] = True
    touching = np.unique(labels[sides & core])
    touching = touching[touching > 0]
    if touching.size:
        best = int(touching.min())  # labels are sorted by size
        if (labels == best).sum() >= 0.25 * (labels == 1).sum():
            return labels == best
    return labels == 1


def _problems(mask: np.ndarray, box: tuple[slice, slice], margin: int, strict: bool = False) -> tuple[list[str], float]:
    """Why ``mask`` (working grid) is not a plausible breast, and its share of the film.

    Always: it covers 2-96 % of the film, comes within ``2 * margin`` of the film's left or
    right side (the chest wall) over at least 10 % of its height and does not reach both
    (within ``margin``) over 90 %. ``strict``
    also asks that the side opposite the chest wall be touched over under half the mask's
    height: the film base taken for breast touches it over 74-100 % (mini-MIAS), a breast's
    curved skin line near its nipple over 15-35 % (a breast filling the film from side to
    side, mdb151, is rare and falls to the second level, which passes the plain check).
    """
    rs, cs = box
    film = mask[rs, cs]
    share = float(film.mean()) if film.size else 0.0
    found = []
    if share < MIN_FIELD_SHARE:
        found.append(f"covers {share:.1%} of the film (< {MIN_FIELD_SHARE:.0%})")
        return found, share
    if share > MAX_FIELD_SHARE:
        found.append(f"covers {share:.1%} of the film (> {MAX_FIELD_SHARE:.0%}): the whole frame")
    height = max(1, int(film.any(axis=1).sum()))
    left = film[:, :margin].any(axis=1).sum() / height
    right = film[:, -margin:].any(axis=1).sum() / height
    # Chest-wall contact within twice the margin: a scan may leave a dark strip of a few
    # per cent beside the chest wall (an INbreast thumbnail: 7 of 256 columns).
    wide = min(2 * margin, max(1, film.shape[1] // 4))
    near_left = film[:, :wide].any(axis=1).sum() / height
    near_right = film[:, -wide:].any(axis=1).sum() / height
    if max(near_left, near_right) < 0.1:
        found.append("touches neither the left nor the right side of the film (no chest wall)")
    if min(left, right) > 0.9:
        found.append("reaches both the left and the right side of the film over most of its height")
    elif strict and min(left, right) >= 0.5:
        found.append(f"reaches the side opposite the chest wall over {min(left, right):.0%} of its height")
    return found, share


def _mask_v3(small: np.ndarray) -> np.ndarray:
    """The previous method (MASK_VERSION 3): triangle over all pixels, largest component."""
    img = sitk.Median(sitk.GetImageFromArray(small), [1, 1])
    fg = sitk.GetArrayFromImage(sitk.TriangleThreshold(img, 0, 1)).astype(bool)
    rows, cols = fg.shape
    fr, fc = max(2, rows // 100), max(2, cols // 100)
    fg[:fr], fg[-fr:], fg[:, :fc], fg[:, -fc:] = False, False, False, False
    if not fg.any():
        return fg
    radius = max(2, max(small.shape) // 100)
    core = _largest(_disk(fg, radius, "open"))
    if not core.any():
        core = _largest(fg)
    return _without_markers(small, _fill(_largest(_disk(core, radius + 1, "dilate") & fg)), radius)


def _candidate(small: np.ndarray, s: np.ndarray, pad: np.ndarray, level: float, box: tuple[slice, slice],
               radius: int, margin: int) -> np.ndarray:
    """Steps 3-6 of the module docstring at background ``level``: the breast, working grid."""
    fg = s > level
    fr, fc = max(2, fg.shape[0] // 100), max(2, fg.shape[1] // 100)
    fg[:fr], fg[-fr:], fg[:, :fc], fg[:, -fc:] = False, False, False, False
    fg[box] = _without_border_lines(fg[box])
    outside = pad.copy()
    outside[box] = False
    sides = np.zeros_like(pad)
    sides[box[0], box[1].start:box[1].start + margin] = True
    sides[box[0], max(box[1].start, box[1].stop - margin):box[1].stop] = True
    fg = _without_labels(small, s, fg, level, radius, outside, sides)
    core = _chest_wall_component(_disk(fg, radius, "open"), box, margin)
    if not core.any():
        core = _largest(fg)
    breast = _fill(_largest(_disk(core, radius + 1, "dilate") & fg))
    return _without_markers(small, breast, radius)


def _to_grid(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` brought to ``shape`` by nearest neighbour: the same pixels as
    ``resize(..., mode="nearest") > 0.5`` (torch's float32 ``floor(dst * in / out)`` source
    indices, which never decrease), made by repeating each row and column as often as it is
    used (0 times for those a shrink skips): ~15x faster on a full-size image than the float
    round trip, either way."""
    out = np.asarray(mask, dtype=bool)
    for axis, (n, m) in enumerate(zip(shape, mask.shape)):
        idx = np.minimum(np.floor(np.arange(n, dtype=np.float32) * np.float32(m / n)).astype(np.int64), m - 1)
        out = np.repeat(out, np.bincount(idx, minlength=m), axis=axis)
    return out


def breast_mask_report(pixels: np.ndarray, max_side: int = 512, working: np.ndarray | None = None) -> MaskReport:
    """The breast mask of ``pixels`` with its checks and fallback (module docstring).

    Parameters
    ----------
    pixels
        ``(rows, columns)`` intensities in [0, 1], dense tissue bright, stored grid.
    max_side
        The mask is computed on a copy shrunk to at most this many pixels per side, then
        brought back (nearest neighbour).
    working
        That copy (:func:`working_copy` of ``pixels`` at ``max_side``) when the caller has it.

    Returns
    -------
    MaskReport
        ``mask`` is boolean ``(rows, columns)`` on the stored grid; all False when the image
        holds nothing but padding.
    """
    rows, cols = pixels.shape
    small = working_copy(pixels, max_side) if working is None else working
    s = sitk.GetArrayFromImage(sitk.Median(sitk.GetImageFromArray(small), [1, 1]))
    pad = s <= float(s.min()) + PAD_TOLERANCE
    if (~pad).sum() < 100:
        return MaskReport(np.zeros((rows, cols), dtype=bool), "breast", [], 0.0)
    box = _film_box(pad)
    radius = max(2, max(s.shape) // 100)
    fr, fc = max(2, s.shape[0] // 100), max(2, s.shape[1] // 100)
    margin = max(fc, int(0.02 * (box[1].stop - box[1].start))) + radius
    # Two background levels (step 2): over all pixels (the padding peak is the background:
    # right for digital air and clipped film scans, whose faint skin and glare sit just above
    # it) and over the film only (right where a film base lies between padding and breast).
    # The first is kept unless it took the film base for breast (strict check).
    levels = [_background_level(s.ravel()), _background_level(s[~pad])]
    found = []
    for level in levels:
        breast = _candidate(small, s, pad, level, box, radius, margin)
        problems, share = _problems(breast, box, margin, strict=True)
        if not problems:
            return MaskReport(_to_grid(breast, (rows, cols)),
                              "breast", [], share)
        found.append((breast, problems, share, level))
    # Neither passed the strict check: the film-only level when it passes the plain one (a
    # breast that fills the film, mini-MIAS mdb151), else the fallbacks.
    breast, problems, share, level = found[1]
    if not _problems(breast, box, margin)[0]:
        return MaskReport(_to_grid(breast, (rows, cols)),
                          "breast", [], share)
    problems = found[0][1]
    older = _mask_v3(small)
    if not _problems(older, box, margin)[0]:
        breast, method = older, "fallback-v3"
    else:
        film = np.zeros_like(pad)
        film[box] = ~pad[box]
        film[:fr], film[-fr:], film[:, :fc], film[:, -fc:] = False, False, False, False
        breast, method = _fill(_largest(_without_labels(small, s, film, level, radius))), "fallback-field"
    # No patient data: the reasons and the fallback only (the caller's job log names the image).
    _log.warning("breast mask implausible (%s); using %s", "; ".join(problems), method)
    mask = _to_grid(breast, (rows, cols))
    return MaskReport(mask, method, problems, share)


def breast_mask(pixels: np.ndarray, max_side: int = 512, working: np.ndarray | None = None) -> np.ndarray:
    """Boolean breast mask (skin line included) on the grid of ``pixels``.

    Parameters
    ----------
    pixels
        ``(rows, columns)`` intensities in [0, 1], dense tissue bright, stored grid.
    max_side
        The mask is computed on a copy shrunk to at most this many pixels per side, then
        brought back (nearest neighbour).
    working
        That copy (:func:`working_copy` of ``pixels`` at ``max_side``) when the caller has it.

    Returns
    -------
    numpy.ndarray
        Boolean ``(rows, columns)``; all False when no breast is found. The steps, checks and
        fallbacks are in the module docstring (:func:`breast_mask_report` says which was used).
    """
    return breast_mask_report(pixels, max_side, working).mask


def _without_markers(small: np.ndarray, breast: np.ndarray, radius: int) -> np.ndarray:
    """Remove near-saturated compact blobs in the breast's outer band (skin / nipple markers)."""
    values = small[breast]
    if values.size < 100:
        return breast
    # A marker is brighter than any tissue: above the 99.9th percentile of the breast and
    # near the top of the intensity range.
    level = max(0.95, float(np.quantile(values, 0.999)))
    bright = (small >= level) & breast
    if not bright.any():
        return breast
    band = breast & ~_disk(breast, 4 * radius, "erode")
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(bright.astype(np.uint8)), True))
    out = breast.copy()
    max_px = (6 * radius) ** 2
    for lab, rs, cs, n in _blob_boxes(labels):
        rs, cs = _grown(rs, cs, radius + 1, breast.shape)
        blob = labels[rs, cs] == lab
        if 2 <= n <= max_px and (blob & band[rs, cs]).sum() >= 0.5 * n:
            out[rs, cs] &= ~_disk(blob, radius, "dilate")
    return _largest(out)


def chest_wall_side(mask: np.ndarray) -> tuple[str, float]:
    """Which image side the chest wall is on, from the breast mask, and how sure that is.

    The breast's back edge (chest wall) is a straight, nearly vertical line: the per-row
    outermost mask column on that side hardly moves, while on the nipple side it traces the
    curved skin line. Film may be padded on both sides (mini-MIAS), so touching the image
    edge is not used. The side with the smaller spread (interquartile range over the mask's
    middle 80 % of rows) of its outermost columns is the chest wall; when the spreads are
    alike (confidence < 0.3), the half holding more breast.

    Returns
    -------
    tuple
        ``("left" | "right", confidence)``; confidence in [0, 1] is ``1 - small/large`` of
        the two spreads (0: no evidence either way).
    """
    mask = np.asarray(mask, dtype=bool)
    rr = np.nonzero(mask.any(axis=1))[0]
    if rr.size < 10:
        return "left", 0.0
    rr = rr[int(0.1 * rr.size): int(0.9 * rr.size)]
    # Every row of rr holds a mask pixel: argmax finds its first (and, reversed, its last).
    rows = mask[rr]
    first = np.argmax(rows, axis=1).astype(float)
    last = (mask.shape[1] - 1 - np.argmax(rows[:, ::-1], axis=1)).astype(float)
    spread_l = float(np.subtract(*np.percentile(first, [75, 25]))) + 1.0
    spread_r = float(np.subtract(*np.percentile(last, [75, 25]))) + 1.0
    confidence = float(1.0 - min(spread_l, spread_r) / max(spread_l, spread_r))
    if confidence >= 0.3:
        return ("left" if spread_l < spread_r else "right"), confidence
    # Both edges straight (a breast clipped by the frame on both sides) or both curved: the
    # chest-wall half holds more breast.
    half = mask.shape[1] // 2
    return ("right" if mask[:, half:].sum() > mask[:, :half].sum() else "left"), confidence


def pectoral_mask(pixels: np.ndarray, breast: np.ndarray, faces_left: bool, max_side: int = 512,
                  working: np.ndarray | None = None) -> np.ndarray:
    """The pectoral muscle of an MLO view: a triangle at the top chest-wall corner.

    Method (canonical orientation, chest wall at column 0; Kwok et al. style line estimate):
    for each row of the top 60 % of the breast, the smoothed intensity profile from the chest
    wall is searched, within the first 70 % of that row's breast width, for its steepest
    fall (the muscle's front edge is the strongest bright-to-dark step). A line
    ``col = a + b * row`` is fitted to those edges by least squares, twice dropping the 30 %
    farthest edges; the muscle is the breast behind the line. Rejected (all False) when the
    line does not slope towards the chest wall going down, or the triangle holds under 2 % or over 30 % of the breast, or the line meets the chest wall
    below 70 % of the breast's height.

    Parameters
    ----------
    pixels
        ``(rows, columns)`` intensities in [0, 1], dense tissue bright, stored grid.
    breast
        The breast mask of ``pixels`` (:func:`breast_mask`).
    faces_left
        True when the nipple points to column 0 (the chest wall is on the right).
    max_side
        Working size, as for :func:`breast_mask`.
    working
        :func:`working_copy` of ``pixels`` at ``max_side`` when the caller has it.

    Returns
    -------
    numpy.ndarray
        Boolean ``(rows, columns)`` on the stored grid, a subset of ``breast``.
    """
    rows, cols = pixels.shape
    small = working_copy(pixels, max_side) if working is None else working
    bm = _to_grid(breast, small.shape)  # = resize(breast, small.shape, mode="nearest") > 0.5
    if faces_left:
        small, bm = small[:, ::-1], bm[:, ::-1]
    empty = np.zeros((rows, cols), dtype=bool)
    rr = np.nonzero(bm.any(axis=1))[0]
    if rr.size < 20:
        return empty
    top, bottom = int(rr[0]), int(rr[-1])
    height = bottom - top + 1
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(small), 2.0))
    step = max(2, small.shape[1] // 100)
    er, ec = [], []
    for r in range(top, top + int(0.6 * height)):
        inside = np.nonzero(bm[r])[0]
        if inside.size < 4 * step:
            continue
        start = int(inside[0])
        stop = start + int(0.7 * (inside[-1] - start))
        prof = smooth[r, start:stop + step]
        if prof.size <= 2 * step:
            continue
        fall = prof[:-step] - prof[step:]
        k = int(np.argmax(fall))
        if fall[k] > 0.02:
            er.append(r)
            ec.append(start + k + step / 2)
    if len(er) < 10:
        return empty
    er_a, ec_a = np.asarray(er, float), np.asarray(ec, float)
    keep = np.ones(er_a.size, dtype=bool)
    for _ in range(2):
        b, a = np.polyfit(er_a[keep], ec_a[keep], 1)
        resid = np.abs(ec_a - (a + b * er_a))
        keep = resid <= np.quantile(resid, 0.7)
    b, a = np.polyfit(er_a[keep], ec_a[keep], 1)
    if b >= -0.1 or a + b * top <= 0:
        return empty
    # The line must meet the chest wall (column of the breast's back edge) in the top 70 %.
    back = float(np.median([np.nonzero(bm[r])[0][0] for r in rr]))
    if (back - a) / b > top + 0.7 * height:
        return empty
    yy, xx = np.mgrid[0:small.shape[0], 0:small.shape[1]]
    tri = (xx <= a + b * yy) & bm
    share = tri.sum() / max(bm.sum(), 1)
    if not 0.02 <= share <= 0.30:
        return empty
    if faces_left:
        tri = tri[:, ::-1]
    return _to_grid(tri, (rows, cols)) & np.asarray(breast, dtype=bool)


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's level of a 1-D sample in [0, 1] (between-class variance maximised)."""
    hist, edges = np.histogram(values, bins=bins, range=(float(values.min()), float(values.max()) + 1e-6))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0))
    between = np.nan_to_num(between)
    return float(centres[int(np.argmax(between))])
