"""Models-Genesis distortions as modified by Tardy & Mateus for full mammograms.

Owns the restoration task of the U-Net's stage 1 (:func:`distort` and its parts); the training
loop that uses it is :func:`dicom_ai.training.dunet.pretrain`.

Stage 1 of the discriminative U-Net learns to undo these distortions (restoration). From
Models Genesis (Zhou et al. 2019, MrGiovanni/ModelsGenesis) the order flip -> intensity ->
painting and the painting probabilities are kept; the paper's modifications are:

* a gamma transform ``x ** gamma`` replaces the Bezier-curve intensity transform;
* local pixel shuffling is dropped (its speckle looks like microcalcifications);
* in-painting uses non-rectangular shapes (rotated ellipses and star-shaped blobs).

Our further choices (see shared/research/models.md 2.2): every painting is restricted to
the breast (the background stays as it is), out-painting keeps non-rectangular regions
too, and flips are up-down only by default because every image is in canonical orientation
(chest wall at column 0) at inference, so a left-right flip would teach orientations the
network never meets. Images are 2-D float arrays in [0, 1]; ``dim`` below is the shorter
image side in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GenesisConfig", "Distortion", "distort", "flip", "gamma_transform", "random_shape",
           "inpaint", "outpaint"]


@dataclass(frozen=True)
class GenesisConfig:
    """Probabilities and ranges of the distortions (Models Genesis values unless noted)."""

    #: Probability of each flip; up to ``max_flips`` flips while a draw stays below it.
    flip_rate: float = 0.4
    max_flips: int = 3
    #: Axes a flip may act on: 0 = up-down. Add 1 for left-right (see module docstring).
    flip_axes: tuple[int, ...] = (0,)
    #: Probability of the gamma transform (replaces Genesis' Bezier with p = 0.9).
    gamma_rate: float = 0.9
    #: gamma is log-uniform in this range (our choice).
    gamma_range: tuple[float, float] = (0.5, 2.0)
    #: Probability of painting; given painting, in-painting with ``inpaint_rate``, else out-painting.
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2
    #: Shapes per painting: one, then another while a draw stays below ``shape_continue_rate``.
    max_shapes: int = 5
    shape_continue_rate: float = 0.95
    #: In-painting shape diameter as a fraction of ``dim`` (1/12..1/6 as 128..256 px at 1536).
    inpaint_diameter: tuple[float, float] = (1 / 12, 1 / 6)
    #: Out-painting keep-region diameter as a fraction of ``dim`` (Genesis: about 3/7..4/7).
    outpaint_diameter: tuple[float, float] = (3 / 7, 4 / 7)


@dataclass
class Distortion:
    """One training example: the distorted input, its restoration target and the breast mask.

    ``target`` and ``mask`` are flipped with the input (a flip is an augmentation, not a
    distortion to undo). ``applied`` lists what was done, for tests and logs.
    """

    image: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    applied: list[str]


def flip(image: np.ndarray, target: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
         config: GenesisConfig = GenesisConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Flip all three arrays together, as Models Genesis does.

    Parameters
    ----------
    image, target, mask : numpy.ndarray
        Same-shape 2-D arrays (input, restoration target, breast mask).
    rng : numpy.random.Generator
        Decides how many flips and on which axis.
    config : GenesisConfig
        Flip rate, count and axes (0 = up-down).

    Returns
    -------
    tuple
        The three (contiguous) arrays and the number of flips.
    """
    count = 0
    while count < config.max_flips and rng.random() < config.flip_rate:
        axis = int(rng.choice(config.flip_axes))
        image, target, mask = (np.flip(a, axis=axis) for a in (image, target, mask))
        count += 1
    return np.ascontiguousarray(image), np.ascontiguousarray(target), np.ascontiguousarray(mask), count


def gamma_transform(image: np.ndarray, rng: np.random.Generator,
                    config: GenesisConfig = GenesisConfig()) -> tuple[np.ndarray, float]:
    """``image ** gamma`` with gamma log-uniform in ``config.gamma_range``.

    Parameters
    ----------
    image : numpy.ndarray
        Float image, clipped to [0, 1] first.
    rng : numpy.random.Generator
        Draws gamma.
    config : GenesisConfig
        ``gamma_range``.

    Returns
    -------
    tuple
        The float32 image and gamma.
    """
    lo, hi = config.gamma_range
    gamma = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return np.power(np.clip(image, 0.0, 1.0), gamma).astype(np.float32), gamma


def random_shape(shape: tuple[int, int], center: tuple[float, float], diameter: float,
                 rng: np.random.Generator) -> np.ndarray:
    """A non-rectangular region of about ``diameter`` pixels: a rotated ellipse or a blob.

    The blob is star-shaped, ``r(theta) = r0 * (1 + sum_k a_k cos(k theta + phi_k))`` for
    k = 2..4, which gives lobulated outlines unlike any box.

    Parameters
    ----------
    shape : tuple of int
        (rows, columns) of the returned boolean mask.
    center : tuple of float
        (row, column) of the shape's centre, in pixels.
    diameter : float
        Diameter of the disc of the same area (ellipse) or mean diameter (blob), in pixels.
    rng : numpy.random.Generator
        Draws the kind, orientation, aspect and lobes.
    """
    rows, cols = shape
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float32)
    dy, dx = r - center[0], c - center[1]
    radius = diameter / 2.0
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        aspect = rng.uniform(0.5, 1.0)
        a, b = radius / np.sqrt(aspect), radius * np.sqrt(aspect)  # same area as the disc
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    theta = np.arctan2(dy, dx)
    boundary = np.ones_like(theta)
    for k in (2, 3, 4):
        boundary += rng.uniform(0.0, 0.25) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) <= radius * boundary


def _shapes_in_breast(mask: np.ndarray, fraction: tuple[float, float], rng: np.random.Generator,
                      config: GenesisConfig) -> np.ndarray:
    """Union of 1..max_shapes random shapes centred on breast pixels, cut to the breast."""
    region = np.zeros(mask.shape, dtype=bool)
    inside = np.argwhere(mask)
    if len(inside) == 0:
        return region
    dim = min(mask.shape)
    for i in range(config.max_shapes):
        if i > 0 and rng.random() >= config.shape_continue_rate:
            break
        center = inside[rng.integers(len(inside))]
        diameter = rng.uniform(fraction[0] * dim, fraction[1] * dim)
        region |= random_shape(mask.shape, (float(center[0]), float(center[1])), diameter, rng)
    return region & mask


def inpaint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
            config: GenesisConfig = GenesisConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Fill random shapes inside the breast with U(0, 1) noise.

    Parameters
    ----------
    image : numpy.ndarray
        Float image in [0, 1] (not modified).
    mask : numpy.ndarray
        Boolean breast mask of the same shape; painting stays inside it.
    rng : numpy.random.Generator
        Draws the shapes and the noise.
    config : GenesisConfig
        Shape count and diameters (fractions of the shorter image side).

    Returns
    -------
    tuple
        The painted image and the boolean painted region.
    """
    region = _shapes_in_breast(mask, config.inpaint_diameter, rng, config)
    out = image.copy()
    out[region] = rng.random(int(region.sum()), dtype=np.float32)
    return out, region


def outpaint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
             config: GenesisConfig = GenesisConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Replace the breast by U(0, 1) noise except inside random keep-shapes.

    Parameters
    ----------
    image : numpy.ndarray
        Float image in [0, 1] (not modified).
    mask : numpy.ndarray
        Boolean breast mask of the same shape; the background is never painted.
    rng : numpy.random.Generator
        Draws the keep-shapes and the noise.
    config : GenesisConfig
        Shape count and keep-region diameters (fractions of the shorter image side).

    Returns
    -------
    tuple
        The painted image and the painted region (breast minus the keep-shapes).
    """
    keep = _shapes_in_breast(mask, config.outpaint_diameter, rng, config)
    region = mask & ~keep
    out = image.copy()
    out[region] = rng.random(int(region.sum()), dtype=np.float32)
    return out, region


def distort(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
            config: GenesisConfig = GenesisConfig()) -> Distortion:
    """Apply the modified Genesis chain: flip -> gamma -> (in- or out-painting).

    Parameters
    ----------
    image : numpy.ndarray
        Float image in [0, 1], canonical orientation (chest wall at column 0).
    mask : numpy.ndarray
        Boolean breast mask of the same shape.
    rng : numpy.random.Generator
        Draws every random choice of the chain.
    config : GenesisConfig
        Probabilities and ranges.
    """
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} and breast mask shape {mask.shape} differ")
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    applied: list[str] = []
    x, target, mask, flips = flip(image, image, mask, rng, config)
    applied += ["flip"] * flips
    if rng.random() < config.gamma_rate:
        x, _ = gamma_transform(x, rng, config)
        applied.append("gamma")
    if rng.random() < config.paint_rate:
        if rng.random() < config.inpaint_rate:
            x, _ = inpaint(x, mask, rng, config)
            applied.append("inpaint")
        else:
            x, _ = outpaint(x, mask, rng, config)
            applied.append("outpaint")
    return Distortion(image=x.astype(np.float32), target=target.astype(np.float32), mask=mask, applied=applied)
