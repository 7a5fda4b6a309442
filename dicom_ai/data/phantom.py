"""Phantom screening mammography studies with pixel ground truth.

``generate_study(seed)`` returns four views (L-CC, L-MLO, R-CC, R-MLO) of one synthetic
patient, each as an uncompressed DICOM MG data set plus boolean ground-truth masks on the
stored pixel grid. Everything is deterministic for a seed.

Model (all lengths in mm at the detector plane):

* Breast outline: a super-ellipse in polar coordinates around the chest-wall centre, with
  smooth random perturbations; a nipple at the tip; a thin, brighter skin; an intensity
  fall-off near the edge where the compressed breast gets thinner (thickness profile of a
  rounded edge of radius about half the compressed thickness). MLO views add the pectoral
  muscle (a bright, slightly convex triangle at the chest wall, top) and the axillary tail.
* Fibroglandular tissue: a Gaussian random field with a power-law spectrum 1/f^beta
  (beta = 3 by default, as measured on real mammograms), soft-thresholded to the glandular
  fraction of the BI-RADS density category (a: fatty ... d: extremely dense), inside an
  envelope that leaves subcutaneous and retro-mammary fat, with mottle inside; a band-passed
  second field gives dark fat lobules; a third field, generated on a polar canvas around the
  nipple and stretched along the radius, gives fibrous strands/ducts converging on the nipple.
  Presentation processing adds unsharp masking (~3 mm) and a soft highlight shoulder.
* Findings are placed in 3-D breast coordinates (depth behind the nipple, lateral, superior)
  and projected into CC (rows ~ lateral) and MLO (rows ~ superior and lateral at 45 degrees),
  so each appears in both views of its breast at consistent depth and size.
  Benign masses: round/oval, circumscribed (sharp margin), some lobulated. Malignant masses:
  irregular with ill-defined margin, or spiculated. Calcification clusters: 5-30 specks
  within about 1 cm; benign round/punctate (0.2-0.5 mm), malignant fine pleomorphic or fine
  linear/branching along a duct (0.1-0.5 mm, elongated, variable). Benign breasts may also
  hold isolated coarse macrocalcifications (1.5-3.5 mm).
* Image formation: a processed (For Presentation) look with dense tissue bright; For
  Processing gives the thickness-dependent, lower-contrast log signal without peripheral
  equalisation. MONOCHROME1 stores the inverted values.

Stored orientation is that of real modalities: L views face right (chest wall at column 0,
Patient Orientation A\\R for CC, A\\F for MLO), R views face left (chest wall at the last
column, P\\L and P\\F). Full size is (3328, 2560) at 0.07 mm; any other shape covers the
same physical field at spacing ``0.07 * 3328 / rows`` (square pixels).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from dicom_ai.data.mg import mg_dataset
from dicom_ai.data.sample import MASK_KEYS
from dicom_ai.imaging import resize

__all__ = ["PhantomImage", "PhantomStudy", "generate_study", "MASK_KEYS", "FULL_SHAPE", "FULL_SPACING_MM",
           # Lesion models, reused by dicom_ai.data.insertion to put lesions into real images.
           "Finding", "mass_design", "mass_radius_mm", "mass_conspicuity", "render_mass", "cluster_design",
           "cluster_specks", "draw_cluster", "power_law_field"]

FULL_SHAPE = (3328, 2560)
FULL_SPACING_MM = 0.07
VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
#: Mean glandular fraction inside the glandular envelope per BI-RADS density category.
DENSITY_FRACTION = {"a": 0.10, "b": 0.28, "c": 0.52, "d": 0.78}
DENSITY_PRIOR = {"a": 0.10, "b": 0.40, "c": 0.40, "d": 0.10}
NORMAL_SHARE = 0.35
#: Calibrated mass sizes (see :func:`mass_radius_mm`).
MASS_DIAMETER_MEDIAN_MM = 11.4
MASS_DIAMETER_LOG_SD = 0.5
MASS_DIAMETER_RANGE_MM = (5.0, 30.0)
_STANDARD_NORMAL = statistics.NormalDist()
#: Share of masses drawn at the base contrast (subtle), and the contrast factor of the others.
SUBTLE_MASS_SHARE = 0.25
MASS_CONTRAST = 2.0


@dataclass
class Finding:
    """One finding in 3-D breast coordinates (mm): depth behind the nipple, lateral, superior."""

    kind: str  # 'mass', 'cluster' or 'macrocalcification'
    malignant: bool
    shape: str  # round, oval, lobulated, irregular, spiculated, punctate, pleomorphic, linear, coarse
    size_mm: float  # mass radius, cluster radius, or macrocalcification diameter
    depth_mm: float
    lateral_mm: float
    superior_mm: float
    seed: int
    # Cluster specks: (n, 3) offsets in mm (depth, lateral, superior) and (n, 2) sizes (length, width).
    speck_offsets: np.ndarray | None = None
    speck_sizes: np.ndarray | None = None


@dataclass
class PhantomImage:
    """One view of a phantom study; masks and ``pixels`` are on the stored pixel grid."""

    dataset: pydicom.Dataset
    laterality: str
    view: str
    masks: dict[str, np.ndarray]
    breast_mask: np.ndarray
    labels: dict[str, bool]
    spacing_mm: float
    pixels: np.ndarray  # float32 [0, 1], dense bright, before quantisation
    findings: list[dict] = field(default_factory=list)


@dataclass
class PhantomStudy:
    """Four views and the breast-level labels of one synthetic patient."""

    seed: int
    density: str
    normal: bool
    images: list[PhantomImage]
    breast_labels: dict[str, dict[str, bool]]
    findings: dict[str, list[Finding]]

    def image(self, laterality: str, view: str) -> PhantomImage:
        for im in self.images:
            if im.laterality == laterality and im.view == view:
                return im
        raise KeyError(f"{laterality}-{view}")


# --------------------------------------------------------------------------- geometry


@dataclass
class _Outline:
    """Polar super-ellipse outline of one view, canonical orientation, mm."""

    center_row: float  # chest-wall centre (row, mm); column 0 is the chest wall
    depth: float  # extent along theta = 0 (towards the nipple)
    up: float  # extent towards row 0 (lateral on CC, superior/axilla on MLO)
    down: float
    power: float
    harmonics: np.ndarray  # (k, amplitude, phase)
    nipple_theta: float
    pectoral: tuple[float, float, float] | None = None  # width at top, height at chest wall, convexity

    def radius(self, theta: np.ndarray) -> np.ndarray:
        theta = np.asarray(theta, dtype=np.float32)
        c, s = np.abs(np.cos(theta)), np.abs(np.sin(theta))
        semi = np.where(theta < 0, np.float32(self.up), np.float32(self.down))
        p = float(self.power)
        r = ((c / float(self.depth)) ** p + (s / semi) ** p) ** (-1.0 / p)
        pert = np.ones_like(theta)
        for k, a, ph in self.harmonics:
            pert = pert + float(a) * np.cos(float(k) * theta + float(ph))
        return (r * pert).astype(np.float32)

    def nipple(self) -> tuple[float, float]:
        r = float(self.radius(np.array([self.nipple_theta]))[0])
        return (self.center_row + r * math.sin(self.nipple_theta), r * math.cos(self.nipple_theta))

    def edge_distance(self, row_mm: float, col_mm: float) -> float:
        """Radial distance inside the outline (negative outside)."""
        th = math.atan2(row_mm - self.center_row, max(col_mm, 1e-6))
        r = math.hypot(row_mm - self.center_row, col_mm)
        return float(self.radius(np.array([th]))[0]) - r if col_mm >= 0 else -1.0

    def in_pectoral(self, row_mm: float, col_mm: float, margin: float = 0.0) -> bool:
        if self.pectoral is None:
            return False
        w, h, q = self.pectoral
        return (max(col_mm, 0.0) / (w + margin)) ** q + row_mm / (h + margin) < 1.0


@dataclass
class _Breast:
    laterality: str
    cc: _Outline
    mlo: _Outline
    thickness: float
    findings: list[Finding]


def _outline(rng: np.random.Generator, field_h: float, view: str, depth: float, scale: float) -> _Outline:
    harmonics = np.array([(k, rng.normal(0, 0.025 / k), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)])
    if view == "CC":
        center = field_h * rng.uniform(0.46, 0.54)
        up = min(scale * rng.uniform(0.9, 1.1), center + 30)
        down = min(scale * rng.uniform(0.9, 1.1), field_h - center + 30)
        return _Outline(center, depth, up, down, rng.uniform(1.35, 1.75), harmonics, rng.uniform(-0.06, 0.06))
    center = field_h * rng.uniform(0.50, 0.60)
    up = center + rng.uniform(25, 60)  # the axillary tail leaves the top of the image
    down = min(field_h - center - rng.uniform(3, 25), scale * 1.1)
    out = _Outline(center, depth, up, down, rng.uniform(1.8, 2.2), harmonics, rng.uniform(0.0, 0.12))
    # Pectoral muscle: width at the top edge must stay inside the breast outline there.
    top_theta = np.linspace(-1.55, 0, 400)
    rr = out.radius(top_theta)
    rows = center + rr * np.sin(top_theta)
    cols = rr * np.cos(top_theta)
    i = int(np.argmin(np.abs(rows)))
    top_width = float(cols[i]) if rows.min() < 0 else depth * 0.3
    width = min(top_width * rng.uniform(0.55, 0.8), depth * 0.55)
    height = center * rng.uniform(0.75, 1.15)
    out.pectoral = (width, height, rng.uniform(1.1, 1.6))
    return out


def _new_breast(rng: np.random.Generator, laterality: str, field_h: float, field_w: float) -> _Breast:
    depth_cc = rng.uniform(0.36, 0.58) * field_w
    scale = rng.uniform(0.40, 0.55) * field_h
    cc = _outline(rng, field_h, "CC", depth_cc, scale)
    mlo = _outline(rng, field_h, "MLO", min(depth_cc * rng.uniform(1.05, 1.2), 0.8 * field_w), scale)
    return _Breast(laterality, cc, mlo, rng.uniform(35, 70), [])


def _project(breast: _Breast, view: str, depth: float, lateral: float, superior: float) -> tuple[float, float]:
    """Breast coordinates (mm) -> canonical (row, col) in mm of ``view``."""
    if view == "CC":
        nr, nc = breast.cc.nipple()
        return nr - lateral, nc - depth
    nr, nc = breast.mlo.nipple()
    k = breast.mlo.depth / breast.cc.depth
    return nr - 0.7071 * (superior + lateral), nc - depth * k


# --------------------------------------------------------------------------- findings


def _place(rng: np.random.Generator, breast: _Breast, radius: float) -> tuple[float, float, float]:
    """Rejection-sample a point that lies inside the breast in both views, clear of skin and muscle."""
    margin = max(4.0, radius + 2.0)
    for _ in range(2000):
        depth = rng.uniform(0.12, 0.85) * breast.cc.depth
        lateral = rng.uniform(-breast.cc.down, breast.cc.up) * 0.8
        superior = rng.uniform(-breast.mlo.down, breast.mlo.down) * 0.8
        ok = True
        for view, outline in (("CC", breast.cc), ("MLO", breast.mlo)):
            r, c = _project(breast, view, depth, lateral, superior)
            if outline.edge_distance(r, c) < margin or c < margin or outline.in_pectoral(r, c, radius + 3):
                ok = False
                break
        if ok:
            return depth, lateral, superior
    raise RuntimeError("could not place a finding inside the breast; phantom geometry is degenerate")


def mass_radius_mm(u: float) -> float:
    """Mass radius (mm) at quantile ``u`` of the calibrated size distribution.

    Log-normal in diameter, median :data:`MASS_DIAMETER_MEDIAN_MM`, log-sd
    :data:`MASS_DIAMETER_LOG_SD`, clipped to :data:`MASS_DIAMETER_RANGE_MM`: the hand-drawn
    mini-MIAS mass outlines (58 masses, 200 um pixels) have equivalent diameters of 7.1 /
    11.4 / 28.6 mm at the 10th / 50th / 90th percentile (benchmarks/bench_glam_learnability.py
    measures both populations side by side).
    """
    diameter = MASS_DIAMETER_MEDIAN_MM * math.exp(MASS_DIAMETER_LOG_SD * _STANDARD_NORMAL.inv_cdf(min(max(u, 1e-6), 1 - 1e-6)))
    return float(np.clip(diameter, *MASS_DIAMETER_RANGE_MM)) / 2.0


def mass_conspicuity(finding_seed: int) -> float:
    """Contrast factor of one mass: 1 for the subtle share, :data:`MASS_CONTRAST` for the others.

    Drawn from the finding's own seed, so both views of a mass agree and the other
    findings' draws do not move. At factor 1 most masses could not be told from the
    fibroglandular texture at 0.525 mm even with pixel supervision (image AUC 0.68 after
    three epochs, benchmarks/bench_glam_learnability.py), while every mini-MIAS mass was seen
    and outlined by a radiologist; :data:`SUBTLE_MASS_SHARE` of them stay at factor 1.
    """
    subtle = np.random.default_rng([int(finding_seed), 0x5B7]).random() < SUBTLE_MASS_SHARE
    return 1.0 if subtle else MASS_CONTRAST


def mass_design(rng: np.random.Generator, malignant: bool) -> tuple[str, float]:
    """Shape and radius (mm) of one mass drawn from the phantom's population.

    Malignant: spiculated (55 %) or irregular; benign: round, oval or lobulated (2:2:1).
    Radius from :func:`mass_radius_mm` (fitted to the mini-MIAS outlines). Two draws of ``rng``.
    """
    # One uniform draw per size, as before the calibration, so the seeds of studies without
    # masses still give the same pixels.
    if malignant:
        shape = "spiculated" if rng.random() < 0.55 else "irregular"
    else:
        shape = rng.choice(["round", "oval", "oval", "round", "lobulated"])
    return str(shape), mass_radius_mm(float(rng.random()))


def _mass(rng: np.random.Generator, breast: _Breast, malignant: bool) -> Finding:
    shape, radius = mass_design(rng, malignant)
    d, l, s = _place(rng, breast, radius)
    return Finding("mass", malignant, shape, radius, d, l, s, int(rng.integers(2**31)))


def cluster_design(rng: np.random.Generator, malignant: bool) -> tuple[str, int, float]:
    """Morphology, number of specks and radius (mm) of one calcification cluster.

    Malignant: fine linear/branching (45 %) or fine pleomorphic, 8-30 specks within 2.5-5 mm;
    benign: punctate, 5-15 specks within 3-5 mm.
    """
    if malignant:
        shape = "linear" if rng.random() < 0.45 else "pleomorphic"
        n = int(rng.integers(8, 31))
        radius = rng.uniform(2.5, 5.0)
    else:
        shape = "punctate"
        n = int(rng.integers(5, 16))
        radius = rng.uniform(3.0, 5.0)
    return shape, n, float(radius)


def cluster_specks(rng: np.random.Generator, shape: str, n: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Speck positions and sizes of a cluster of :func:`cluster_design`.

    Returns ``(offsets, sizes)``: (n, 3) float32 offsets in mm (depth, lateral, superior) from
    the cluster centre, all within ``radius``, and (n, 2) float32 (length, width) in mm.
    Linear clusters lie along one or two branches of a duct running towards the nipple.
    """
    if shape == "linear":
        # Specks along one or two branches of a duct running roughly towards the nipple.
        branches = 1 + int(rng.random() < 0.6)
        offs = []
        for b in range(branches):
            direction = np.array([1.0, rng.normal(0, 0.5), rng.normal(0, 0.5)])
            direction /= np.linalg.norm(direction)
            t = rng.uniform(-radius, radius, size=n // branches + (n % branches if b == 0 else 0))
            offs.append(t[:, None] * direction[None] + rng.normal(0, 0.25, size=(t.size, 3)))
        offsets = np.concatenate(offs)
        lengths = rng.uniform(0.25, 0.9, size=n)
        widths = rng.uniform(0.1, 0.25, size=n)
    elif shape == "pleomorphic":
        offsets = rng.normal(0, radius / 2.0, size=(n, 3))
        lengths = rng.uniform(0.15, 0.6, size=n)
        widths = lengths * rng.uniform(0.4, 1.0, size=n)
    else:
        offsets = rng.normal(0, radius / 2.0, size=(n, 3))
        lengths = rng.uniform(0.25, 0.5, size=n)
        widths = lengths * rng.uniform(0.85, 1.0, size=n)
    # Keep every speck within the cluster radius (about 1 cm across at most).
    norm = np.linalg.norm(offsets, axis=1, keepdims=True)
    offsets = np.where(norm > radius, offsets * radius / np.maximum(norm, 1e-6), offsets)
    return offsets.astype(np.float32), np.stack([lengths, widths], 1).astype(np.float32)


def _cluster(rng: np.random.Generator, breast: _Breast, malignant: bool) -> Finding:
    shape, n, radius = cluster_design(rng, malignant)
    d, l, s = _place(rng, breast, radius)
    offsets, sizes = cluster_specks(rng, shape, n, radius)
    return Finding("cluster", malignant, shape, radius, d, l, s, int(rng.integers(2**31)), offsets, sizes)


def _macro(rng: np.random.Generator, breast: _Breast) -> Finding:
    size = rng.uniform(1.5, 3.5)
    d, l, s = _place(rng, breast, size)
    return Finding("macrocalcification", False, "coarse", size, d, l, s, int(rng.integers(2**31)))


def _findings_for(rng: np.random.Generator, breast: _Breast, kind: str) -> list[Finding]:
    """kind: 'normal', 'benign' or 'malignant' (a malignant breast may also hold benign findings)."""
    out: list[Finding] = []
    if kind == "normal":
        return out
    if kind == "malignant":
        out.append(_mass(rng, breast, True) if rng.random() < 0.55 else _cluster(rng, breast, True))
        if rng.random() < 0.2:
            out.append(_mass(rng, breast, False) if rng.random() < 0.6 else _cluster(rng, breast, False))
        return out
    n = 1 + int(rng.random() < 0.3)
    for _ in range(n):
        u = rng.random()
        out.append(_mass(rng, breast, False) if u < 0.5 else _cluster(rng, breast, False) if u < 0.8 else _macro(rng, breast))
    return out


# --------------------------------------------------------------------------- rendering


def _spectrum(rng: np.random.Generator, fy: np.ndarray, fx: np.ndarray, beta: float, f_low: float,
              f_high_pass: float | None, f_low_pass: float | None) -> np.ndarray:
    """Random half-plane spectrum with amplitude ~ f^(-beta/2), optionally band-limited (Gaussian edges)."""
    f2 = fy * fy + fx * fx
    amp = (f2 + np.float32(f_low * f_low)) ** np.float32(-beta / 4.0)
    if f_high_pass is not None:
        amp = amp * (1.0 - np.exp(-f2 / np.float32(f_high_pass**2)))
    if f_low_pass is not None:
        amp = amp * np.exp(-f2 / np.float32(f_low_pass**2))
    spec = (rng.standard_normal(amp.shape, dtype=np.float32)
            + 1j * rng.standard_normal(amp.shape, dtype=np.float32)).astype(np.complex64)
    spec *= amp
    spec[0, 0] = 0
    return spec


def _unit(a: np.ndarray) -> np.ndarray:
    a -= a.mean()
    a /= max(float(a.std()), 1e-12)
    return a


def power_law_field(rng: np.random.Generator, shape: tuple[int, int], spacing: float, beta: float,
                     f_low: float = 1 / 80.0, f_high_pass: float | None = None,
                     f_low_pass: float | None = None) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian field with power spectrum ~ 1/f^beta (f in cycles/mm).

    Generated directly in the frequency domain (one inverse real FFT), float32. ``f_low`` rolls
    the spectrum off below that frequency; the pass arguments band-limit it.
    """
    fy = np.fft.fftfreq(shape[0], d=spacing).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1], d=spacing).astype(np.float32)[None, :]
    spec = _spectrum(rng, fy, fx, beta, f_low, f_high_pass, f_low_pass)
    return _unit(np.fft.irfft2(spec, s=shape).astype(np.float32))


def _smoothstep(x: np.ndarray, a: float, b: float) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _rotate(dr: np.ndarray, dc: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * dr - s * dc, s * dr + c * dc


def render_mass(f: Finding, center: tuple[float, float], spacing: float, shape: tuple[int, int],
                angle: float) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Relative density (thickness) profile and mask of a mass, in a local window.

    ``f`` gives the shape (round, oval, lobulated, irregular, spiculated), radius
    ``f.size_mm`` and ``f.seed`` (the outline: margins, lobes, spicules); ``center`` is the
    centre (row, column) in mm from the grid's top-left corner, ``spacing`` the square pixel
    size (mm), ``shape`` the grid, ``angle`` the in-plane rotation (radians). Returns
    ``(window, density, mask)``: slices of the grid, float32 density in [0, 1] (1 at the
    thickest point; spicules included) and the boolean mass region (spicules excluded), or
    None when the window is off the grid.
    """
    srng = np.random.default_rng(f.seed)  # shape is the same in both views
    R = f.size_mm
    if f.shape == "round":
        aspect, harm, blur = srng.uniform(0.85, 1.0), 0.015, 0.15
    elif f.shape == "oval":
        aspect, harm, blur = srng.uniform(0.55, 0.8), 0.015, 0.15
    elif f.shape == "lobulated":
        aspect, harm, blur = srng.uniform(0.65, 0.9), 0.06, 0.2
    elif f.shape == "irregular":
        aspect, harm, blur = srng.uniform(0.6, 1.0), 0.16, 0.6
    else:  # spiculated
        aspect, harm, blur = srng.uniform(0.75, 1.0), 0.09, 0.6
    ks = np.arange(2, 9)
    amps = srng.normal(0, harm, size=ks.size) / np.sqrt(ks / 2.0)
    if f.shape == "lobulated":
        amps[1:3] += harm  # a few broad lobes
    phases = srng.uniform(0, 2 * np.pi, size=ks.size)
    n_spic = int(srng.integers(10, 26)) if f.shape == "spiculated" else 0
    spic_ang = srng.uniform(0, 2 * np.pi, size=n_spic)
    spic_len = R * srng.uniform(1.0, 2.5, size=n_spic)
    spic_w = srng.uniform(0.35, 0.8, size=n_spic)

    reach = R * (1 + 4 * abs(harm)) + (spic_len.max(initial=0) + R) + 3 * blur + 1
    r0, c0 = center[0] / spacing, center[1] / spacing
    half = int(math.ceil(reach / spacing)) + 1
    ra, rb = max(int(r0) - half, 0), min(int(r0) + half + 1, shape[0])
    ca, cb = max(int(c0) - half, 0), min(int(c0) + half + 1, shape[1])
    if ra >= rb or ca >= cb:
        return None
    dr = ((np.arange(ra, rb, dtype=np.float32) + 0.5) * spacing - center[0])[:, None]
    dc = ((np.arange(ca, cb, dtype=np.float32) + 0.5) * spacing - center[1])[None, :]
    u, v = _rotate(dr, dc, angle)
    u = u / aspect
    r = np.sqrt(u * u + v * v)
    phi = np.arctan2(u, v)
    pert = np.ones_like(phi)
    for k, a, p in zip(ks, amps, phases):
        pert += a * np.cos(k * phi + p)
    boundary = R * np.maximum(pert, 0.5)
    # Ellipsoid-like thickness through the mass, edge sharpness set by the margin type.
    edge = boundary - r
    core = np.sqrt(np.clip(1 - (r / (boundary + 1e-6)) ** 2, 0, 1))
    sharp = 1.0 / (1.0 + np.exp(np.clip(-edge / max(blur, spacing * 0.5), -60, 60)))
    density = (0.55 * core + 0.45) * sharp
    mask = edge > 0
    for a, L, w in zip(spic_ang, spic_len, spic_w):
        # A tapering line from inside the mass outwards.
        ex, ey = math.cos(a), math.sin(a)
        start = 0.6 * R
        t = (v * ex + u * aspect * ey - start)
        d = np.abs(-v * ey + u * aspect * ex)
        tt = np.clip(t / L, 0, 1)
        width = w * (1 - 0.8 * tt) + 0.5 * spacing
        line = np.exp(-(d / width) ** 2) * (1 - tt) * ((t > 0) & (t < L))
        density = np.maximum(density, 0.9 * line)
    return (slice(ra, rb), slice(ca, cb)), density.astype(np.float32), mask


def _render_ellipse(out: np.ndarray, center: tuple[float, float], length: float, width: float,
                    angle: float, spacing: float, value: float) -> tuple[int, int, np.ndarray, tuple[slice, slice]] | None:
    """Add a speck (filled ellipse, mm) with area-weighted coverage to ``out``; return its coverage."""
    half = int(math.ceil((length / 2 + spacing) / spacing)) + 1
    r0, c0 = int(center[0] / spacing), int(center[1] / spacing)
    ra, rb = max(r0 - half, 0), min(r0 + half + 1, out.shape[0])
    ca, cb = max(c0 - half, 0), min(c0 + half + 1, out.shape[1])
    if ra >= rb or ca >= cb:
        return None
    sub = 5
    offs = (np.arange(sub, dtype=np.float32) + 0.5) / sub
    rr = ((np.arange(ra, rb, dtype=np.float32)[:, None] + offs[None, :]).reshape(-1) * spacing - center[0])
    cc = ((np.arange(ca, cb, dtype=np.float32)[:, None] + offs[None, :]).reshape(-1) * spacing - center[1])
    u, v = _rotate(rr[:, None], cc[None, :], angle)
    inside = (u / (length / 2)) ** 2 + (v / (width / 2)) ** 2 <= 1.0
    cover = inside.reshape(rb - ra, sub, cb - ca, sub).mean(axis=(1, 3)).astype(np.float32)
    window = (slice(ra, rb), slice(ca, cb))
    out[window] += value * cover  # attenuation of overlapping specks adds up
    return r0, c0, cover, window


def draw_cluster(image: np.ndarray, speck_mask: np.ndarray, cluster_mask: np.ndarray, center: tuple[float, float],
                 offsets_rc: np.ndarray, sizes: np.ndarray, shape: str, malignant: bool, spacing: float,
                 rng: np.random.Generator, gain: float = 1.0) -> int | None:
    """Draw the specks of a calcification cluster into ``image`` and its ground truth into the masks.

    ``center`` is the cluster centre (row, column) in mm from the grid's top-left corner,
    ``offsets_rc`` (n, 2) the projected speck offsets in mm, ``sizes`` (n, 2) their length and
    width in mm (:func:`cluster_specks`), ``shape`` the morphology (linear specks are turned
    along the cluster's main axis), ``spacing`` the square pixel size in mm. Each speck adds
    its area-weighted coverage times a value in 0.45-0.75 (malignant) or 0.5-0.6 (benign)
    times ``gain`` (presentation units); ``speck_mask`` gets every speck (coverage >= 0.5 and
    its centre pixel), ``cluster_mask`` the convex hull of the speck centres grown by 1 mm.
    Returns the number of cluster-region pixels added, or None when no speck fell on the grid.
    """
    rows, cols = image.shape
    pr, pc = offsets_rc[:, 0], offsets_rc[:, 1]
    centers = []
    for i in range(len(offsets_rc)):
        pos = (center[0] + float(pr[i]), center[1] + float(pc[i]))
        if shape == "linear":
            # Linear specks lie along their duct: orient them along the cluster's main axis.
            a = math.atan2(float(pr[i] - pr.mean()), float(pc[i] - pc.mean()) + 1e-6) + rng.normal(0, 0.3)
        else:
            a = rng.uniform(0, np.pi)
        value = (0.45 + 0.3 * rng.random()) if malignant else (0.5 + 0.1 * rng.random())
        res = _render_ellipse(image, pos, float(sizes[i, 0]), float(sizes[i, 1]), a, spacing, value * gain)
        if res is None:
            continue
        r0, c0, cover, window = res
        if 0 <= r0 < rows and 0 <= c0 < cols:
            speck_mask[r0, c0] = True  # every speck marks its centre pixel
        speck_mask[window] |= cover >= 0.5
        centers.append((pos[0] / spacing, pos[1] / spacing))
    if not centers:
        return None
    before = cluster_mask.sum()
    _cluster_region(cluster_mask, np.array(centers), max(1.0 / spacing, 1.0))
    return int(cluster_mask.sum() - before)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Monotone-chain convex hull of (n, 2) points, counter-clockwise."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) <= 2:
        return np.array(pts, dtype=np.float64)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _cluster_region(mask: np.ndarray, centers_px: np.ndarray, margin_px: float) -> None:
    """Set ``mask`` on the convex hull of the speck centres grown by ``margin_px``."""
    lo = np.floor(centers_px.min(0) - margin_px - 1).astype(int)
    hi = np.ceil(centers_px.max(0) + margin_px + 2).astype(int)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, mask.shape)
    if np.any(hi <= lo):
        return
    rr = np.arange(lo[0], hi[0])[:, None] + 0.5
    cc = np.arange(lo[1], hi[1])[None, :] + 0.5
    region = np.zeros((hi[0] - lo[0], hi[1] - lo[1]), dtype=bool)
    hull = _convex_hull(centers_px)
    if len(hull) >= 3:
        inside = np.ones_like(region)
        for i in range(len(hull)):
            a, b = hull[i], hull[(i + 1) % len(hull)]
            # Counter-clockwise hull: interior points lie left of every edge (cross product >= 0).
            inside &= (b[0] - a[0]) * (cc - a[1]) - (b[1] - a[1]) * (rr - a[0]) >= 0
        region |= inside
        # Grow by the margin: distance to each hull edge.
        for i in range(len(hull)):
            a, b = hull[i], hull[(i + 1) % len(hull)]
            ab = b - a
            t = np.clip(((rr - a[0]) * ab[0] + (cc - a[1]) * ab[1]) / max(ab @ ab, 1e-9), 0, 1)
            d2 = (rr - a[0] - t * ab[0]) ** 2 + (cc - a[1] - t * ab[1]) ** 2
            region |= d2 <= margin_px**2
    else:
        for p in hull:
            region |= (rr - p[0]) ** 2 + (cc - p[1]) ** 2 <= margin_px**2
    mask[lo[0]:hi[0], lo[1]:hi[1]] |= region


def _grid(shape: tuple[int, int], field_h: float, field_w: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (mm) of a grid of ``shape`` covering the field: (rows, 1), (1, cols)."""
    y = (np.arange(shape[0], dtype=np.float32) + 0.5) * np.float32(field_h / shape[0])
    x = (np.arange(shape[1], dtype=np.float32) + 0.5) * np.float32(field_w / shape[1])
    return y[:, None], x[None, :]


def _radial_field(rng: np.random.Generator, spacing: float, beta: float, distance: np.ndarray,
                  angle: np.ndarray, stretch: float = 3.0, f_high_pass: float | None = None,
                  f_low_pass: float | None = None) -> np.ndarray:
    """A power-law field whose structures run radially from the nipple (ducts, fibrous strands).

    Generated anisotropic (elongated ``stretch`` times along the radius) on a polar canvas
    (distance from the nipple x arc length at 90 mm), then sampled at each pixel.
    """
    arc = 90.0
    n_u = int(math.ceil(float(distance.max()) / spacing)) + 2
    n_v = int(math.ceil(2 * math.pi * arc / spacing)) + 2
    fv = np.fft.fftfreq(n_v, d=spacing).astype(np.float32)[:, None]
    fu = np.fft.rfftfreq(n_u, d=spacing).astype(np.float32)[None, :] * np.float32(stretch)
    spec = _spectrum(rng, fv, fu, beta, 1 / 80.0, f_high_pass, f_low_pass)
    canvas = _unit(np.fft.irfft2(spec, s=(n_v, n_u)).astype(np.float32))
    gx = (distance / np.float32(n_u * spacing)) * 2 - 1
    gy = (angle * np.float32(arc) + np.float32(math.pi * arc)) / np.float32(n_v * spacing) * 2 - 1
    grid = torch.from_numpy(np.stack(np.broadcast_arrays(gx, gy), -1).astype(np.float32))[None]
    out = F.grid_sample(torch.from_numpy(canvas)[None, None], grid, mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out[0, 0].numpy()


def _render_view(breast: _Breast, view: str, shape: tuple[int, int], spacing: float, density: str,
                 rng: np.random.Generator, beta: float, for_presentation: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, dict, list]:
    """Canonical-orientation rendering of one view.

    Three grids cover the same field: the output grid, a work grid of at least 0.14 mm for the
    tissue (beta = 3 texture holds almost no power finer than that), and a 0.5 mm grid for
    smooth geometric fields. Findings, the skin line and noise are drawn on the output grid.
    Returns (image [0, 1] dense bright, breast mask, masks, finding records).
    """
    outline = breast.cc if view == "CC" else breast.mlo
    rows, cols = shape
    field_h, field_w = rows * spacing, cols * spacing
    wf = max(1, int(round(0.14 / spacing)))
    wshape = (-(-rows // wf), -(-cols // wf))
    if spacing > 0.25:
        # Coarse grids render the tissue twice as fine and area-average it down, as a detector
        # pixel integrates: thin strands then blur instead of aliasing into jagged lines.
        wshape = (2 * rows, 2 * cols)
    wsp = field_h / wshape[0]
    lf = max(1, int(round(0.5 / spacing)))
    lshape = (-(-rows // lf), -(-cols // lf))

    def up(a: np.ndarray, target: tuple[int, int]) -> np.ndarray:
        a = np.array(np.broadcast_to(a, lshape), dtype=np.float32)  # writable copy for torch
        return a if a.shape == tuple(target) else resize(a, target)

    # Geometry on the coarse grid.
    ly, lx = _grid(lshape, field_h, field_w)
    dy = ly - np.float32(outline.center_row)
    theta = np.arctan2(dy, np.maximum(lx, np.float32(1e-3)))
    r = np.sqrt(dy * dy + lx * lx)
    rad = outline.radius(theta)
    nr, nc = outline.nipple()
    edge_l = rad - r  # mm inside the skin (radial approximation)
    rho = np.clip(r / np.maximum(rad, 1e-3), 0, 1.5)
    env = _smoothstep(edge_l, 4.0, 18.0) * _smoothstep(lx, 2.0, 14.0) * (1.0 - 0.3 * rho)
    pect_l = None
    if outline.pectoral is not None:
        w, h, q = outline.pectoral
        pect_l = (np.maximum(lx, 0) / np.float32(w)) ** np.float32(q) + ly / np.float32(h)
        env = env * _smoothstep(pect_l, 1.05, 1.4)
    nip_d_l = np.sqrt((ly - np.float32(nr)) ** 2 + (lx - np.float32(nc)) ** 2)
    ang_l = np.arctan2(ly - np.float32(nr), np.float32(nc) - lx)

    # Tissue on the work grid.
    edge = up(edge_l, wshape)
    envelope = up(env, wshape)
    nip_d = up(nip_d_l, wshape)
    wy, wx = _grid(wshape, field_h, field_w)
    # The angle is discontinuous behind the nipple (outside the breast), so it is not interpolated.
    ang = np.arctan2(wy - np.float32(nr), np.float32(nc) - wx)
    thick = np.sqrt(np.clip(1 - (1 - np.clip(edge / np.float32(breast.thickness / 2), 0, 1)) ** 2, 0, 1))
    n_iso = power_law_field(rng, wshape, wsp, beta)
    # Smooth (beta = 3) gland field: a 0.5 mm canvas is enough and 10x cheaper.
    n_rad = _radial_field(rng, max(wsp, 0.5), beta, nip_d, ang, stretch=3.0)
    n1 = 0.8 * n_iso + 0.5 * n_rad
    # Fat lobules: the high parts of a one-octave band around 1/10 mm^-1.
    n2 = power_law_field(rng, wshape, wsp, beta, f_high_pass=1 / 15.0, f_low_pass=1 / 6.0)
    # Fibrous strands and ducts converging on the nipple: the peaks of a field stretched 12x
    # along the radius give streaks about 0.5-1 mm wide and 5-15 mm long that fade in and out,
    # curved by a gentle warp of the angle (nothing finer than 40 mm, so the map never folds).
    warp = up(power_law_field(rng, lshape, field_h / lshape[0], beta, f_low_pass=1 / 40.0), wshape)
    n3 = _radial_field(rng, wsp, beta, nip_d, ang + np.float32(0.08) * warp, stretch=12.0, f_high_pass=1 / 4.0,
                       f_low_pass=1 / 1.5)
    frac = DENSITY_FRACTION[density]
    inside_w = edge > 0
    sample = n1[::5, ::5][inside_w[::5, ::5]]
    if sample.size:
        env_mean = float(np.mean(envelope[::5, ::5][inside_w[::5, ::5]])) + 1e-6
        q_level = float(np.clip(1 - frac / min(env_mean * 1.5, 1.0), 0.02, 0.98))
        thr = float(np.quantile(sample, q_level))
    else:
        thr = 0.0
    gland = envelope / (1.0 + np.exp(np.clip(-(n1 - np.float32(thr)) / np.float32(0.8), -60, 60)))
    inner = _smoothstep(edge, 1.0, 6.0)
    # Lines fade in and out along their length, as real ligaments and ducts do.
    lobules = _smoothstep(n2, -0.8, 1.8) * inner
    strands = _smoothstep(n3, 1.1, 2.6) * inner * _smoothstep(nip_d, 10.0, 45.0)
    tissue = thick ** np.float32(0.35)
    muscle = None
    if pect_l is not None:
        pect = up(pect_l, wshape)
        muscle = 1.0 - _smoothstep(pect, 0.97, 1.03)
    if for_presentation:
        rim = np.exp(-np.maximum(edge, 0) / np.float32(7.0))
        fat = 1 - gland
        # Dense tissue is not a flat plateau: fat lobules and mottle stay visible through it.
        mottle = np.tanh(n2) * np.float32(0.5) + np.float32(0.5)
        img = (0.13 + 0.08 * tissue + 0.24 * rim
               + gland * tissue * (0.45 + 0.14 * mottle - 0.08 * lobules + 0.10 * strands)
               + (0.18 * strands - 0.10 * lobules + 0.05 * n1) * fat * tissue)
        if muscle is not None:
            w, h, q = outline.pectoral
            level = 0.52 + 0.03 * n_iso + 0.12 * np.clip(1 - wy / np.float32(h), 0, 1) + 0.08 * np.clip(1 - pect, 0, 1)
            img = img * (1 - muscle) + level * muscle
        # Unsharp masking at about 3 mm, as a modality's presentation processing does.
        coarse = (max(2, int(wshape[0] * wsp / 3.0)), max(2, int(wshape[1] * wsp / 3.0)))
        img = img + np.float32(0.8) * (img - resize(resize(np.ascontiguousarray(img, dtype=np.float32), coarse), wshape))
        # Soft shoulder instead of clipping: dense tissue must not saturate into flat white.
        knee = np.float32(0.72)
        img = np.where(img > knee, knee + np.float32(0.24) * np.tanh((img - knee) / np.float32(0.24)), img)
    else:
        mu = 0.35 + 0.25 * gland + 0.06 * strands
        if muscle is not None:
            mu = mu * (1 - muscle) + 0.62 * muscle
        img = thick * mu * 0.9 + 0.05
    img = img if wshape == tuple(shape) else resize(np.ascontiguousarray(img, dtype=np.float32), shape)
    img = np.array(img, dtype=np.float32)  # writable, drawn into below

    # Output grid: outline, nipple, skin.
    edge_f = up(edge_l, shape)
    nipple_r = 4.0
    inside = edge_f > 0
    nr_px, nc_px = nr / spacing, nc / spacing
    half = int(math.ceil(nipple_r / spacing)) + 2
    ra, rb = max(int(nr_px) - half, 0), min(int(nr_px) + half + 1, rows)
    ca, cb = max(int(nc_px) - half, 0), min(int(nc_px) + half + 1, cols)
    if ra < rb and ca < cb:
        fy, fx = _grid(shape, field_h, field_w)
        dn = np.sqrt((fy[ra:rb] - np.float32(nr)) ** 2 + (fx[:, ca:cb] - np.float32(nc)) ** 2)
        bump = (dn < nipple_r) & (fx[:, ca:cb] > nc - 1.0)
        level = 0.34 if for_presentation else 0.12
        img[ra:rb, ca:cb] = np.where(bump & ~inside[ra:rb, ca:cb], level, img[ra:rb, ca:cb])
        inside[ra:rb, ca:cb] |= bump
    if for_presentation:
        band = np.abs(edge_f) < 3.0
        img[band] += 0.20 * np.exp(-((edge_f[band] - 0.5) / 0.8) ** 2)

    # Findings, drawn on the output grid.
    masks = {k: np.zeros(shape, dtype=bool) for k in MASK_KEYS}
    records = []
    k_mlo = breast.mlo.depth / breast.cc.depth
    for f in breast.findings:
        center = _project(breast, view, f.depth_mm, f.lateral_mm, f.superior_mm)
        suffix = "malignant" if f.malignant else "benign"
        gain = 1.0 if for_presentation else 0.6 * float(np.clip(outline.edge_distance(*center) / (breast.thickness / 2), 0.3, 1.0))
        if f.kind == "mass":
            # Per-view rotation: a different projection of the same mass.
            res = render_mass(f, center, spacing, shape, rng.uniform(0, 2 * np.pi))
            if res is None:
                continue
            window, dens, m = res
            img[window] += (0.26 if f.malignant else 0.22) * mass_conspicuity(f.seed) * gain * dens
            masks["mass_" + suffix][window] |= m
            area = int(m.sum())
        elif f.kind == "macrocalcification":
            srng = np.random.default_rng(f.seed)
            res = _render_ellipse(img, (center[0], center[1]), f.size_mm, f.size_mm * srng.uniform(0.6, 1.0),
                                  rng.uniform(0, np.pi), spacing, 0.55 * gain)
            if res is None:
                continue
            r0, c0, cover, window = res
            if 0 <= r0 < rows and 0 <= c0 < cols:
                masks["calcification_benign"][r0, c0] = True
            masks["calcification_benign"][window] |= cover >= 0.5
            area = int((cover >= 0.5).sum())
        else:
            offs, sizes = f.speck_offsets, f.speck_sizes
            if view == "CC":
                pr, pc = -offs[:, 1], -offs[:, 0]
            else:
                pr, pc = -0.7071 * (offs[:, 2] + offs[:, 1]), -offs[:, 0] * k_mlo
            drawn = draw_cluster(img, masks["calcification_" + suffix], masks["cluster_" + suffix], center,
                                 np.stack([pr, pc], 1), sizes, f.shape, f.malignant, spacing, rng, gain)
            if drawn is None:
                continue
            area = drawn
        records.append({"kind": f.kind, "malignant": f.malignant, "shape": f.shape,
                        "size_mm": round(float(f.size_mm), 3),
                        "center_rc": [round(center[0] / spacing, 2), round(center[1] / spacing, 2)],
                        "area_px": area})
    for key in masks:
        masks[key] &= inside

    noise_sigma = np.float32((0.02 if for_presentation else 0.008) * FULL_SPACING_MM / spacing)
    noise = rng.standard_normal(shape, dtype=np.float32) * noise_sigma
    background = np.float32(0.02 if for_presentation else 0.01)
    img += noise
    img[~inside] = background
    np.clip(img, 0, 1, out=img)
    return img, inside, masks, records


# --------------------------------------------------------------------------- public API


def generate_study(
    seed: int,
    shape: tuple[int, int] = (416, 320),
    density: str | None = None,
    photometric: str = "MONOCHROME2",
    presentation: str = "FOR PRESENTATION",
    normal: bool | None = None,
    bits_stored: int = 12,
    beta: float = 3.0,
) -> PhantomStudy:
    """Generate one four-view phantom screening study, deterministic for ``seed``.

    ``shape`` is (rows, columns) of every view; full size is (3328, 2560) at 0.07 mm, and other
    shapes cover the same field at spacing ``0.07 * 3328 / rows`` mm. ``density`` is a BI-RADS
    category 'a'-'d' (random when None). ``normal`` forces a study without findings (True) or
    with at least one (False); None draws it (35 % normal). ``beta`` is the exponent of the
    fibroglandular texture's power spectrum.

    Parameters
    ----------
    seed
        Integer seed; the same seed (and arguments) give identical pixels, masks and UIDs.
    shape
        ``(rows, columns)`` of every view in pixels, at least (64, 48). The field of view is
        fixed (that of (3328, 2560) at 0.07 mm), so the pixel spacing is
        ``0.07 * 3328 / rows`` mm, square.
    density
        BI-RADS breast density category, ``"a"`` (fatty) to ``"d"`` (extremely dense);
        None draws it (a 10 %, b 40 %, c 40 %, d 10 %).
    photometric
        ``"MONOCHROME2"`` (dense tissue bright in the stored values) or ``"MONOCHROME1"``
        (stored values inverted).
    presentation
        ``"FOR PRESENTATION"`` (processed look) or ``"FOR PROCESSING"`` (raw-like,
        lower-contrast log signal).
    normal
        True: no findings in either breast; False: at least one breast with findings;
        None: drawn (35 % normal).
    bits_stored
        Bits Stored of the DICOM images; pixel values are quantised to
        ``[0, 2**bits_stored - 1]``.
    beta
        Exponent of the 1/f^beta power spectrum of the fibroglandular texture (3 as
        measured on real mammograms; lower gives finer, noisier texture).

    Returns
    -------
    PhantomStudy
        The four views in the order L-CC, L-MLO, R-CC, R-MLO, each with its DICOM data set,
        ground-truth masks and breast mask on the stored pixel grid (R views stored facing
        left, chest wall at the last column), plus the breast-level labels and the findings
        in 3-D breast coordinates.

    Raises
    ------
    ValueError
        When ``shape`` is too small or ``density`` is not a BI-RADS category.
    """
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 64 or cols < 48:
        raise ValueError(f"phantom shape {shape} too small; use at least (64, 48)")
    if density is not None and density not in DENSITY_FRACTION:
        raise ValueError(f"density {density!r} must be one of 'a', 'b', 'c', 'd' (BI-RADS)")
    spacing = FULL_SPACING_MM * FULL_SHAPE[0] / rows
    field_h, field_w = rows * spacing, cols * spacing
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4D47]))
    if density is None:
        density = str(rng.choice(list(DENSITY_PRIOR), p=list(DENSITY_PRIOR.values())))
    if normal is None:
        normal = bool(rng.random() < NORMAL_SHARE)

    # Geometry and findings are drawn in mm first, so they do not depend on the grid.
    breasts = {lat: _new_breast(rng, lat, field_h, field_w) for lat in ("L", "R")}
    if normal:
        kinds = {"L": "normal", "R": "normal"}
    else:
        u = rng.random()
        first = "malignant" if u < 0.5 else "benign"
        other = rng.choice(["normal", "benign", "malignant"], p=[0.65, 0.3, 0.05])
        if rng.random() < 0.5:
            kinds = {"L": first, "R": str(other)}
        else:
            kinds = {"L": str(other), "R": first}
    for lat in ("L", "R"):
        breasts[lat].findings = _findings_for(rng, breasts[lat], kinds[lat])

    breast_labels = {lat: {"benign": any(not f.malignant for f in breasts[lat].findings),
                           "malignant": any(f.malignant for f in breasts[lat].findings)} for lat in ("L", "R")}
    max_value = 2**bits_stored - 1
    images = []
    for index, (lat, view) in enumerate(VIEWS):
        vrng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4D47, index + 1]))
        values, bmask, masks, records = _render_view(breasts[lat], view, (rows, cols), spacing, density, vrng,
                                                     beta, for_presentation=presentation.upper() == "FOR PRESENTATION")
        if lat == "R":  # real modalities store R views facing left
            values, bmask = values[:, ::-1], bmask[:, ::-1]
            masks = {k: np.ascontiguousarray(m[:, ::-1]) for k, m in masks.items()}
            for rec in records:
                rec["center_rc"][1] = round(cols - rec["center_rc"][1], 2)
        stored = np.round(values * max_value).astype(np.uint16)
        if photometric == "MONOCHROME1":
            stored = (max_value - stored).astype(np.uint16)
        ds = mg_dataset(stored, seed=int(seed), laterality=lat, view=view, spacing_mm=spacing,
                        photometric=photometric, presentation=presentation, bits_stored=bits_stored,
                        thickness_mm=breasts[lat].thickness, instance_number=index + 1)
        labels = {"benign": bool(masks["mass_benign"].any() or masks["calcification_benign"].any()),
                  "malignant": bool(masks["mass_malignant"].any() or masks["calcification_malignant"].any())}
        images.append(PhantomImage(dataset=ds, laterality=lat, view=view, masks=masks,
                                   breast_mask=np.ascontiguousarray(bmask), labels=labels,
                                   spacing_mm=spacing, pixels=np.ascontiguousarray(values), findings=records))
    return PhantomStudy(seed=int(seed), density=density, normal=bool(normal), images=images,
                        breast_labels=breast_labels, findings={k: b.findings for k, b in breasts.items()})
