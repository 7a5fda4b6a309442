"""Training of the microcalcification Detector and Segmentator: patches, training, the manifest.

Data: phantom studies (:mod:`dicom_ai.data.phantom`) at full size, decoded with the node's own
preprocessing, resampled to the method's 0.05 mm pixels; or any adapter of
:mod:`dicom_ai.data.datasets` (:func:`dataset_patches`), typically calcification clusters
inserted into real backgrounds (``hybrid:cbis-ddsm-cases``, ``hybrid:real-png-normals``).

Generalising across resolution: the model works at 0.05 mm, but real images come at 0.05-0.2 mm
(mini-MIAS film at 0.2 mm, where a speck is about one pixel). A share of the training images is
therefore degraded (:func:`degrade_resolution`: shrunk to a pixel size drawn in 0.1-0.2 mm,
quantised to 8 bits as a film digitiser stores it, and resampled back to 0.05 mm exactly as the
node upsamples a coarse image), and every training patch can get a random gamma, contrast,
brightness and noise (:func:`intensity_augment`: sites differ in exposure and processing). Around every image, patches of the
largest size (49 px) are cut at centres drawn by distance to the nearest calcification (on,
next to, near, in the periphery of, far from one), so every patch class C1-C4 is present for
every patch size; smaller patch sizes are centre crops. The patches and their MC masks are
cached as ``.npy`` files, one folder per phantom seed named with the generator version
(:func:`patch_cache_folder`), so a rerun does not regenerate and a changed generator does not
read stale patches.

Training draws class-balanced batches over C1-C4 (Detector: half C4, half C1-C3 in equal
thirds; Segmentator: a quarter of each), with random 90-degree rotations and flips, and
minimises the cross-entropy with Adam; a second round adds the false positives of the first
(:func:`mine_hard_negatives`, :func:`mine_views`). Everything is seeded. :func:`train_cascade`
runs the four phases (Detector, Segmentator, both again with hard negatives) in blocks of steps,
with a :class:`~dicom_ai.training.checkpoint.RunState` checkpoint and curves after every block,
so an interrupted run resumes where it stopped. :func:`microcalc_manifest` writes what the
bundle was trained on; ``dicom-ai train microcalc`` (:mod:`dicom_ai.cli.train`) is the
command line over these functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from dicom_ai.core.findings import ModelIdentity
from dicom_ai.data.cache import cache_folder, read_marker, write_marker
from dicom_ai.data.phantom import FULL_SHAPE, generate_study
from dicom_ai.imaging import Mammogram, read_mammogram, resize
from dicom_ai.networks.microcalc import (C4, ROLES, MicrocalcConfig, MicrocalcModel, PatchCNN, box_any,
                                         patch_classes, role_targets)
from dicom_ai.training.checkpoint import RunState
from dicom_ai.training.common import INTENDED_USE

__all__ = [
    "CACHE_PATCH", "STRATA", "STRATUM_BOUNDS", "STRATUM_LIMITS_MM", "stratum_limits", "MC_SHRINK_FRACTION",
    "DEFAULT_PER_STRATUM", "INTENDED_USE",
    "PatchSet", "microcalcification_mask", "extract_patches", "cut_patches", "working_grid", "working_grid_of",
    "Degradation", "degrade_resolution", "dataset_views", "dataset_patches", "WorkingView",
    "phantom_image_patches", "mine_hard_negatives", "mine_views", "patch_cache_folder", "phantom_patches",
    "has_cluster", "load_patches", "balanced_indices", "augment", "intensity_augment", "train_network",
    "train_cascade", "evaluate_patches", "select_seeds", "mining_seeds", "microcalc_manifest",
]

#: Largest patch size: the cache stores patches of this size, smaller ones are centre crops.
CACHE_PATCH = 49
#: Centre strata by Chebyshev distance (px at 0.05 mm) to the nearest MC pixel.
STRATA = ("on", "edge", "near", "periphery", "far")
STRATUM_BOUNDS = {"on": (0, 0), "edge": (1, 2), "near": (3, 8), "periphery": (9, CACHE_PATCH // 2)}
#: The same strata's outer distances in mm (0.1 / 0.4 / 1.2 mm), so a coarser working grid
#: draws centres at the same physical distances (:func:`stratum_limits`).
STRATUM_LIMITS_MM = {"edge": 0.1, "near": 0.4, "periphery": 1.2}
DEFAULT_PER_STRATUM = {"on": 120, "edge": 80, "near": 80, "periphery": 120, "far": 300}


#: Share of a coarser working pixel that must be MC for it to be an MC pixel (see :func:`working_grid_of`).
MC_SHRINK_FRACTION = 0.25


@dataclass
class PatchSet:
    """Cached patches: ``images`` float32 (N, 49, 49) in [0, 1]; ``masks`` bool (N, 49, 49)."""

    images: np.ndarray
    masks: np.ndarray
    source: np.ndarray  # int, phantom seed * 10 + image index, for bookkeeping

    def __len__(self) -> int:
        return len(self.images)

    def crop(self, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Centre crops of images and masks at ``patch_size``."""
        off = (CACHE_PATCH - patch_size) // 2
        sl = slice(off, off + patch_size)
        return self.images[:, sl, sl], self.masks[:, sl, sl]

    def classes(self, patch_size: int) -> np.ndarray:
        """Patch class (1..4) of every patch at ``patch_size`` (see dicom_ai.microcalc)."""
        _, masks = self.crop(patch_size)
        c, near = patch_size // 2, patch_size // 6
        centre = masks[:, c, c]
        any_near = masks[:, c - near:c + near + 1, c - near:c + near + 1].any(axis=(1, 2))
        any_patch = masks.any(axis=(1, 2))
        out = np.full(len(masks), 4, dtype=np.uint8)
        out[any_patch] = 3
        out[any_near] = 2
        out[centre] = 1
        return out

    @classmethod
    def concat(cls, sets: list["PatchSet"]) -> "PatchSet":
        return cls(np.concatenate([s.images for s in sets]), np.concatenate([s.masks for s in sets]),
                   np.concatenate([s.source for s in sets]))


def stratum_limits(spacing_mm: float = 0.05) -> dict[str, int]:
    """Outer Chebyshev distance in working pixels of the "edge", "near" and "periphery"
    strata at ``spacing_mm`` (mm per pixel): 2 / 8 / 24 px at 0.05 mm (:data:`STRATUM_BOUNDS`),
    1 / 4 / 12 px at 0.1 mm; never beyond the cached patch's half-size."""
    limits, last = {}, 0
    for name in ("edge", "near", "periphery"):
        d = min(max(last + 1, int(round(STRATUM_LIMITS_MM[name] / spacing_mm))), CACHE_PATCH // 2)
        limits[name] = last = d
    return limits


def microcalcification_mask(masks: dict[str, np.ndarray], spacing_mm: float,
                            max_diameter_mm: float = 1.0) -> np.ndarray:
    """MC ground truth of a phantom image: both calcification masks without the macrocalcifications.

    Coarse macrocalcifications (components of equivalent diameter above ``max_diameter_mm``)
    are not microcalcifications and are as large as a whole patch, so they are dropped.

    Parameters
    ----------
    masks : dict
        The image's ground truth (``calcification_benign``, ``calcification_malignant``), boolean
        on the stored grid.
    spacing_mm : float
        Pixel spacing of that grid, mm.
    max_diameter_mm : float
        Largest equivalent diameter of a microcalcification, mm.
    """
    mc = np.asarray(masks["calcification_benign"], dtype=bool) | np.asarray(masks["calcification_malignant"], dtype=bool)
    if not mc.any():
        return mc
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mc.astype(np.uint8)), True))
    areas = np.bincount(labels.ravel())
    max_area = np.pi * (max_diameter_mm / 2 / spacing_mm) ** 2
    too_big = np.flatnonzero(areas > max_area)
    too_big = too_big[too_big > 0]
    return mc & ~np.isin(labels, too_big) if len(too_big) else mc


def extract_patches(image: np.ndarray, mc_mask: np.ndarray, breast: np.ndarray,
                    rng: np.random.Generator, per_stratum: dict[str, int] | None = None,
                    source: int = 0, spacing_mm: float = 0.05) -> PatchSet:
    """Cut 49 px patches from one working-grid image at centres drawn per distance stratum.

    Parameters
    ----------
    image : numpy.ndarray
        (rows, columns) float in [0, 1] on the working grid (``spacing_mm`` per pixel).
    mc_mask : numpy.ndarray
        Boolean microcalcification mask on the same grid.
    breast : numpy.ndarray
        Boolean breast mask on the same grid; every centre is inside it.
    rng : numpy.random.Generator
        Draws the centres.
    per_stratum : dict, optional
        Centres per stratum of :data:`STRATA` (default :data:`DEFAULT_PER_STRATUM`); a stratum
        with fewer pixels gives them all.
    source : int
        Bookkeeping tag of every patch (phantom seed * 10 + image index).
    spacing_mm : float
        Working pixel size, mm: the strata's distances are kept in mm (:func:`stratum_limits`).

    Returns
    -------
    PatchSet
        Patches centred on the drawn pixels; outside the image is zero (as at inference).
    """
    per_stratum = per_stratum or DEFAULT_PER_STRATUM
    lim = stratum_limits(spacing_mm)
    edge, near, half = lim["edge"], lim["near"], lim["periphery"]
    within = {d: box_any(mc_mask, d) for d in (edge, near, half)}
    pools = {
        "on": mc_mask,
        "edge": within[edge] & ~mc_mask,
        "near": within[near] & ~within[edge],
        "periphery": within[half] & ~within[near],
        "far": breast & ~within[half],
    }
    centres = []
    for name in STRATA:
        idx = np.flatnonzero(pools[name] & breast if name != "far" else pools[name])
        n = min(per_stratum.get(name, 0), len(idx))
        if n:
            centres.append(rng.choice(idx, size=n, replace=False))
    flat = np.concatenate(centres) if centres else np.zeros(0, dtype=np.int64)
    return cut_patches(image, mc_mask, flat, source)


def cut_patches(image: np.ndarray, mc_mask: np.ndarray, centres: np.ndarray, source: int = 0) -> PatchSet:
    """49 px patches (and MC masks) centred on flat pixel indices ``centres``; zero outside.

    Parameters
    ----------
    image : numpy.ndarray
        (rows, columns) float image.
    mc_mask : numpy.ndarray
        Boolean microcalcification mask of the same shape.
    centres : numpy.ndarray
        Flat (row-major) indices into ``image`` of the patch centres.
    source : int
        Bookkeeping tag of every patch.
    """
    half = CACHE_PATCH // 2
    padded_img = np.pad(image.astype(np.float32), half)
    padded_mask = np.pad(mc_mask, half)
    rr, cc = np.divmod(np.asarray(centres, dtype=np.int64), image.shape[1])
    win = np.arange(CACHE_PATCH)
    rows = rr[:, None, None] + win[None, :, None]
    cols = cc[:, None, None] + win[None, None, :]
    return PatchSet(padded_img[rows, cols], padded_mask[rows, cols], np.full(len(rr), source, dtype=np.int64))


def working_grid_of(mammogram: Mammogram, masks: dict[str, np.ndarray], breast: np.ndarray,
                    spacing_mm: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The breast box of a decoded image on the working grid, as the node crops and resamples it.

    Parameters
    ----------
    mammogram : Mammogram
        The decoded image (intensities [0, 1], ``spacing_mm`` per pixel).
    masks : dict
        Its ground truth on the stored grid (``calcification_benign``/``_malignant`` used).
    breast : numpy.ndarray
        Boolean breast mask on the stored grid (the crop box is its bounding box).
    spacing_mm : float
        Working pixel size, mm.

    Returns
    -------
    tuple of numpy.ndarray
        (image [0, 1], MC mask, breast mask) on the working grid. When the working grid is
        coarser than the source (e.g. 0.1 mm from a 0.05 mm scan), a working pixel is MC where
        at least :data:`MC_SHRINK_FRACTION` of it is (nearest neighbour would drop most
        specks of one or two source pixels); otherwise the mask is resampled nearest.
    """
    mc = microcalcification_mask(masks, mammogram.spacing_mm[0])
    breast = np.asarray(breast, dtype=bool)
    r_idx, c_idx = np.flatnonzero(breast.any(axis=1)), np.flatnonzero(breast.any(axis=0))
    r0, r1, c0, c1 = r_idx[0], r_idx[-1] + 1, c_idx[0], c_idx[-1] + 1
    sr, sc = (float(v) for v in mammogram.spacing_mm)
    shape = (max(1, round((r1 - r0) * sr / spacing_mm)), max(1, round((c1 - c0) * sc / spacing_mm)))
    image = resize(mammogram.pixels[r0:r1, c0:c1], shape)
    if spacing_mm > 1.2 * min(sr, sc):
        mc_w = resize(mc[r0:r1, c0:c1].astype(np.float32), shape) >= MC_SHRINK_FRACTION
    else:
        mc_w = resize(mc[r0:r1, c0:c1].astype(np.float32), shape, mode="nearest") > 0.5
    br_w = resize(breast[r0:r1, c0:c1].astype(np.float32), shape, mode="nearest") > 0.5
    return image, mc_w, br_w


def working_grid(img, spacing_mm: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A PhantomImage's breast box on the 0.05 mm grid, decoded as the node does:
    (image [0, 1], MC mask, breast mask)."""
    return working_grid_of(read_mammogram(img.dataset), img.masks, img.breast_mask, spacing_mm)


# --------------------------------------------------------------------------------------------
# Real backgrounds: any adapter, resolution degradation, cached patches


@dataclass(frozen=True)
class Degradation:
    """Resolution augmentation of whole training images (:func:`degrade_resolution`).

    ``share`` of the images (drawn per image, seeded) are shrunk to a pixel size drawn
    uniformly in ``spacing_mm`` (mm), quantised to ``bits`` (None: not quantised) and
    resampled back to the working grid.
    """

    share: float = 0.0
    spacing_mm: tuple[float, float] = (0.1, 0.2)
    bits: int | None = 8

    def draw(self, seed: int, index: int) -> float | None:
        """The coarse pixel size (mm) of image ``index``, or None when it stays as it is."""
        if self.share <= 0:
            return None
        rng = np.random.default_rng([int(seed), int(index), 0xDE6])
        if rng.random() >= self.share:
            return None
        return round(float(rng.uniform(*self.spacing_mm)), 3)


def degrade_resolution(image: np.ndarray, coarse_mm: float, spacing_mm: float = 0.05,
                       bits: int | None = 8) -> np.ndarray:
    """``image`` (working grid, ``spacing_mm`` pixels) as a scan at ``coarse_mm`` pixels would give it
    to the node: antialiased shrink to ``coarse_mm`` (the digitiser's aperture), quantised to
    ``bits``, then resampled back to the working grid with the node's own bilinear resize.

    Returns float32 of ``image.shape`` in [0, 1]; the microcalcification mask is not changed
    (a speck that fades below the noise at 0.2 mm stays a target, as a radiologist's
    annotation of a coarse scan would)."""
    factor = coarse_mm / spacing_mm
    small = (max(1, round(image.shape[0] / factor)), max(1, round(image.shape[1] / factor)))
    coarse = resize(image, small)
    if bits:
        levels = float(2 ** bits - 1)
        coarse = np.round(np.clip(coarse, 0.0, 1.0) * levels) / levels
    return np.clip(resize(coarse, image.shape), 0.0, 1.0).astype(np.float32)


@dataclass
class WorkingView:
    """One training image on the 0.05 mm working grid (``coarse_mm``: its degradation, or None)."""

    image: np.ndarray
    mc: np.ndarray
    breast: np.ndarray
    index: int
    coarse_mm: float | None


def dataset_views(dataset, indices: Iterable[int], spacing_mm: float = 0.05,
                  degradation: Degradation = Degradation(), seed: int = 0) -> Iterator[WorkingView]:
    """Images ``indices`` of an adapter on the working grid (hybrids are generated on the fly),
    each degraded as ``degradation`` draws for ``(seed, index)``."""
    for index in indices:
        sample = dataset[int(index)]
        image, mc, breast = working_grid_of(sample.image, sample.masks, sample.image.breast_mask, spacing_mm)
        coarse = degradation.draw(seed, index)
        if coarse is not None:
            image = degrade_resolution(image, coarse, spacing_mm, degradation.bits)
        yield WorkingView(image, mc, breast, int(index), coarse)


#: Source files whose content decides what a cached patch of a real data set holds.
_DATA_SOURCES = ("insertion.py", "datasets.py")


def data_tag(name: str, options: dict) -> str:
    """Short hash naming a data set variant in cache folders: its name, its keyword options
    (hybrid seed, copies, lesion counts ...) and the code of insertion and adapters."""
    digest = hashlib.sha256(json.dumps([name, options], sort_keys=True, default=str).encode())
    for file in _DATA_SOURCES:
        digest.update((Path(__file__).resolve().parent.parent / "data" / file).read_bytes())
    return digest.hexdigest()[:10]


def dataset_patches(dataset, name: str, indices: Sequence[int], cache_dir: str | Path, tag: str,
                    degradation: Degradation = Degradation(), seed: int = 0,
                    per_stratum: dict[str, int] | None = None, progress: bool = True,
                    spacing_mm: float = 0.05) -> PatchSet:
    """Patches of images ``indices`` of an adapter, cached per image (``.npy`` as for phantoms).

    Parameters
    ----------
    dataset
        Any :mod:`dicom_ai.data.datasets` adapter (hybrid data sets included).
    name : str
        Its ``--dataset`` name (cache folder names; no patient data in it).
    indices : sequence of int
        The images to use (e.g. the training folds').
    cache_dir : str or Path
        Root of the patch cache; one folder per image,
        ``<name>-<tag>-i<index>-<degradation>-<generator version>``.
    tag : str
        :func:`data_tag` of the data set's options.
    degradation : Degradation
        Resolution augmentation (drawn per image from ``(seed, index)``).
    seed : int
        Seeds the degradation draw and the choice of patch centres.
    per_stratum : dict, optional
        Patches per centre stratum and image (default :data:`DEFAULT_PER_STRATUM`).
    progress : bool
        Show a progress bar.
    spacing_mm : float
        Working pixel size, mm (a grid other than 0.05 mm is part of the cache key).

    Returns
    -------
    PatchSet
        ``source`` is the image index.
    """
    safe = name.replace(":", "_").replace("/", "_").replace("=", "_")
    deg = json.dumps(asdict(degradation), sort_keys=True)
    strata = "" if per_stratum is None else json.dumps(per_stratum, sort_keys=True)
    # 0.05 mm keeps its historical key, so the caches of earlier runs stay valid.
    grid = "" if spacing_mm == 0.05 else f"|{spacing_mm:g}mm"
    key = hashlib.sha256(f"{deg}|{strata}|{seed}{grid}".encode()).hexdigest()[:8]
    sets = []
    for index in tqdm(indices, desc=f"{name} patches", disable=not progress):
        folder = cache_folder(cache_dir, f"{safe}-{tag}-i{int(index)}-{key}")
        if read_marker(folder) is not None:
            sets.append(PatchSet(np.load(folder / "images.npy").astype(np.float32), np.load(folder / "masks.npy"),
                                 np.load(folder / "source.npy")))
            continue
        view = next(dataset_views(dataset, [index], spacing_mm, degradation=degradation, seed=seed))
        rng = np.random.default_rng([int(seed), int(index), 0x9A7])
        patches = extract_patches(view.image, view.mc, view.breast, rng, per_stratum, source=int(index),
                                  spacing_mm=spacing_mm)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "images.npy", patches.images.astype(np.float16))
        np.save(folder / "masks.npy", patches.masks)
        np.save(folder / "source.npy", patches.source)
        write_marker(folder, {"dataset": name, "index": int(index), "coarse_mm": view.coarse_mm,
                              "count": len(patches), "mc_pixels": int(view.mc.sum())})
        patches.images = patches.images.astype(np.float16).astype(np.float32)  # as if read back
        sets.append(patches)
    if not sets:
        return PatchSet(np.zeros((0, CACHE_PATCH, CACHE_PATCH), np.float32),
                        np.zeros((0, CACHE_PATCH, CACHE_PATCH), bool), np.zeros(0, np.int64))
    return PatchSet.concat(sets)


def phantom_image_patches(img, rng: np.random.Generator, spacing_mm: float = 0.05,
                          per_stratum: dict[str, int] | None = None, source: int = 0) -> PatchSet:
    """Patches of one PhantomImage, decoded and resampled exactly as the node does.

    Parameters
    ----------
    img : PhantomImage
        The view (its DICOM data set and ground truth masks).
    rng : numpy.random.Generator
        Draws the centres.
    spacing_mm : float
        Working grid pixel spacing, mm.
    per_stratum : dict, optional
        Centres per stratum (see :func:`extract_patches`).
    source : int
        Bookkeeping tag of every patch.
    """
    image, mc_w, br_w = working_grid(img, spacing_mm)
    return extract_patches(image, mc_w, br_w, rng, per_stratum, source)


def mine_hard_negatives(detector, segmentator, seeds: list[int], shape: tuple[int, int] = FULL_SHAPE,
                        per_image: int = 300, seed: int = 0, progress: bool = True) -> tuple[PatchSet, PatchSet]:
    """False positives of a first-round cascade on whole phantom training images (:func:`mine_views`).

    Parameters
    ----------
    detector, segmentator : PatchCNN
        The first-round networks (the cascade's thresholds come from their config).
    seeds : list of int
        Phantom studies to mine.
    shape : tuple of int
        Stored (rows, columns) of the generated views, in pixels.
    per_image, seed, progress
        As :func:`mine_views`.
    """
    def views():
        for study_seed in seeds:
            study = generate_study(study_seed, shape=shape)
            for k, img in enumerate(study.images):
                image, mc, breast = working_grid(img, detector.config.pixel_spacing_mm)
                yield WorkingView(image, mc, breast, study_seed * 10 + k, None)

    return mine_views(detector, segmentator, views(), per_image, seed, progress, total=len(seeds) * 4)


def mine_views(detector, segmentator, views: Iterable[WorkingView], per_image: int = 300, seed: int = 0,
               progress: bool = True, total: int | None = None) -> tuple[PatchSet, PatchSet]:
    """False positives of a first-round cascade on whole working-grid training images.

    Detector: grid points where it fires on a C4 patch. Segmentator: pixels inside the
    fired area, not MC, where it says MC (tested on a random sample of such pixels).

    Parameters
    ----------
    detector, segmentator : PatchCNN
        The first-round networks (the cascade's thresholds come from their config).
    views : iterable of WorkingView
        Training images on the working grid (their ``index`` tags the patches).
    per_image : int
        At most this many hard negatives of each network per image.
    seed : int
        Seeds the choice among the candidates.
    progress : bool
        Show a progress bar.
    total : int, optional
        Length of ``views`` for the progress bar.

    Returns
    -------
    tuple of PatchSet
        (detector hard negatives, segmentator hard negatives).
    """
    rng = np.random.default_rng(seed)
    model = MicrocalcModel(detector, segmentator, ModelIdentity("mining", "0"))
    cfg, s, half = model.config, model.config.detector_stride, model.config.patch_size // 2
    det_sets, seg_sets = [], []
    for view in tqdm(views, desc="mining hard negatives", disable=not progress, total=total):
        image, mc, breast, tag = view.image, view.mc, view.breast, view.index
        det = model.detector_map(image, breast)
        grid_breast = breast[::s, ::s][:det.shape[0], :det.shape[1]]
        grid_class = patch_classes(mc, cfg.patch_size)[::s, ::s][:det.shape[0], :det.shape[1]]
        fired = (det >= cfg.detector_threshold) & grid_breast
        hard = np.flatnonzero(fired & (grid_class == C4))
        if len(hard):
            pick = rng.choice(hard, size=min(per_image, len(hard)), replace=False)
            gi, gj = np.divmod(pick, det.shape[1])
            det_sets.append(cut_patches(image, mc, gi * s * image.shape[1] + gj * s, tag))
        # Pixels the Segmentator would visit: within half a patch of a fired grid point.
        fired_px = np.zeros(image.shape, dtype=bool)
        fired_px[::s, ::s][:fired.shape[0], :fired.shape[1]] = fired
        fired_px = box_any(fired_px, half) & breast & ~mc
        cand = np.flatnonzero(fired_px)
        if len(cand):
            cand = rng.choice(cand, size=min(20 * per_image, len(cand)), replace=False)
            patches = cut_patches(image, mc, cand, tag)
            x = torch.from_numpy(patches.crop(cfg.patch_size)[0].copy())[:, None]
            with torch.no_grad():
                p = torch.cat([torch.softmax(segmentator(x[i:i + 512]), 1)[:, 1]
                               for i in range(0, len(x), 512)]).numpy()
            wrong = np.flatnonzero(p >= cfg.calcification_threshold)[:per_image]
            if len(wrong):
                seg_sets.append(PatchSet(patches.images[wrong], patches.masks[wrong], patches.source[wrong]))
    empty = PatchSet(np.zeros((0, CACHE_PATCH, CACHE_PATCH), np.float32),
                     np.zeros((0, CACHE_PATCH, CACHE_PATCH), bool), np.zeros(0, np.int64))
    return (PatchSet.concat(det_sets) if det_sets else empty, PatchSet.concat(seg_sets) if seg_sets else empty)


def patch_cache_folder(cache_dir: str | Path, seed: int, shape: tuple[int, int] = FULL_SHAPE,
                       per_stratum: dict[str, int] | None = None) -> Path:
    """The cache folder of the patches of phantom study ``seed`` (see :func:`phantom_patches`).

    Parameters
    ----------
    cache_dir : str or Path
        Root of the patch cache (``build/microcalc`` for ``dicom-ai train microcalc``).
    seed : int
        Phantom study seed.
    shape : tuple of int
        Stored (rows, columns) of the generated views, in pixels.
    per_stratum : dict, optional
        Patches per centre stratum; a non-default count gets a folder of its own.

    Returns
    -------
    Path
        ``cache_dir / "seed<seed>_<rows>x<cols>-<generator version>"`` (not created).
    """
    prefix = f"seed{seed}_{shape[0]}x{shape[1]}"
    if per_stratum is not None and per_stratum != DEFAULT_PER_STRATUM:
        prefix += "_" + "-".join(f"{name}{per_stratum.get(name, 0)}" for name in STRATA)
    return cache_folder(cache_dir, prefix)


def phantom_patches(seed: int, cache_dir: str | Path, shape: tuple[int, int] = FULL_SHAPE,
                    per_stratum: dict[str, int] | None = None) -> PatchSet:
    """Patches of the 4 images of phantom study ``seed``, from the cache or generated once.

    Parameters
    ----------
    seed : int
        Phantom study seed (also seeds the choice of patch centres).
    cache_dir : str or Path
        Root of the patch cache; the folder is :func:`patch_cache_folder`.
    shape : tuple of int
        Stored (rows, columns) of the generated views, in pixels (full size: 0.07 mm).
    per_stratum : dict, optional
        Patches per centre stratum and image (default :data:`DEFAULT_PER_STRATUM`).

    Returns
    -------
    PatchSet
        49 px patches on the 0.05 mm working grid; images stored as float16 in the cache and
        returned as float32 (the same values whether generated or read back).
    """
    folder = patch_cache_folder(cache_dir, seed, shape, per_stratum)
    if read_marker(folder) is not None:
        return PatchSet(np.load(folder / "images.npy").astype(np.float32), np.load(folder / "masks.npy"),
                        np.load(folder / "source.npy"))
    study = generate_study(seed, shape=shape)
    rng = np.random.default_rng(seed)
    sets = [phantom_image_patches(img, rng, per_stratum=per_stratum, source=seed * 10 + k)
            for k, img in enumerate(study.images)]
    patches = PatchSet.concat(sets)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", patches.images.astype(np.float16))
    np.save(folder / "masks.npy", patches.masks)
    np.save(folder / "source.npy", patches.source)
    write_marker(folder, {"seed": seed, "shape": list(shape), "count": len(patches)})
    patches.images = patches.images.astype(np.float16).astype(np.float32)  # as if read back
    return patches


def has_cluster(seed: int) -> bool:
    """Whether phantom study ``seed`` holds a calcification cluster (checked on a tiny render:
    findings are drawn in mm before rendering, so they do not depend on the image size)."""
    study = generate_study(seed, shape=(128, 96))
    return any(f.kind == "cluster" for found in study.findings.values() for f in found)


def load_patches(seeds: list[int], cache_dir: str | Path, shape: tuple[int, int] = FULL_SHAPE,
                 progress: bool = True) -> PatchSet:
    """Patches of several phantom studies (cached per seed, see :func:`phantom_patches`).

    Parameters
    ----------
    seeds : list of int
        Phantom study seeds.
    cache_dir : str or Path
        Root of the patch cache.
    shape : tuple of int
        Stored (rows, columns) of the generated views, in pixels.
    progress : bool
        Show a progress bar.
    """
    sets = [phantom_patches(s, cache_dir, shape) for s in tqdm(seeds, desc="phantom patches", disable=not progress)]
    return PatchSet.concat(sets)


# --------------------------------------------------------------------------------------------
# Training and patch-level evaluation


def _class_quota(role: str) -> dict[int, float]:
    if role == "detector":
        return {1: 1 / 6, 2: 1 / 6, 3: 1 / 6, 4: 1 / 2}
    if role == "segmentator":
        return {1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}
    raise ValueError(f"role must be 'detector' or 'segmentator', got {role!r}")


def balanced_indices(classes: np.ndarray, role: str, n: int, rng: np.random.Generator,
                     replace: bool = True) -> np.ndarray:
    """``n`` patch indices drawn per the role's class quota.

    Parameters
    ----------
    classes : numpy.ndarray
        Patch class (1..4) of every patch.
    role : {"detector", "segmentator"}
        Whose quota (Detector: half C4, the rest C1-C3 equally; Segmentator: a quarter each).
    n : int
        Indices to draw; classes with no patches are skipped and their share goes to the others.
    rng : numpy.random.Generator
        Draws the indices.
    replace : bool
        Draw with replacement; without, a class gives at most the patches it has.
    """
    quota = {c: q for c, q in _class_quota(role).items() if np.any(classes == c)}
    if not quota:
        raise ValueError("no patches to sample from")
    total = sum(quota.values())
    out = []
    for c, q in quota.items():
        pool = np.flatnonzero(classes == c)
        k = int(round(n * q / total))
        if not replace:
            k = min(k, len(pool))
        out.append(rng.choice(pool, size=k, replace=replace))
    return np.concatenate(out)


def augment(batch, generator):
    """Random rotation by a multiple of 90 degrees and random flip, per patch (torch)."""
    k = torch.randint(0, 8, (batch.shape[0],), generator=generator)
    out = batch.clone()
    for t in range(8):
        sel = k == t
        if sel.any():
            x = torch.rot90(batch[sel], t % 4, dims=(-2, -1))
            out[sel] = torch.flip(x, dims=(-1,)) if t >= 4 else x
    return out


@dataclass(frozen=True)
class IntensityAugmentation:
    """Per-patch intensity changes (:func:`intensity_augment`): ``gamma`` range (drawn
    log-uniformly), ``contrast`` factor range about the patch mean, ``brightness`` offset
    range, ``noise`` standard deviation range (Gaussian, per pixel); intensities in [0, 1]."""

    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.7, 1.4)
    brightness: tuple[float, float] = (-0.08, 0.08)
    noise: tuple[float, float] = (0.0, 0.01)


def intensity_augment(batch: torch.Tensor, generator: torch.Generator,
                      aug: IntensityAugmentation = IntensityAugmentation()) -> torch.Tensor:
    """Random gamma, contrast about the patch mean, brightness and noise per patch (N, 1, P, P),
    clipped to [0, 1]; zero padding outside the image stays zero (as at inference)."""
    n = batch.shape[0]

    def draw(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=generator)).to(batch.dtype)

    inside = batch > 0
    gamma = torch.exp(draw(math.log(aug.gamma[0]), math.log(aug.gamma[1])))
    x = batch.clamp(0.0, 1.0) ** gamma
    mean = x.mean(dim=(-2, -1), keepdim=True)
    x = mean + (x - mean) * draw(*aug.contrast) + draw(*aug.brightness)
    x = x + torch.randn(batch.shape, generator=generator).to(batch.dtype) * draw(*aug.noise)
    return torch.where(inside, x.clamp(0.0, 1.0), batch)


class _Pool:
    """Training patches of one role as tensors: the class-balanced pool, plus mined hard negatives."""

    def __init__(self, config, role: str, patches: PatchSet, hard: PatchSet | None, batch: int, hard_share: float):
        images, _ = patches.crop(config.patch_size)
        self.classes = patches.classes(config.patch_size)
        targets = torch.from_numpy(role_targets(self.classes, role).astype(np.int64))
        self.role = role
        self.n_hard = int(round(batch * hard_share)) if hard is not None and len(hard) else 0
        self.hard_count = len(hard) if self.n_hard else 0
        if self.n_hard:
            hard_images, _ = hard.crop(config.patch_size)
            images = np.concatenate([images, hard_images])
            targets = torch.cat([targets, torch.from_numpy(
                role_targets(hard.classes(config.patch_size), role).astype(np.int64))])
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        self.targets = targets
        self.batch = batch

    def draw(self, rng: np.random.Generator) -> torch.Tensor:
        idx = balanced_indices(self.classes, self.role, self.batch - self.n_hard, rng)
        if self.n_hard:
            idx = np.concatenate([idx, len(self.classes) + rng.integers(0, self.hard_count, self.n_hard)])
        return torch.from_numpy(idx)


def _cosine(lr: float, step: int, steps: int) -> float:
    """Cosine decay from ``lr`` to 5 % of it over ``steps`` (as CosineAnnealingLR, eta_min 0.05 lr)."""
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1))))


def _steps(net: PatchCNN, opt: torch.optim.Optimizer, pool: _Pool, first: int, last: int, steps: int, lr: float,
           rng: np.random.Generator, gen: torch.Generator, intensity: IntensityAugmentation | None,
           bar=None) -> list[float]:
    """Optimisation steps ``first`` .. ``last - 1`` of a phase of ``steps`` steps; their losses."""
    losses = []
    net.train()
    for step in range(first, last):
        for group in opt.param_groups:
            group["lr"] = _cosine(lr, step, steps)
        idx = pool.draw(rng)
        x = augment(pool.images[idx][:, None], gen)
        if intensity is not None:
            x = intensity_augment(x, gen, intensity)
        loss = F.cross_entropy(net(x), pool.targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    net.eval()
    return losses


def train_network(config, role: str, patches: PatchSet, steps: int = 1000, batch: int = 64,
                  lr: float = 1e-3, seed: int = 0, checkpoint: Path | None = None,
                  progress: bool = True, desc: str | None = None, init=None,
                  hard: PatchSet | None = None, hard_share: float = 0.25,
                  intensity: IntensityAugmentation | None = None):
    """Train one network for ``role`` on class-balanced batches.

    Parameters
    ----------
    config : MicrocalcConfig
        Network configuration (patch size in px, padding, widths).
    role : {"detector", "segmentator"}
        What the network learns (see :func:`balanced_indices` for the class quota).
    patches : PatchSet
        Training patches (centre-cropped to ``config.patch_size``).
    steps : int
        Optimisation steps (cosine learning-rate decay to 5 % of ``lr``).
    batch : int
        Patches per step.
    lr : float
        Initial Adam learning rate.
    seed : int
        Seeds the initialisation, the batches and the augmentation.
    checkpoint : Path, optional
        Receives the weights as safetensors every 200 steps and at the end.
    progress : bool
        Show a progress bar.
    desc : str, optional
        Progress bar label.
    init : PatchCNN, optional
        Continue from its weights.
    hard : PatchSet, optional
        Mined hard negatives, which fill ``hard_share`` of every batch.
    hard_share : float
        Fraction of a batch taken from ``hard``.
    intensity : IntensityAugmentation, optional
        Per-patch intensity augmentation on top of rotations and flips (None: none).

    Returns
    -------
    tuple
        The trained network (in eval mode) and the loss of every step.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    net = PatchCNN(config)
    if init is not None:
        net.load_state_dict(init.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    pool = _Pool(config, role, patches, hard, batch, hard_share)
    losses: list[float] = []
    with tqdm(total=steps, desc=desc or f"{role} {config.patch_size}px {config.padding}", disable=not progress) as bar:
        for first in range(0, steps, 200):
            last = min(first + 200, steps)
            losses += _steps(net, opt, pool, first, last, steps, lr, rng, gen, intensity, bar)
            if checkpoint is not None:
                Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(checkpoint))
    net.eval()
    return net, losses


@dataclass(frozen=True)
class Phase:
    """One phase of :func:`train_cascade`: ``role`` trained ``steps`` steps at initial ``lr``,
    with mined hard negatives in its batches when ``hard``."""

    role: str
    round: int
    steps: int
    lr: float
    hard: bool

    @property
    def name(self) -> str:
        return f"{self.role}-{self.round}"


def cascade_phases(steps: int, hard_steps: int, lr: float) -> list[Phase]:
    """The schedule: Detector then Segmentator for ``steps`` each at ``lr``; then, when
    ``hard_steps`` > 0, both again with hard negatives at ``lr / 3``."""
    phases = [Phase(role, 1, steps, lr, False) for role in ROLES]
    if hard_steps > 0:
        phases += [Phase(role, 2, hard_steps, lr / 3, True) for role in ROLES]
    return [p for p in phases if p.steps > 0]


def _validation_batches(config, val: PatchSet | None, per_class: int, seed: int) -> dict:
    """Fixed, class-balanced held-out patches per role for the learning curves."""
    if val is None or not len(val):
        return {}
    rng = np.random.default_rng([seed, 0xA11])
    classes = val.classes(config.patch_size)
    images, _ = val.crop(config.patch_size)
    out = {}
    for role in ROLES:
        idx = balanced_indices(classes, role, per_class * (6 if role == "detector" else 4), rng, replace=False)
        out[role] = (torch.from_numpy(np.ascontiguousarray(images[idx], dtype=np.float32))[:, None],
                     torch.from_numpy(role_targets(classes[idx], role).astype(np.int64)))
    return out


@torch.no_grad()
def _validate(net: PatchCNN, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    net.eval()
    x, y = batch
    logits = torch.cat([net(x[i:i + 512]) for i in range(0, len(x), 512)])
    pred = logits.argmax(1)
    sens = float((pred[y == 1] == 1).float().mean()) if (y == 1).any() else float("nan")
    spec = float((pred[y == 0] == 0).float().mean()) if (y == 0).any() else float("nan")
    return {"val_loss": float(F.cross_entropy(logits, y)), "val_balanced_accuracy": 0.5 * (sens + spec)}


def train_cascade(config: MicrocalcConfig, patches: PatchSet, *, steps: int, hard_steps: int, batch: int = 64,
                  lr: float = 1e-3, seed: int = 0, block: int = 100,
                  mine: Callable[[PatchCNN, PatchCNN], tuple[PatchSet, PatchSet]] | None = None,
                  intensity: IntensityAugmentation | None = None, val: PatchSet | None = None,
                  state: RunState | None = None, resume: bool = False, info: dict | None = None,
                  progress: bool = True, on_block: Callable[[dict], None] | None = None
                  ) -> tuple[dict[str, PatchCNN], list[dict], dict[str, int]]:
    """Train Detector and Segmentator through :func:`cascade_phases`, checkpointed per block.

    Parameters
    ----------
    config : MicrocalcConfig
        Configuration of both networks.
    patches : PatchSet
        Training patches.
    steps, hard_steps : int
        Steps per network in the first round and in the hard-negative round (0: no second round).
    batch, lr, seed
        Patches per step, first-round Adam learning rate (cosine decay to 5 % per phase), seed.
        Block ``b`` of a phase draws its batches from ``(seed, phase, b)``, so a resumed run
        continues as an uninterrupted one would (up to floating-point non-determinism).
    block : int
        Steps per block: a record in the curves and a checkpoint.
    mine : callable, optional
        ``mine(detector, segmentator) -> (detector hard negatives, segmentator hard negatives)``
        after the first round (e.g. :func:`mine_views` on training images); kept in the run
        folder (``hard_negatives.npz``) so a resumed run does not mine again.
    intensity : IntensityAugmentation, optional
        Per-patch intensity augmentation (None: rotations and flips only).
    val : PatchSet, optional
        Held-out patches: ``val_loss`` and ``val_balanced_accuracy`` of the phase's network per block.
    state : RunState, optional
        Run folder: both networks (``detector.*``, ``segmentator.*``), the optimiser of the
        current phase, ``curves.csv`` and ``curves.png`` after every block.
    resume : bool
        Continue from ``state``'s last block.
    info : dict, optional
        Stored with every checkpoint (JSON).
    progress : bool
        Progress bars.
    on_block : callable, optional
        Called with each block's record.

    Returns
    -------
    tuple
        ``({"detector": net, "segmentator": net}, history, {"detector": n, "segmentator": n}
        mined hard negatives)``; one history record per block: ``epoch`` (block number over
        the run), ``phase``, ``step`` (within the phase), ``<role>_loss``, ``<role>_val_loss``,
        ``<role>_val_balanced_accuracy``, ``lr``, ``seconds``.
    """
    torch.manual_seed(seed)
    nets = nn.ModuleDict({role: PatchCNN(config) for role in ROLES})
    phases = cascade_phases(steps, hard_steps, lr)
    plan = [(k, b) for k, ph in enumerate(phases) for b in range(math.ceil(ph.steps / block))]
    history: list[dict] = []
    done = 0
    if resume and state is not None and state.exists():
        done, history, _ = state.load(nets)
    val_batches = _validation_batches(config, val, 100, seed)
    hard: dict[str, PatchSet] | None = None
    mined = {role: 0 for role in ROLES}
    hard_file = state.folder / "hard_negatives.npz" if state is not None else None
    opt, opt_phase = None, None
    pools: dict[int, _Pool] = {}
    for e in range(done, len(plan)):
        k, b = plan[e]
        ph = phases[k]
        if ph.hard and hard is None:
            hard = _hard_negatives(nets, mine, hard_file)
            mined = {role: len(hard[role]) for role in ROLES}
        if opt_phase != k:
            net = nets[ph.role]
            opt, opt_phase = torch.optim.Adam(net.parameters(), lr=ph.lr), k
            if b > 0 and state is not None and state.exists():
                state.load(nets, opt)  # resumed inside a phase: its optimiser state too
            if k not in pools:
                pools = {k: _Pool(config, ph.role, patches, hard[ph.role] if ph.hard and hard else None, batch, 0.25)}
        t0 = time.time()
        first, last = b * block, min((b + 1) * block, ph.steps)
        rng = np.random.default_rng([seed, k, b])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        torch.manual_seed(int(rng.integers(2**62)))  # dropout
        with tqdm(total=last - first, desc=f"{ph.name} block {b + 1}", disable=not progress, leave=False) as bar:
            losses = _steps(nets[ph.role], opt, pools[k], first, last, ph.steps, ph.lr, rng, gen, intensity, bar)
        record = {"epoch": e + 1, "phase": ph.name, "step": last, f"{ph.role}_loss": float(np.mean(losses))}
        if ph.role in val_batches:
            record.update({f"{ph.role}_{key}": v for key, v in _validate(nets[ph.role], val_batches[ph.role]).items()})
        record["lr"] = _cosine(ph.lr, last, ph.steps)
        record["seconds"] = round(time.time() - t0, 1)
        history.append(record)
        if state is not None:
            state.save(nets, opt, e + 1, history, dict(info or {}, config=config.to_dict(), mined=mined))
        if on_block is not None:
            on_block(record)
    if hard is None and any(ph.hard for ph in phases) and hard_file is not None and hard_file.is_file():
        hard = _hard_negatives(nets, None, hard_file)
        mined = {role: len(hard[role]) for role in ROLES}
    for net in nets.values():
        net.eval()
    return {role: nets[role] for role in ROLES}, history, mined


def _hard_negatives(nets, mine, hard_file: Path | None) -> dict[str, PatchSet]:
    """The mined hard negatives: read back from the run folder, or mined now and kept there."""
    if hard_file is not None and hard_file.is_file():
        with np.load(hard_file, allow_pickle=False) as z:
            return {role: PatchSet(z[f"{role}_images"].astype(np.float32), z[f"{role}_masks"], z[f"{role}_source"])
                    for role in ROLES}
    if mine is None:
        raise ValueError("the hard-negative round needs a mining function")
    for net in nets.values():
        net.eval()
    found = dict(zip(ROLES, mine(nets["detector"], nets["segmentator"])))
    if hard_file is not None:
        hard_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = hard_file.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **{f"{role}_{part}": getattr(found[role], part)
                                    for role in ROLES for part in ("images", "masks", "source")})
        tmp.replace(hard_file)
    return found


def evaluate_patches(net, role: str, patches: PatchSet, per_class: int = 500, seed: int = 1) -> dict:
    """Accuracy, sensitivity and specificity on a held-out set balanced per the role's quota.

    Patch-level accuracy on a balanced set is the seed paper's metric; sensitivity and
    specificity say what it hides.

    Parameters
    ----------
    net : PatchCNN
        The network; its ``config.patch_size`` decides the crops and classes.
    role : {"detector", "segmentator"}
        Which targets and quota.
    patches : PatchSet
        Held-out patches.
    per_class : int
        Size of the balanced set in units of the smallest quota share (6 or 4 of them).
    seed : int
        Seeds the draw of the balanced set.

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``sensitivity``, ``specificity``, the confusion counts and
        ``accuracy_per_class`` (C1-C4), at the 0.5 probability threshold.
    """
    rng = np.random.default_rng(seed)
    p = net.config.patch_size
    classes = patches.classes(p)
    n = per_class * (6 if role == "detector" else 4)
    idx = balanced_indices(classes, role, n, rng, replace=False)
    images, _ = patches.crop(p)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images[idx], dtype=np.float32))[:, None]
        prob = torch.cat([torch.softmax(net(x[i:i + 512]), 1)[:, 1] for i in range(0, len(x), 512)]).numpy()
    truth = role_targets(classes[idx], role)
    pred = prob >= 0.5
    tp, tn = int(np.sum(pred & truth)), int(np.sum(~pred & ~truth))
    fp, fn = int(np.sum(pred & ~truth)), int(np.sum(~pred & truth))
    per_cls = {f"C{c}": float(np.mean(pred[classes[idx] == c] == truth[classes[idx] == c]))
               for c in (1, 2, 3, 4) if np.any(classes[idx] == c)}
    return {
        "n": int(len(idx)), "accuracy": (tp + tn) / len(idx),
        "sensitivity": tp / max(tp + fn, 1), "specificity": tn / max(tn + fp, 1),
        "tp": tp, "tn": tn, "fp": fp, "fn": fn, "accuracy_per_class": per_cls,
    }


# --------------------------------------------------------------------------------------------
# Study selection and the manifest


def select_seeds(candidates: list[int], cluster_studies: int, normal_studies: int) -> list[int]:
    """The training studies: the first candidates with a calcification cluster, then without.

    Parameters
    ----------
    candidates : list of int
        Candidate phantom seeds, in order.
    cluster_studies : int
        How many candidates with a cluster to keep; 0 keeps every candidate.
    normal_studies : int
        How many candidates without a cluster to add.
    """
    if cluster_studies <= 0:
        return list(candidates)
    with_cluster, without = [], []
    for seed in candidates:
        if len(with_cluster) >= cluster_studies and len(without) >= normal_studies:
            break
        (with_cluster if has_cluster(seed) else without).append(seed)
    return with_cluster[:cluster_studies] + without[:normal_studies]


def mining_seeds(train_seeds: list[int], cluster_studies: int, normal_studies: int, mine_studies: int) -> list[int]:
    """The training studies on which first-round false positives are mined, normal ones first.

    Parameters
    ----------
    train_seeds : list of int
        The training studies as :func:`select_seeds` returned them (cluster studies, then normal).
    cluster_studies : int
        ``cluster_studies`` passed to :func:`select_seeds` (0: no cluster/normal split).
    normal_studies : int
        ``normal_studies`` passed to :func:`select_seeds`.
    mine_studies : int
        How many studies to mine.
    """
    split = len(train_seeds) - normal_studies if cluster_studies > 0 else len(train_seeds)
    return (train_seeds[split:] + train_seeds[:split])[:mine_studies]


def microcalc_manifest(config: MicrocalcConfig, *, version: str, data: str, command: str, seed: int, steps: int,
                       batch: int, lr: float, hard_steps: int, patches: dict, loss: dict, wall_time_s: float,
                       metrics: dict, held_out: str, sources: list[dict] | None = None,
                       training: dict | None = None) -> dict:
    """The manifest of a microcalcification bundle (Detector and Segmentator).

    Parameters
    ----------
    config : MicrocalcConfig
        The configuration of both networks (patch size in px at ``pixel_spacing_mm``).
    version : str
        Bundle version.
    data : str
        What the bundle was trained on, in words (phantom seeds, data sets and folds).
    command : str
        The command line that trained the bundle (no data folders: they may name a site).
    seed : int
        Training seed.
    steps : int
        First-round optimisation steps per network.
    batch : int
        Patches per step.
    lr : float
        First-round Adam learning rate (the second round uses a third of it).
    hard_steps : int
        Second-round steps per network with mined hard negatives.
    patches : dict
        Patch counts: ``train``, ``train_classes`` (per class C1-C4), ``mined_hard_negatives``.
    loss : dict
        Loss summary per network.
    wall_time_s : float
        Training time, seconds.
    metrics : dict
        Held-out patch metrics per network (:func:`evaluate_patches`).
    held_out : str
        What the patch metrics were measured on (phantom seeds, or held-out folds).
    sources : list of dict, optional
        Per data source: ``dataset``, ``images``, ``with_cluster``, ``folds``, ``licence``
        and the adapter's own ``sources`` entries; the manifest's ``licence`` joins their licences.
    training : dict, optional
        More training facts (augmentation, curves, run folder ...), merged into ``training``.
    """
    licences = sorted({s["licence"] for s in sources or [] if s.get("licence")})
    manifest = {
        "name": "microcalc",
        "version": version,
        "family": "Artificial Intelligence",
        "architecture": {"kind": "microcalc", **config.to_dict()},
        "input": {"modality": "MG", "views": ["CC", "MLO"], "pixel_spacing_mm": config.pixel_spacing_mm,
                  "resampling": "breast bounding box resampled (bilinear) from Imager Pixel Spacing to "
                                f"{config.pixel_spacing_mm:g} mm",
                  "intensity": "dicom_ai.preprocess [0, 1], dense tissue bright"},
        "thresholds": {"calcification": config.calcification_threshold,
                       "calcification_cluster": config.cluster_threshold},
        "intended_use": INTENDED_USE if not licences else
        "research / demonstration, not for clinical use; trained on the real images of the sources listed "
        "(with inserted synthetic calcification clusters)",
        "training": {
            "data": data,
            "command": command,
            "seed": seed, "steps_per_network": steps, "batch": batch, "lr": lr,
            "patches": patches,
            "hard_negative_steps_per_network": hard_steps,
            "loss": loss, "wall_time_s": wall_time_s,
            **(training or {}),
        },
        "metrics": {"held_out": held_out, **metrics},
    }
    if sources is not None:
        manifest["training"]["sources"] = sources
        manifest["licence"] = " | ".join(licences) if licences else "synthetic phantoms only"
    return manifest
