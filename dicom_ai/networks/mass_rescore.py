"""False-positive reduction for the U-Net's mass candidates: a second look at each region.

The U-Net (:mod:`dicom_ai.networks.dunet`) finds candidate regions (8-connected components of
its raw subtraction output ``x - f(x)`` at or above ``level`` inside the breast) and scores each
by its peak. This stage scores each region again from a fixed-millimetre window of the working
grid around its centroid (the input image and the U-Net's output, two channels) plus a few
region features (:data:`FEATURES`), with a small CNN (:class:`MassRescoreNet`, hyper-parameters in
:class:`RescoreConfig`). Its output probability replaces the region's score in the map
(:func:`rescored_map`), so the node's thresholds, marks and operating points work unchanged.

Coordinates: working-grid pixels (rows, columns) of :func:`~dicom_ai.networks.dunet.working_grid`,
canonical orientation (chest wall at column 0); areas in mm^2, distances in mm.
Training lives in :mod:`dicom_ai.training.mass_rescore`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from dicom_ai.core.errors import ModelError
from dicom_ai.networks.microcalc_clusters import components

__all__ = ["RescoreConfig", "RescoreMember", "MassRescoreNet", "Region", "FEATURES", "candidate_regions",
           "region_features", "region_patches", "rescore_regions", "combine", "rescored_map"]

#: Region features, in this order (the network standardises them with its stored mean/std).
FEATURES: tuple[str, ...] = ("peak", "mean_output", "log_area_mm2", "contrast", "density",
                             "fill", "chest_wall_mm", "edge_mm")


@dataclass(frozen=True)
class RescoreConfig:
    """Hyper-parameters of the region classifier.

    ``window_mm`` is the side of the square window around a region's centroid, sampled at the
    U-Net's working pixel size ``pixel_spacing_mm``; ``channels`` the widths of the three
    convolution stages; ``members`` how many networks are averaged; ``use_patch`` / ``use_features`` switch the two inputs (a features-only
    network is a logistic regression with one hidden layer); ``ring_mm`` the width of the ring
    around a region that its contrast is measured against.
    """

    pixel_spacing_mm: float = 0.8
    window_mm: float = 38.4
    channels: tuple[int, ...] = (8, 16, 32)
    hidden: int = 16
    members: int = 3
    use_patch: bool = True
    use_features: bool = True
    ring_mm: float = 4.0
    level: float = 0.1
    #: Which of :data:`FEATURES` the network reads (all are computed; the rest are ignored).
    features: tuple[str, ...] = FEATURES
    #: Weight of the U-Net's own calibrated score in the region's final score (:func:`combine`):
    #: 0 = the stage's probability alone; 0.5 = the mean of the two logits.
    unet_weight: float = 0.0

    def __post_init__(self) -> None:
        if not self.use_patch and not self.use_features:
            raise ModelError("the rescore network needs the patch, the features or both")
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features:
            raise ModelError(f"rescore features must be some of {FEATURES}, got {list(self.features)}")
        if not 0.0 <= self.unet_weight <= 1.0:
            raise ModelError(f"unet_weight must lie in [0, 1], got {self.unet_weight}")
        if self.members < 1:
            raise ModelError(f"the rescore stage needs at least one member, got {self.members}")
        if self.window_px < 8:
            raise ModelError(f"window_mm {self.window_mm} is under 8 working pixels of {self.pixel_spacing_mm} mm")

    @property
    def window_px(self) -> int:
        """Window side in working pixels (even)."""
        return 2 * int(round(self.window_mm / self.pixel_spacing_mm / 2))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RescoreConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "channels" in known:
            known["channels"] = tuple(int(c) for c in known["channels"])
        if "features" in known:
            known["features"] = tuple(str(f) for f in known["features"])
        return cls(**known)


class RescoreMember(nn.Module):
    """One member of :class:`MassRescoreNet`: (N, 2, W, W) windows, (N, F) standardised features -> (N,) logits.

    Three (conv 3x3 -> ReLU -> max-pool 2) stages and a global average give the window's
    descriptor (when ``use_patch``); the features join it (when ``use_features``) before one
    hidden layer.
    """

    def __init__(self, config: RescoreConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 2
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.patch = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()) if config.use_patch else None
        n_in = (c_in if config.use_patch else 0) + (len(config.features) if config.use_features else 0)
        self.head = nn.Sequential(nn.Linear(n_in, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1))

    def forward(self, windows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.patch is not None:
            parts.append(self.patch(windows))
        if self.config.use_features:
            parts.append(features)
        return self.head(torch.cat(parts, dim=1))[:, 0]


class MassRescoreNet(nn.Module):
    """(N, 2, W, W) windows and (N, len(FEATURES)) raw features -> (N,) logits.

    ``config.members`` independently trained :class:`RescoreMember` networks; the logit is their
    mean (a small ensemble: with a few dozen positive regions per training set, single networks
    of different seeds rank the regions differently). ``feature_mean`` and ``feature_std`` are
    buffers set from the training regions, so the standardisation travels in the weights.
    """

    def __init__(self, config: RescoreConfig):
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(RescoreMember(config) for _ in range(config.members))
        self.register_buffer("feature_mean", torch.zeros(len(FEATURES)))
        self.register_buffer("feature_std", torch.ones(len(FEATURES)))
        self.columns = [FEATURES.index(f) for f in config.features]

    def forward(self, windows: torch.Tensor, features: torch.Tensor, member: int | None = None) -> torch.Tensor:
        """Mean logit of all members, or member ``member``'s logit alone (training); ``features`` has
        every column of :data:`FEATURES`, the network reads ``config.features``."""
        z = ((features - self.feature_mean) / self.feature_std)[:, self.columns]
        if member is not None:
            return self.members[member](windows, z)
        return torch.stack([m(windows, z) for m in self.members]).mean(0)


@dataclass
class Region:
    """One candidate region on the working grid: centroid (row, col), peak raw output, pixels (n, 2)."""

    centroid: tuple[float, float]
    peak: float
    pixels: np.ndarray


def candidate_regions(output: np.ndarray, allowed: np.ndarray, level: float = 0.1) -> list[Region]:
    """8-connected regions of ``output >= level`` inside ``allowed`` (both on the working grid).

    ``output`` is the U-Net's raw subtraction output; ``level`` its candidate level (0.1, where
    the calibrated map's candidate threshold comes from).
    """
    masked = np.where(allowed, output, -np.inf).astype(np.float32)
    return [Region(c.centroid, c.peak, c.pixels) for c in components(masked, level)]


def region_features(regions: list[Region], output: np.ndarray, image: np.ndarray, allowed: np.ndarray,
                    config: RescoreConfig) -> np.ndarray:
    """(n, len(FEATURES)) float32 features of ``regions`` (see :data:`FEATURES`).

    peak / mean_output: of the raw output over the region; log_area_mm2: log(1 + area);
    contrast: mean image inside minus mean over a ``ring_mm`` ring outside (breast pixels only);
    density: mean image inside; fill: area / bounding-box area; chest_wall_mm: centroid column
    times the pixel size; edge_mm: distance from the centroid to the nearest non-breast pixel.
    """
    px = config.pixel_spacing_mm
    out = np.zeros((len(regions), len(FEATURES)), dtype=np.float32)
    if not regions:
        return out
    edge = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        sitk.GetImageFromArray((~allowed).astype(np.uint8)), insideIsPositive=False, squaredDistance=False,
        useImageSpacing=False))
    ring_px = max(1, int(round(config.ring_mm / px)))
    rows, cols = output.shape
    for j, reg in enumerate(regions):
        rr, cc = reg.pixels[:, 0], reg.pixels[:, 1]
        r0, r1 = max(0, rr.min() - ring_px), min(rows, rr.max() + ring_px + 1)
        c0, c1 = max(0, cc.min() - ring_px), min(cols, cc.max() + ring_px + 1)
        inside = np.zeros((r1 - r0, c1 - c0), dtype=np.uint8)
        inside[rr - r0, cc - c0] = 1
        grown = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(inside), [ring_px] * 2)).astype(bool)
        ring = grown & ~inside.astype(bool) & allowed[r0:r1, c0:c1]
        img_in = float(image[rr, cc].mean())
        img_ring = float(image[r0:r1, c0:c1][ring].mean()) if ring.any() else img_in
        box = (rr.max() - rr.min() + 1) * (cc.max() - cc.min() + 1)
        r, c = reg.centroid
        out[j] = (reg.peak, float(output[rr, cc].mean()), np.log1p(len(rr) * px * px), img_in - img_ring, img_in,
                  len(rr) / box, c * px, float(edge[int(round(r)), int(round(c))]) * px)
    return out


def region_patches(regions: list[Region], output: np.ndarray, image: np.ndarray, config: RescoreConfig,
                   shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(n, 2, W, W) float32 windows centred on each region's centroid (+ ``shift`` pixels).

    Channel 0: the image less the window's mean; channel 1: the U-Net output clipped to [0, 1].
    Outside the working grid both are 0.
    """
    w = config.window_px
    half = w // 2
    pad_img = np.pad(image.astype(np.float32), half + abs(shift[0]) + abs(shift[1]) + 1)
    pad_out = np.pad(np.clip(output, 0, 1).astype(np.float32), half + abs(shift[0]) + abs(shift[1]) + 1)
    p = half + abs(shift[0]) + abs(shift[1]) + 1
    out = np.zeros((len(regions), 2, w, w), dtype=np.float32)
    for j, reg in enumerate(regions):
        r = int(round(reg.centroid[0])) + shift[0] + p - half
        c = int(round(reg.centroid[1])) + shift[1] + p - half
        win = pad_img[r:r + w, c:c + w]
        out[j, 0] = win - win.mean()
        out[j, 1] = pad_out[r:r + w, c:c + w]
    return out


@torch.no_grad()
def rescore_regions(net: MassRescoreNet, regions: list[Region], output: np.ndarray, image: np.ndarray,
                    allowed: np.ndarray) -> np.ndarray:
    """(n,) probabilities of ``regions`` being a mass: the mean of the plain and up-down-flipped window."""
    if not regions:
        return np.zeros(0, dtype=np.float32)
    cfg = net.config
    feats = torch.from_numpy(region_features(regions, output, image, allowed, cfg))
    win = torch.from_numpy(region_patches(regions, output, image, cfg))
    net.eval()
    logit = 0.5 * (net(win, feats) + net(torch.flip(win, dims=(2,)), feats))
    return torch.sigmoid(logit).numpy().astype(np.float32)


def combine(stage: np.ndarray, unet: np.ndarray, unet_weight: float) -> np.ndarray:
    """Final region scores: ``sigmoid((1 - w) * logit(stage) + w * logit(unet))`` for ``w = unet_weight``.

    ``stage`` are the stage's probabilities, ``unet`` the U-Net's calibrated region scores (its
    Platt map at the region's peak). Keeping part of the U-Net's score ties the final ranking to
    the network's own evidence where the region features move off the training images' range.
    """
    if unet_weight == 0.0:
        return np.asarray(stage, dtype=np.float32)
    eps = 1e-6
    logit = lambda p: np.log(np.clip(p, eps, 1 - eps)) - np.log(np.clip(1 - p, eps, 1 - eps))  # noqa: E731
    z = (1.0 - unet_weight) * logit(np.asarray(stage, np.float64)) + unet_weight * logit(np.asarray(unet, np.float64))
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def rescored_map(regions: list[Region], scores: np.ndarray, output: np.ndarray, floor: float) -> np.ndarray:
    """The map the node thresholds: each region's pixels scaled so its peak is its new score.

    Inside region j: ``max(scores[j] * output / peak_j, floor)``, so at ``floor`` (the bundle's
    candidate threshold) every region is exactly the U-Net's candidate region; elsewhere 0, so no
    new region appears below the candidate level.
    """
    out = np.zeros(output.shape, dtype=np.float32)
    for reg, s in zip(regions, scores):
        rr, cc = reg.pixels[:, 0], reg.pixels[:, 1]
        s = max(float(s), floor)
        out[rr, cc] = np.maximum(s * output[rr, cc] / max(reg.peak, 1e-6), floor)
    return out
