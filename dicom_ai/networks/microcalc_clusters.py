"""Calcification clusters as a radiologist defines them, and their cluster-level scores.

The microcalcification cascade (:mod:`dicom_ai.networks.microcalc`) gives a calcification
probability per pixel of the 0.05 mm working grid. This module turns it into candidate
clusters and scores them:

* **calcifications**: connected components of ``probability >= threshold`` whose equivalent
  diameter lies in the BI-RADS range (``min_diameter_mm`` .. ``max_diameter_mm``, 0.1-1 mm:
  smaller is noise, larger is a vessel or a benign coarse calcification);
* **candidate clusters**: single-linkage groups (``link_mm``) of at least ``min_count`` of
  them (BI-RADS: >= 3-5 within about 1 cm^2);
* **cluster features** (:data:`FEATURES`): count, spread, probabilities, the individual
  calcifications' contrast over the local noise of the image, their size and shape;
* **cluster score**: a logistic model over those features (weights in the bundle's config,
  fitted by :mod:`dicom_ai.training.microcalc_clusters` on inserted clusters vs candidates on
  real normal backgrounds), or, without weights, the mean of the three highest
  calcification probabilities (the score of microcalc 0.1.0/0.2.0).

All coordinates are (row, column) pixels of the working grid unless stated; sizes in mm use
the working grid's pixel spacing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk

from dicom_ai.core.errors import ModelError

#: Side in working pixels (0.05 mm) of the image window around a calcification used for its
#: local background and noise (2 mm: wide enough to hold background, narrow enough to be local).
#: Other working grids use the same 2 mm (:func:`contrast_window`); this is the largest side.
WINDOW = 41
#: The contrast window's side in mm.
WINDOW_MM = 2.0
#: Smallest local noise (half an 8-bit grey level), so a flat background gives a finite ratio.
NOISE_FLOOR = 0.5 / 255

#: Cluster features, in the order of the logistic model's weights.
FEATURES = (
    "count",            # log(1 + number of calcifications)
    "density",          # log(calcifications per cm^2 of the group's hull area + 0.25 cm^2)
    "spread_mm",        # RMS distance of the calcifications from their centroid, mm
    "peak_top3",        # mean of the three highest calcification probabilities
    "peak_mean",        # mean calcification probability (peak per calcification)
    "cnr_top3",         # mean of the three highest contrast-to-noise ratios
    "cnr_median",       # median contrast-to-noise ratio
    "diameter_median",  # median equivalent diameter, mm
    "elongation_median",  # median elongation (1 = round) of the calcifications
    "noise",            # log of the median local background spread (image units)
)


@dataclass
class Calcification:
    """One connected component of the calcification map (working grid)."""

    centroid: tuple[float, float]
    peak: float
    pixels: np.ndarray  # (n, 2) int rows/cols
    contrast: float = 0.0
    noise: float = 0.0

    @property
    def area_px(self) -> int:
        return int(len(self.pixels))

    def diameter_mm(self, spacing_mm: float) -> float:
        """Equivalent-circle diameter in mm."""
        return 2.0 * math.sqrt(self.area_px / math.pi) * spacing_mm

    def elongation(self) -> float:
        """sqrt of the ratio of the principal second moments (1 for a disc)."""
        if self.area_px < 3:
            return 1.0
        ev = np.linalg.eigvalsh(np.cov(self.pixels.T.astype(np.float64)) + 1e-3 * np.eye(2))
        return float(math.sqrt(ev[1] / max(ev[0], 1e-3)))

    @property
    def cnr(self) -> float:
        return self.contrast / max(self.noise, 1e-4)


@dataclass
class ClusterConfig:
    """Cluster definition and cluster-level scoring (stored in the bundle's config).

    ``weights``/``bias``/``mean``/``std``: the logistic cluster model over :data:`FEATURES`
    (standardised by ``mean``/``std``); empty ``weights``: the score is the mean of the three
    highest calcification probabilities. ``margin_mm``: the cluster outline's margin around
    its calcifications.

    Operating points per pixel-size class: on an image whose source pixel spacing is at most
    ``sharp_max_spacing_mm`` (digital, high-resolution scans) the score is mapped through
    ``sharp_calibration`` (``{"raw": [...], "mapped": [...]}``, ascending, piecewise linear;
    fitted on validation backgrounds by
    :func:`dicom_ai.training.microcalc_clusters.spacing_calibration`) so that one threshold
    lets through about the same false clusters per image on sharp images as on film scans.
    """

    threshold: float = 0.5
    min_diameter_mm: float = 0.0
    max_diameter_mm: float = 10.0
    min_count: int = 3
    link_mm: float = 5.0
    weights: list[float] = field(default_factory=list)
    bias: float = 0.0
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    margin_mm: float = 0.5
    sharp_max_spacing_mm: float = 0.1
    sharp_calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights and not (len(self.weights) == len(self.mean) == len(self.std) == len(FEATURES)):
            raise ModelError(f"cluster model needs {len(FEATURES)} weights, means and deviations "
                             f"({', '.join(FEATURES)}); got {len(self.weights)}/{len(self.mean)}/{len(self.std)}")
        cal = self.sharp_calibration
        if cal and (len(cal.get("raw", ())) != len(cal.get("mapped", ())) or len(cal["raw"]) < 2
                    or np.any(np.diff(cal["raw"]) <= 0) or np.any(np.diff(cal["mapped"]) < 0)):
            raise ModelError("sharp_calibration needs ascending 'raw' and non-decreasing 'mapped' scores of equal length")
        if self.min_count < 1 or self.link_mm <= 0:
            raise ModelError(f"cluster min_count must be >= 1 and link_mm > 0, got {self.min_count}, {self.link_mm}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClusterConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def components(probability: np.ndarray, threshold: float, min_px: int = 1) -> list[Calcification]:
    """Connected components (8-connected) of ``probability >= threshold`` with ``min_px`` pixels or more."""
    binary = probability >= threshold
    if not binary.any():
        return []
    # Labelled on the set pixels' bounding box only (a 0.05 mm grid is ~9-16 M pixels).
    r_idx, c_idx = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
    r0, c0 = int(r_idx[0]), int(c_idx[0])
    box = (slice(r0, int(r_idx[-1]) + 1), slice(c0, int(c_idx[-1]) + 1))
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(binary[box].astype(np.uint8)), True))
    count = int(labels.max())
    flat = labels.ravel()
    nonzero = np.flatnonzero(flat)
    order = nonzero[np.argsort(flat[nonzero], kind="stable")]
    bounds = np.searchsorted(flat[order], np.arange(1, count + 2))
    cols = labels.shape[1]
    prob_box = probability[box].ravel()
    out = []
    for k in range(count):
        idx = order[bounds[k]:bounds[k + 1]]
        if len(idx) < min_px:
            continue
        rr, cc = np.divmod(idx, cols)
        rr, cc = rr + r0, cc + c0
        out.append(Calcification((float(rr.mean()), float(cc.mean())), float(prob_box[idx].max()),
                                 np.stack([rr, cc], axis=1)))
    return out


def contrast_window(spacing_mm: float = 0.05) -> int:
    """Side in working pixels of the :data:`WINDOW_MM` contrast window at ``spacing_mm`` mm per
    pixel (odd; 41 at 0.05 mm, 21 at 0.1 mm), never above :data:`WINDOW`."""
    return min(2 * int(round(WINDOW_MM / 2 / spacing_mm)) + 1, WINDOW)


def local_contrast(calcs: list[Calcification], image: np.ndarray, background: np.ndarray | None = None,
                   spacing_mm: float = 0.05) -> None:
    """Set each calcification's ``contrast`` (its brightest pixel minus the median of the
    background in a :data:`WINDOW_MM` window, :func:`contrast_window` pixels at ``spacing_mm``)
    and ``noise`` (robust standard deviation, 1.4826 * MAD, of that background: the local
    texture it has to stand out from).

    ``background`` (bool, image shape) marks the pixels that may serve as background (e.g.
    probability below the candidate floor); NaN pixels of ``image`` are never used (the
    offline dumps store the image only around candidates).
    """
    half = contrast_window(spacing_mm) // 2
    rows, cols = image.shape
    for c in calcs:
        r, k = int(round(c.centroid[0])), int(round(c.centroid[1]))
        r0, r1, c0, c1 = max(r - half, 0), min(r + half + 1, rows), max(k - half, 0), min(k + half + 1, cols)
        win = image[r0:r1, c0:c1].astype(np.float64)
        ok = np.isfinite(win)
        if background is not None:
            ok &= background[r0:r1, c0:c1]
        inside = np.zeros_like(ok)
        pr, pc = c.pixels[:, 0] - r0, c.pixels[:, 1] - c0
        keep = (pr >= 0) & (pr < win.shape[0]) & (pc >= 0) & (pc < win.shape[1])
        inside[pr[keep], pc[keep]] = True
        ok &= ~inside
        vals = win[inside & np.isfinite(win)]
        if ok.sum() < 20 or not len(vals):
            c.contrast, c.noise = 0.0, 1.0
            continue
        bg = win[ok]
        med = float(np.median(bg))
        c.contrast = float(vals.max() - med)
        # Texture, not pixel noise: an 8-bit film upsampled to the working grid has a
        # quantised high-pass; the spread of the background over 2 mm is what a calcification
        # has to stand out from. Floor: half an 8-bit grey level.
        c.noise = max(float(1.4826 * np.median(np.abs(bg - med))), NOISE_FLOOR)


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Monotone-chain convex hull of (n, 2) points, counter-clockwise, no repeats."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in pts[::-1]:
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def group_clusters(centroids_mm: np.ndarray, min_count: int = 3, link_mm: float = 5.0) -> list[np.ndarray]:
    """Single-linkage groups of calcifications: indices of each group of >= ``min_count``
    calcifications whose chain of neighbours is at most ``link_mm`` apart.

    A 5 mm link keeps three calcifications of a group within about 1 cm^2, the usual cluster
    definition.

    Parameters
    ----------
    centroids_mm
        (n, 2) calcification centroids as (row, column) in millimetres.
    min_count
        Smallest group returned.
    link_mm
        Largest distance in mm between two neighbours of a chain (Euclidean, inclusive).

    Returns
    -------
    list[numpy.ndarray]
        Index arrays into ``centroids_mm``, one per group.
    """
    n = len(centroids_mm)
    if n < min_count:
        return []
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pts = np.asarray(centroids_mm, dtype=np.float64)
    for i in range(n - 1):
        d = np.hypot(*(pts[i + 1:] - pts[i]).T)
        for j in np.flatnonzero(d <= link_mm) + i + 1:
            a, b = find(i), find(int(j))
            if a != b:
                parent[b] = a
    roots = np.array([find(i) for i in range(n)])
    groups = [np.flatnonzero(roots == r) for r in np.unique(roots)]
    return [g for g in groups if len(g) >= min_count]


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (n, 2) points, in the points' units squared (0 below three)."""
    h = convex_hull(points)
    if len(h) < 3:
        return 0.0
    return float(0.5 * abs(np.dot(h[:, 0], np.roll(h[:, 1], 1)) - np.dot(h[:, 1], np.roll(h[:, 0], 1))))


def cluster_features(calcs: list[Calcification], spacing_mm: float) -> np.ndarray:
    """The :data:`FEATURES` vector of one group of calcifications."""
    cen = np.array([c.centroid for c in calcs]) * spacing_mm
    peaks = np.sort([c.peak for c in calcs])[::-1]
    cnr = np.sort([c.cnr for c in calcs])[::-1]
    area_cm2 = _hull_area(cen) / 100.0
    spread = float(np.sqrt(((cen - cen.mean(0)) ** 2).sum(1).mean()))
    return np.array([
        math.log1p(len(calcs)),
        math.log(len(calcs) / (area_cm2 + 0.25)),
        spread,
        float(peaks[:3].mean()),
        float(peaks.mean()),
        float(np.clip(cnr[:3], -50, 50).mean()),
        float(np.clip(np.median(cnr), -50, 50)),
        float(np.median([c.diameter_mm(spacing_mm) for c in calcs])),
        float(np.median([c.elongation() for c in calcs])),
        math.log(max(float(np.median([c.noise for c in calcs])), 1e-4)),
    ])


def candidate_clusters(probability: np.ndarray, image: np.ndarray, spacing_mm: float, config: ClusterConfig,
                       background_floor: float = 0.2) -> list[tuple[list[Calcification], np.ndarray, float]]:
    """Candidate clusters of one working-grid map: (calcifications, features, score) each.

    ``probability`` and ``image`` share the working grid (``spacing_mm`` per pixel); the
    image's NaN pixels are ignored (offline dumps); pixels with probability >= ``background_floor``
    are never background for the contrast.
    """
    calcs = [c for c in components(probability, config.threshold)
             if config.min_diameter_mm <= c.diameter_mm(spacing_mm) <= config.max_diameter_mm]
    if len(calcs) < config.min_count:
        return []
    groups = group_clusters(np.array([c.centroid for c in calcs]) * spacing_mm, config.min_count, config.link_mm)
    if not groups:
        return []
    members = [calcs[i] for g in groups for i in g]
    local_contrast(members, image, probability < background_floor, spacing_mm)
    out = []
    for g in groups:
        group = [calcs[i] for i in g]
        f = cluster_features(group, spacing_mm)
        out.append((group, f, cluster_score(f, config)))
    return out


def calibrated(score: float, spacing_mm: float, config: ClusterConfig) -> float:
    """The cluster score an image of source pixel spacing ``spacing_mm`` (mm) reports: mapped
    through ``config.sharp_calibration`` when the image is sharp (see :class:`ClusterConfig`)."""
    cal = config.sharp_calibration
    if not cal or spacing_mm > config.sharp_max_spacing_mm:
        return float(score)
    return float(np.interp(score, cal["raw"], cal["mapped"]))


def cluster_score(features: np.ndarray, config: ClusterConfig) -> float:
    """The cluster model's probability (or, without weights, the mean of the top-3 peaks)."""
    if not config.weights:
        return float(features[FEATURES.index("peak_top3")])
    z = (np.asarray(features) - np.asarray(config.mean)) / np.maximum(np.asarray(config.std), 1e-6)
    return float(1.0 / (1.0 + math.exp(-(float(np.dot(z, config.weights)) + config.bias))))
