"""GLAM training from image-level labels: data, losses, checkpoints, the staged loop, the manifest.

Training follows the staged recipe of GLAM (models.md section 1.6): (a) the global module
with BCE on its top-t% pooled prediction plus an L1 sparsity term on its saliency map,
(b) the local module on the patches the frozen global module selects, with BCE on the
top-t% pooled local prediction plus L1 on the patch maps, (c) optional joint fine-tuning
with the sum of both losses. Only image-level benign/malignant labels reach the losses;
pixel ground truth, when the data has it, is used only to report validation Dice and to
pick the bundle's operating thresholds (:func:`validation_metrics`).

Checkpoints (:class:`~dicom_ai.training.checkpoint.RunState`: weights, optimiser state,
history, curves.csv and curves.png) are written after every epoch; ``resume`` continues from
the last one. Every epoch draws its data order
and augmentation from ``(seed, stage, epoch)``, so a fixed seed reproduces a run, resumed or not.

Owns the phantom data of GLAM (:class:`GlamData`, cached by :func:`load_phantoms` under a
folder named by :func:`dicom_ai.data.cache.generator_version`), the views of any other data
set (:func:`dataset_views`: every adapter of :mod:`dicom_ai.data.datasets`, hybrids too, on
the U-Net's per-image working-grid cache), the losses, the training loop
and the bundle manifest (:func:`glam_manifest`). ``dicom-ai train glam``
(:mod:`dicom_ai.cli.train`) is the command line over these functions.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from dicom_ai.core.errors import DatasetError
from dicom_ai.data.cache import cache_folder, read_marker, write_marker
from dicom_ai.data.datasets import PhantomDataset
from dicom_ai.data.metrics import dice, roc_auc
from dicom_ai.data.phantom import FULL_SHAPE, FULL_SPACING_MM, generate_study
from dicom_ai.imaging import Mammogram, mammogram_from_array, read_mammogram
from dicom_ai.networks.glam import GlamConfig, fuse, glam_geometry, glam_input
from dicom_ai.training.checkpoint import RunState
from dicom_ai.training.common import INTENDED_USE
from dicom_ai.training.dunet_patches import WorkingImage, working_images

__all__ = [
    "STAGES", "MIN_CALIBRATION_DICE", "INTENDED_USE",
    "GlamData", "phantom_shape_for", "phantom_cache_folder", "load_phantoms", "load_phantom_folder", "make_batch",
    "HYBRID_KINDS", "dataset_views", "bce", "class_weights", "stage_loss", "DistributedContext", "distributed_context",
    "cam_loss",
    "predict_images", "train", "calibrate_thresholds", "validation_metrics", "save_cam_weights",
    "glam_manifest",
]

STAGES = ("global", "local", "joint")
#: Below this validation Dice the calibrated operating point is not used (see calibrate_thresholds).
MIN_CALIBRATION_DICE = 0.05
_ARRAYS = ("pixels", "breast", "labels", "lesions")


# --------------------------------------------------------------------------- data


@dataclass
class GlamData:
    """Views ready for windowing: source pixels, breast masks and image-level labels.

    ``lesions`` (N, 2, rows, cols) bool (or a list of (2, rows, cols) when the views differ in
    size, :func:`dataset_views`) holds the benign / malignant lesion ground truth for
    evaluation only; training never reads it.
    """

    mammograms: list[Mammogram]
    breast_masks: list[np.ndarray]
    labels: np.ndarray  # (N, 2) float32: benign, malignant
    lesions: np.ndarray | list[np.ndarray] | None = None
    #: (N,) patient-level fold per view (-1: in every training split, e.g. phantoms); None: no folds.
    folds: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.mammograms)

    def subset(self, indices: Sequence[int]) -> "GlamData":
        """The views ``indices`` (in that order)."""
        idx = [int(i) for i in indices]
        return GlamData([self.mammograms[i] for i in idx], [self.breast_masks[i] for i in idx], self.labels[idx],
                        None if self.lesions is None else
                        (self.lesions[idx] if isinstance(self.lesions, np.ndarray) else [self.lesions[i] for i in idx]),
                        None if self.folds is None else self.folds[idx])

    @staticmethod
    def concatenate(parts: Sequence["GlamData"]) -> "GlamData":
        """The views of ``parts`` one after the other (lesions and folds kept only when every part has them)."""
        parts = list(parts)
        lesions = folds = None
        if all(p.lesions is not None for p in parts):
            lesions = [m for p in parts for m in p.lesions]
        if all(p.folds is not None for p in parts):
            folds = np.concatenate([p.folds for p in parts]).astype(int)
        return GlamData([m for p in parts for m in p.mammograms], [m for p in parts for m in p.breast_masks],
                        np.concatenate([p.labels for p in parts]).astype(np.float32),
                        None if lesions is None else lesions, folds)


def phantom_shape_for(config: GlamConfig) -> tuple[int, int]:
    """The phantom shape whose pixel spacing is the config's (the whole breast kept)."""
    f = FULL_SPACING_MM / config.pixel_spacing_mm
    return int(round(FULL_SHAPE[0] * f)), int(round(FULL_SHAPE[1] * f))


#: What GLAM's benign / malignant channels are trained to find. Masses only: at the
#: compact grid's 0.525 mm pixels a calcification speck (0.1-0.5 mm) is below one pixel, so
#: a view labelled for its calcifications alone is a label the network cannot see (such
#: views made 40-45 % of the positives and kept the weakly supervised network at chance);
#: calcifications are the microcalcification models' job in the node.
LESION_KINDS = ("mass",)


def _lesion_pair(masks: dict[str, np.ndarray]) -> np.ndarray:
    """(2, rows, cols) benign / malignant lesion ground truth of :data:`LESION_KINDS`."""
    return np.stack([np.logical_or.reduce([masks[f"{kind}_{severity}"] for kind in LESION_KINDS])
                     for severity in ("benign", "malignant")])


def _labels_of(lesions: np.ndarray) -> list[float]:
    """Image-level labels: a view is positive for a class when its lesion mask is not empty."""
    return [float(lesions[0].any()), float(lesions[1].any())]


def _phantom_views(seeds: range, shape: tuple[int, int]) -> tuple[list, list, list, list, list]:
    """Generate the studies of ``seeds``; per view: pixels, breast mask, labels, lesions, metadata."""
    pixels, masks, labels, lesions, meta = [], [], [], [], []
    for seed in seeds:
        study = generate_study(seed, shape=tuple(shape))
        for img in study.images:
            m = read_mammogram(img.dataset)
            pixels.append(m.pixels.astype(np.float16))
            masks.append(m.breast_mask)
            lesions.append(_lesion_pair(img.masks))
            labels.append(_labels_of(lesions[-1]))
            meta.append({"seed": seed, "laterality": m.laterality, "view": m.view,
                         "spacing_mm": list(m.spacing_mm), "faces_left": bool(m.faces_left)})
    return pixels, masks, labels, lesions, meta


def phantom_cache_folder(cache: str | Path, first_seed: int, n_studies: int, shape: tuple[int, int]) -> Path:
    """The cache folder of :func:`load_phantoms` (named by shape, seeds and generator version).

    Parameters
    ----------
    cache : str or Path
        Root folder of the GLAM cache (``build/glam-cache`` for ``dicom-ai train glam``).
    first_seed : int
        Phantom seed of the first study.
    n_studies : int
        Number of consecutive studies from ``first_seed``.
    shape : tuple of int
        Stored (rows, columns) of the generated views, in pixels.
    """
    kinds = "+".join(LESION_KINDS)
    return cache_folder(cache, f"phantom-{shape[0]}x{shape[1]}-seed{first_seed}-n{n_studies}-{kinds}")


def load_phantoms(first_seed: int, n_studies: int, shape: tuple[int, int], cache: str | Path | None,
                  progress: bool = True, workers: int = 1) -> GlamData:
    """Generate (or read from ``cache``) ``n_studies`` phantom studies as :class:`GlamData`.

    Parameters
    ----------
    first_seed : int
        Phantom seed of the first study; the studies are ``first_seed .. first_seed + n_studies - 1``.
    n_studies : int
        Number of studies (4 views each).
    shape : tuple of int
        Stored (rows, columns) of the generated views, in pixels (see :func:`phantom_shape_for`).
    cache : str, Path or None
        Root of the cache; None generates without caching. The folder used is
        :func:`phantom_cache_folder`.
    progress : bool
        Show a progress bar on stderr while generating.
    workers : int
        Processes generating disjoint seed ranges; the result does not depend on it.

    Returns
    -------
    GlamData
        Pixels as float16 after :func:`dicom_ai.imaging.read_mammogram` (stored orientation),
        breast masks, (N, 2) labels and (N, 2, rows, cols) lesion masks.

    Notes
    -----
    The cache holds .npy arrays (pixels, breast masks, labels, lesion masks) and a JSON of
    view metadata, written last as the folder's marker; nothing executable.
    """
    folder = None
    if cache is not None:
        folder = phantom_cache_folder(cache, first_seed, n_studies, shape)
        marker = read_marker(folder)
        if marker is not None:
            arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in _ARRAYS}
            return _glam_data(arrays, marker["views"])

    step = 10
    chunks = [range(s, min(s + step, first_seed + n_studies)) for s in range(first_seed, first_seed + n_studies, step)]
    parts = []
    with tqdm(total=n_studies, desc=f"phantoms {shape[0]}x{shape[1]}", disable=not progress, file=sys.stderr) as bar:
        if workers <= 1:
            for chunk in chunks:
                parts.append(_phantom_views(chunk, shape))
                bar.update(len(chunk))
        else:
            # spawn, not fork: a forked child of a process that has used torch can deadlock.
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for chunk, part in zip(chunks, pool.map(_phantom_views, chunks, [shape] * len(chunks))):
                    parts.append(part)
                    bar.update(len(chunk))
    pixels, masks, labels, lesions, meta = ([x for part in parts for x in part[k]] for k in range(5))
    arrays = {"pixels": np.stack(pixels), "breast": np.stack(masks),
              "labels": np.asarray(labels, dtype=np.float32), "lesions": np.asarray(lesions, dtype=bool)}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            np.save(folder / f"{name}.npy", array)
        write_marker(folder, {"views": meta}, indent=1)
    return _glam_data(arrays, meta)


def _glam_data(arrays: dict[str, np.ndarray], meta: list[dict]) -> GlamData:
    mammograms = [mammogram_from_array(arrays["pixels"][i].astype(np.float32), m["laterality"], m["view"],
                                       tuple(m["spacing_mm"]), m["faces_left"]) for i, m in enumerate(meta)]
    return GlamData(mammograms, list(arrays["breast"]), arrays["labels"], arrays["lesions"])


def load_phantom_folder(path: str | Path) -> GlamData:
    """Read a phantom folder written by ``dicom-ai phantom`` (:class:`~dicom_ai.data.datasets.PhantomDataset`).

    Raises :class:`~dicom_ai.core.errors.DatasetError` when the folder holds no image.
    """
    mammograms, masks, labels, lesions = [], [], [], []
    for item in PhantomDataset(path):
        m = item.image
        mammograms.append(m)
        masks.append(m.breast_mask)
        lesions.append(_lesion_pair(item.masks))
        labels.append(_labels_of(lesions[-1]))
    if not mammograms:
        raise DatasetError(f"no images found in phantom folder {path}")
    return GlamData(mammograms, masks, np.asarray(labels, dtype=np.float32), np.asarray(lesions, dtype=bool))


#: Lesion kinds inserted into real backgrounds for GLAM (``hybrid:`` data sets): masses only,
#: as :data:`LESION_KINDS`; an inserted cluster would be a label the 0.525 mm grid cannot see.
HYBRID_KINDS = {"mass": 1.0}


def dataset_views(dataset, name: str, config: GlamConfig, fold_of: Callable[[int], int] | None = None,
                  cache_dir: str | Path | None = None, cache_tag: str = "") -> tuple[GlamData, dict]:
    """Every usable view of a data-set adapter on GLAM's pixel grid, with image-level mass labels.

    The views come from :func:`dicom_ai.training.dunet_patches.working_images` at
    ``config.pixel_spacing_mm`` (breast crop in canonical orientation, chest wall at column 0,
    cached per image under ``cache_dir``), so GLAM and the U-Net read any layout the same way.

    Parameters
    ----------
    dataset
        Any adapter of :mod:`dicom_ai.data.datasets` (``open_dataset(...)``; hybrids too).
    name : str
        Its format name (``mias``, ``hybrid:mias-normals``, ...), used in cache names.
    config : GlamConfig
        The network configuration (its pixel spacing in mm).
    fold_of : callable, optional
        Patient-level fold of image ``index`` (see ``dicom-ai train glam --folds``).
    cache_dir : str or Path, optional
        Root of the per-image cache.
    cache_tag : str
        Distinguishes variants of one name in the cache (e.g. the hybrid seed and copies).

    Returns
    -------
    tuple
        (:class:`GlamData` with ``folds``, counts). Labels per class (benign, malignant): the
        record's label of that class when the view holds a located mass, 0 for a view without
        findings. A view labelled abnormal without a located mass (a calcification or
        distortion only, or a mass without location) is left out: GLAM's labels are masses
        (:data:`LESION_KINDS`), and calling it normal would be a wrong label. ``counts``:
        ``{"views", "with_mass", "left_out_no_located_mass"}``.
    """
    images: list[WorkingImage] = working_images(dataset, name, config.pixel_spacing_mm, 1, fold_of=fold_of,
                                                cache_dir=cache_dir, cache_tag=cache_tag)
    mammograms, masks, labels, lesions, folds = [], [], [], [], []
    left_out = 0
    for index, im in enumerate(images):
        record = dataset.records[index]
        has_mass = bool(im.lesion.any())
        if any(record.labels.values()) and not has_mass:
            left_out += 1
            continue
        pair = [has_mass and bool(record.labels.get(c, False)) for c in ("benign", "malignant")]
        # The working grid is already canonical (facing right) at the config's spacing.
        mammograms.append(mammogram_from_array(im.image.astype(np.float32), "L", record.view or "MLO",
                                               (config.pixel_spacing_mm, config.pixel_spacing_mm), faces_left=False))
        masks.append(im.breast)
        labels.append([float(v) for v in pair])
        lesions.append(np.stack([im.lesion & pair[0], im.lesion & pair[1]]))
        folds.append(im.fold)
    data = GlamData(mammograms, masks, np.asarray(labels, dtype=np.float32).reshape(-1, 2), lesions,
                    np.asarray(folds, dtype=int))
    return data, {"views": len(data), "with_mass": int(data.labels.max(1).sum()) if len(data) else 0,
                  "left_out_no_located_mass": left_out}


def make_batch(data: GlamData, indices: Sequence[int], config: GlamConfig,
               rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (B, 1, H, W) float, breast mask (B, 1, H, W) bool, y (B, 2)) tensors.

    Parameters
    ----------
    data
        The cached phantom views (pixels on their stored grid, breast masks, labels).
    indices
        Which views of ``data`` make the batch (B of them).
    config
        The GLAM configuration whose window ``input_shape`` (H, W) and pixel spacing are used.
    rng
        Switches on the window noise augmentation; None: the deterministic window.

    Every view is windowed with :func:`~dicom_ai.networks.glam.glam_input` onto the
    ``config.input_shape`` grid.
    """
    inputs = [glam_input(data.mammograms[i], config, mask=data.breast_masks[i], rng=rng) for i in indices]
    x = torch.from_numpy(np.stack([item[0] for item in inputs]))[:, None]
    m = torch.from_numpy(np.stack([item[1] for item in inputs]))[:, None]
    y = torch.from_numpy(data.labels[list(indices)])
    return x, m, y


# --------------------------------------------------------------------------- losses


def bce(pred: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy on probabilities (float32, clamped away from 0 and 1).

    ``pos_weight`` (C,) multiplies the loss of positive targets per class (see
    :func:`class_weights`); None weighs every example 1.
    """
    target = target.float()
    weight = None if pos_weight is None else 1 + (pos_weight.to(target) - 1) * target
    return F.binary_cross_entropy(pred.float().clamp(1e-6, 1 - 1e-6), target, weight=weight)


def class_weights(labels: np.ndarray, mode: str) -> torch.Tensor | None:
    """Per-class weight of positive examples for :func:`bce`, from (N, C) training labels.

    ``mode``: ``"none"`` (None), ``"sqrt"`` (sqrt(negatives / positives)) or ``"balanced"``
    (negatives / positives). Rare classes (malignant masses are about 7 % of phantom views)
    otherwise let the network sit at the label prior.
    """
    if mode == "none":
        return None
    pos = labels.sum(0).clip(min=1)
    ratio = (len(labels) - pos) / pos
    if mode == "sqrt":
        ratio = np.sqrt(ratio)
    elif mode != "balanced":
        raise ValueError(f"class weighting {mode!r}: choose none, sqrt or balanced")
    return torch.tensor(ratio.clip(min=1.0), dtype=torch.float32)


def stage_loss(stage: str, net, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor,
               config: GlamConfig, beta: float,
               pos_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch in one training stage.

    Parameters
    ----------
    stage : {"global", "local", "joint"}
        Which module is trained; ``local`` runs the global module without gradients.
    net : Glam
        The network.
    x : torch.Tensor
        (B, 1, H, W) standardised windows (see :func:`make_batch`).
    mask : torch.Tensor or None
        (B, 1, H, W) breast mask of the windows, or None to pool over the whole window.
    y : torch.Tensor
        (B, 2) image-level labels, benign then malignant.
    config : GlamConfig
        The network configuration (``train_num_patches`` patches per image).
    beta : float
        Weight of the L1 sparsity term (mean absolute saliency over pixels and classes).
    pos_weight : torch.Tensor, optional
        (2,) weight of positive labels per class (:func:`class_weights`).

    Returns
    -------
    tuple
        The total loss (a scalar tensor) and its terms as floats by name.
    """
    if stage == "global":
        g = net.global_net(x, mask)
        cls, sparsity = bce(g.prediction, y, pos_weight), g.saliency.float().abs().mean()
        total = cls + beta * sparsity
        return total, {"bce_g": cls.item(), "l1_g": sparsity.item()}
    if stage == "local":
        with torch.no_grad():
            g = net.global_net(x, mask)
        out = net(x, num_patches=config.train_num_patches, global_output=g, mask=mask)
        cls, sparsity = bce(out.local_prediction, y, pos_weight), out.patch_maps.float().abs().mean()
        total = cls + beta * sparsity
        return total, {"bce_l": cls.item(), "l1_l": sparsity.item()}
    out = net(x, num_patches=config.train_num_patches, mask=mask)
    g = out.global_
    cls_g, l1_g = bce(g.prediction, y, pos_weight), g.saliency.float().abs().mean()
    cls_l, l1_l = bce(out.local_prediction, y, pos_weight), out.patch_maps.float().abs().mean()
    total = cls_g + beta * l1_g + cls_l + beta * l1_l
    return total, {"bce_g": cls_g.item(), "bce_l": cls_l.item(), "l1_g": l1_g.item(), "l1_l": l1_l.item()}


def cam_loss(net, x: torch.Tensor, y: torch.Tensor, beta: float,
             pos_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE of the CAM classifier (``beta`` unused: a plain classifier has no sparsity term).

    Parameters
    ----------
    net
        The CAM classifier.
    x
        The (B, 1, H, W) window batch.
    y
        The (B, 2) benign/malignant labels in {0, 1}.
    beta
        Unused; the signature is the GLAM losses' one.
    pos_weight
        (2,) weight of positive labels per class, as GLAM's (:func:`class_weights`).

    Returns the loss and its value for the log.
    """
    pred, _ = net(x)
    cls = bce(pred, y, pos_weight)
    return cls, {"bce": cls.item()}


# --------------------------------------------------------------------------- evaluation


def predict_images(net, data: GlamData, config: GlamConfig, device: torch.device, batch_size: int = 8,
                   maps: bool = False) -> dict[str, np.ndarray]:
    """Image-level predictions of every view of ``data``, optionally with maps.

    Parameters
    ----------
    net : Glam
        The network (put in eval mode).
    data : GlamData
        The views.
    config : GlamConfig
        The network configuration (window size and spacing).
    device : torch.device
        Where to run; CUDA runs under bfloat16 autocast.
    batch_size : int
        Views per forward pass.
    maps : bool
        Also return the fused and the (nearest-upsampled) global maps.

    Returns
    -------
    dict
        ``global`` and ``local`` (N, 2) probabilities (benign, malignant); with ``maps``,
        ``fused_maps`` and ``global_maps`` (N, 2, *config.input_shape) on the network's input
        window (canonical orientation, chest wall at column 0).
    """
    net.eval()
    g_pred, l_pred, fused_maps, global_maps = [], [], [], []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            idx = range(start, min(start + batch_size, len(data)))
            x, mask, _ = make_batch(data, idx, config)
            x, mask = _to_device(x, device), mask.to(device)
            with _autocast(device):
                out = net(x, mask=mask)
                if maps:
                    fused_maps.append(fuse(out, config).float().cpu().numpy())
                    global_maps.append(F.interpolate(out.global_.saliency, size=config.input_shape,
                                                     mode="nearest").float().cpu().numpy())
            g_pred.append(out.global_.prediction.float().cpu().numpy())
            l_pred.append(out.local_prediction.float().cpu().numpy())
    result = {"global": np.concatenate(g_pred), "local": np.concatenate(l_pred)}
    if maps:
        result["fused_maps"] = np.concatenate(fused_maps)
        result["global_maps"] = np.concatenate(global_maps)
    return result


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    # CPU stays contiguous: channels-last backward corrupted the heap on torch 2.13 CPU.
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def distributed_context() -> DistributedContext:
    """The current process group's rank and size (set up by ``torchrun`` + init_process_group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size())
    return DistributedContext()


class _StageStep(torch.nn.Module):
    """One stage's loss as a module, so DistributedDataParallel can wrap the whole step."""

    def __init__(self, net: torch.nn.Module, stage: str, loss_fn: Callable[..., tuple[torch.Tensor, dict]]):
        super().__init__()
        self.net, self.stage, self.loss_fn = net, stage, loss_fn

    def forward(self, x, mask, y):
        return self.loss_fn(self.stage, self.net, x, mask, y)


def _learning_rate(step: int, total: int, lr: float, schedule: str, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine down to lr / 20."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    return lr / 20 + (lr - lr / 20) * 0.5 * (1 + np.cos(np.pi * min(progress, 1.0)))


def train(net, data: GlamData, config: GlamConfig, *, stages: list[tuple[str, int]], batch_size: int, lr: float,
          beta: float, seed: int, device: torch.device, state: RunState | None = None, resume: bool = False,
          val: GlamData | None = None, progress: bool = True,
          loss_fn: Callable[..., tuple[torch.Tensor, dict[str, float]]] | None = None,
          pos_weight: torch.Tensor | None = None, schedule: str = "constant", warmup_steps: int = 0) -> list[dict]:
    """Run the training stages in order; returns the per-epoch history.

    Parameters
    ----------
    net : Glam or CamClassifier
        The network, trained in place.
    data : GlamData
        Training views; only their image-level labels reach the loss.
    config : GlamConfig
        The network configuration.
    stages : list of (str, int)
        ``(stage, epochs)`` pairs, stage one of :data:`STAGES` (or ``"cam"`` with ``loss_fn``);
        a stage with 0 epochs is skipped.
    batch_size : int
        Views per optimisation step and process.
    lr : float
        Peak Adam learning rate of every stage (a new optimiser per stage).
    beta : float
        Weight of the L1 sparsity term of :func:`stage_loss`.
    seed : int
        Seed of data order and augmentation; epoch ``e`` of stage ``s`` draws from ``(seed, s, e)``.
    device : torch.device
        Where to train; CUDA uses channels-last and bfloat16 autocast.
    state : RunState, optional
        The run folder: weights, optimiser state, history, curves.csv and curves.png written
        after every epoch (:class:`~dicom_ai.training.checkpoint.RunState`).
    resume : bool
        Continue after the last completed epoch in ``state`` when there is one.
    val : GlamData, optional
        Validation views: image-level AUCs are added to every epoch's record.
    progress : bool
        Progress bars on stderr.
    loss_fn : callable, optional
        ``loss_fn(stage, net, x, mask, y) -> (loss, terms)``; defaults to :func:`stage_loss`.
    pos_weight : torch.Tensor, optional
        (2,) weight of positive labels per class for the default loss (:func:`class_weights`).
    schedule : {"constant", "cosine"}
        Learning rate within each stage after the warm-up: constant, or cosine-annealed to
        lr / 20 at the stage's last step.
    warmup_steps : int
        Steps of linear warm-up at the start of each stage.

    Returns
    -------
    list of dict
        One record per epoch (stage, epoch, seconds, mean loss terms, validation AUCs), also
        printed to stderr as JSON lines.

    Notes
    -----
    Under ``torchrun`` (a process group initialised before the call) every process takes
    every ``world_size``-th batch of the same epoch order and the stage's step is wrapped
    in :class:`~torch.nn.parallel.DistributedDataParallel`, so gradients are averaged over
    the processes (gloo on CPU, NCCL on GPUs); rank 0 alone validates and writes checkpoints.
    """
    loss_fn = loss_fn or (lambda stage, n, x, mask, y: stage_loss(stage, n, x, mask, y, config, beta, pos_weight))
    ctx = distributed_context()
    net.to(device)
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    history: list[dict] = []
    done = (-1, -1)  # (stage index, last completed epoch within it) of the checkpoint
    if resume and state is not None and state.exists():
        _, history, info = state.load(net)
        done = (info["stage_index"], info["stage_epoch"])
        if ctx.is_main:
            print(f"resuming after stage {stages[done[0]][0]} epoch {done[1] + 1}", file=sys.stderr)
    for s_idx, (stage, epochs) in enumerate(stages):
        if epochs <= 0 or s_idx < done[0] or (s_idx == done[0] and done[1] + 1 >= epochs):
            continue
        params = _stage_parameters(net, stage)
        trainable = {id(p) for p in params}
        for p in net.parameters():
            p.requires_grad_(id(p) in trainable)
        step_module: torch.nn.Module = _StageStep(net, stage, loss_fn)
        if ctx.world_size > 1:
            step_module = torch.nn.parallel.DistributedDataParallel(
                step_module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True)
        optimiser = torch.optim.Adam(params, lr=lr)
        steps_per_epoch = len(data) // (batch_size * ctx.world_size) or 1
        first = 0
        if s_idx == done[0]:
            state.load(net, optimiser)  # the optimiser of the interrupted stage
            first = done[1] + 1
        for epoch in range(first, epochs):
            rng = np.random.default_rng([seed, s_idx, epoch])
            torch.manual_seed(int(rng.integers(2**31)) + ctx.rank)
            _set_modes(net, stage)
            order = rng.permutation(len(data))
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            if ctx.world_size > 1:
                # Same number of steps on every process, or the gradient all-reduce would hang.
                batches = batches[:len(batches) // ctx.world_size * ctx.world_size][ctx.rank::ctx.world_size]
            # Each process draws its windows from its own stream; the order stays shared.
            aug = rng if ctx.world_size == 1 else np.random.default_rng([seed, s_idx, epoch, ctx.rank])
            sums: dict[str, float] = {}
            seen = 0
            t0 = time.time()
            bar = tqdm(batches, desc=f"{stage} {epoch + 1}/{epochs}", disable=not progress or not ctx.is_main,
                       file=sys.stderr)
            for b, idx in enumerate(bar):
                for group in optimiser.param_groups:
                    group["lr"] = _learning_rate(epoch * steps_per_epoch + b, epochs * steps_per_epoch, lr,
                                                 schedule, warmup_steps)
                x, mask, y = make_batch(data, idx, config, rng=aug)
                x, mask, y = _to_device(x, device), mask.to(device), y.to(device)
                with _autocast(device):
                    loss, parts = step_module(x, mask, y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                parts = dict(parts, loss=loss.item())
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * len(idx)
                seen += len(idx)
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
            sums, seen = _sum_over_processes(sums, seen, ctx)
            # "epoch" counts every epoch of the run (the curves' x axis), "stage_epoch" within the stage.
            record = {"stage": stage, "epoch": len(history) + 1, "stage_epoch": epoch + 1,
                      "seconds": round(time.time() - t0, 1),
                      **{k: round(v / max(seen, 1), 5) for k, v in sums.items()}}
            if ctx.world_size > 1:
                record["processes"] = ctx.world_size
            if ctx.is_main:
                if val is not None and stage != "cam":
                    pred = predict_images(net, val, config, device)
                    key = "local" if stage == "local" else "global"
                    record["val_auc_benign"] = round(roc_auc(pred[key][:, 0], val.labels[:, 0]), 4)
                    record["val_auc_malignant"] = round(roc_auc(pred[key][:, 1], val.labels[:, 1]), 4)
                    record["val_auc_any"] = round(roc_auc(pred[key].max(1), val.labels.max(1)), 4)
                history.append(record)
                print(json.dumps(record), file=sys.stderr)
                if state is not None:
                    state.save(net, optimiser, len(history), history,
                               {"stage_index": s_idx, "stage_epoch": epoch, "seed": seed})
            else:
                history.append(record)
            ctx.barrier()
        for p in net.parameters():
            p.requires_grad_(True)
    net.eval()
    return history


def _sum_over_processes(sums: dict[str, float], seen: int, ctx: DistributedContext) -> tuple[dict[str, float], int]:
    """Loss sums and example counts added over the processes (unchanged when not distributed)."""
    if ctx.world_size == 1:
        return sums, seen
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [float(seen)], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t[:-1].tolist())), int(t[-1].item())


def _stage_parameters(net, stage: str) -> list[torch.nn.Parameter]:
    if stage == "global":
        return list(net.global_net.parameters())
    if stage == "local":
        return list(net.local_net.parameters())
    return list(net.parameters())


def _set_modes(net, stage: str) -> None:
    net.train()
    if stage == "local":
        net.global_net.eval()  # frozen: its batch-norm statistics must not drift either
    elif stage == "global" and hasattr(net, "local_net"):
        net.local_net.eval()


def calibrate_thresholds(net, val: GlamData, config: GlamConfig, device: torch.device) -> tuple[dict, dict]:
    """Operating points maximising mean Dice of the fused maps on the validation ground truth.

    Dice is computed on the network's input grid over validation images that contain a
    lesion of the class; when even the best Dice is below MIN_CALIBRATION_DICE the threshold
    stays 0.5.

    Parameters
    ----------
    net : Glam
        The trained network.
    val : GlamData
        Validation views with ``lesions``.
    config : GlamConfig
        The network configuration (window geometry).
    device : torch.device
        Where to run.

    Returns
    -------
    tuple of dict
        ({finding: threshold}, {finding: best validation Dice}) for ``benign_lesion`` and
        ``malignant_lesion``; thresholds are map probabilities on a 0.05 grid.
    """
    pred = predict_images(net, val, config, device, maps=True)
    thresholds, best_dice = {}, {}
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    for c, finding in ((0, "benign_lesion"), (1, "malignant_lesion")):
        rows = [i for i in range(len(val)) if val.lesions[i][c].any()]
        if not rows:
            thresholds[finding], best_dice[finding] = 0.5, float("nan")
            continue
        gts = [glam_geometry(val.mammograms[i], config, mask=val.breast_masks[i])
               .forward(val.lesions[i][c].astype(np.float32), mode="nearest") > 0.5 for i in rows]
        scores = []
        for t in grid:
            d = [dice(pred["fused_maps"][i, c], gt, threshold=float(t)) for i, gt in zip(rows, gts)]
            scores.append(float(np.mean(d)))
        best = int(np.argmax(scores))
        thresholds[finding], best_dice[finding] = float(grid[best]), round(scores[best], 4)
        if scores[best] < MIN_CALIBRATION_DICE:
            # An uninformative map's "best" point is a low threshold that marks the whole
            # window as lesion; keep the conventional 0.5 (only confident patch regions).
            thresholds[finding] = 0.5
    return thresholds, best_dice


def validation_metrics(net, val: GlamData | None, config: GlamConfig, device: torch.device) -> tuple[dict, dict]:
    """The manifest's metrics and operating thresholds from the validation views.

    Parameters
    ----------
    net : Glam
        The trained network.
    val : GlamData or None
        Validation views; None gives no metrics and the conventional 0.5 thresholds.
    config : GlamConfig
        The network configuration.
    device : torch.device
        Where to run.

    Returns
    -------
    tuple of dict
        ``metrics`` ({"validation": {"images", "auc_benign", "auc_malignant",
        "dice_at_threshold_input_grid"}}, AUCs of the global prediction) and ``thresholds``
        ({finding: threshold}, from :func:`calibrate_thresholds` when ``val`` has lesion masks).
    """
    metrics: dict = {}
    thresholds = {"benign_lesion": 0.5, "malignant_lesion": 0.5}
    if val is None:
        return metrics, thresholds
    pred = predict_images(net, val, config, device)
    metrics["validation"] = {
        "images": len(val),
        "auc_benign": round(roc_auc(pred["global"][:, 0], val.labels[:, 0]), 4),
        "auc_malignant": round(roc_auc(pred["global"][:, 1], val.labels[:, 1]), 4),
    }
    if val.lesions is not None:
        thresholds, best_dice = calibrate_thresholds(net, val, config, device)
        metrics["validation"]["dice_at_threshold_input_grid"] = best_dice
    return metrics, thresholds


def save_cam_weights(folder: str | Path, net: torch.nn.Module, config: GlamConfig, history: list[dict]) -> Path:
    """Write the CAM baseline's weights to ``folder/cam.safetensors`` (config and history as metadata).

    Parameters
    ----------
    folder : str or Path
        Output folder, created when missing.
    net : CamClassifier
        The trained baseline.
    config : GlamConfig
        Its configuration (the global backbone's).
    history : list of dict
        The per-epoch records of :func:`train`.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cam.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"config": json.dumps(config.to_dict()), "history": json.dumps(history)})
    return path


def glam_manifest(config: GlamConfig, *, thresholds: dict[str, float], metrics: dict, data_note: str,
                  command: str, seed: int, stages: list[tuple[str, int]], batch_size: int, lr: float,
                  beta: float, device: torch.device, threads: int, history: list[dict]) -> dict:
    """The manifest of a GLAM bundle trained by :func:`train`.

    Parameters
    ----------
    config : GlamConfig
        The network configuration (its ``name`` goes into the version, ``0.1.0-<name>``).
    thresholds : dict
        Operating threshold per finding (``benign_lesion``, ``malignant_lesion``), map probability.
    metrics : dict
        Validation metrics (:func:`validation_metrics`).
    data_note : str
        What the training data were, in words.
    command : str
        The command line that trained the bundle.
    seed : int
        Training seed.
    stages : list of (str, int)
        ``(stage, epochs)`` as passed to :func:`train`.
    batch_size : int
        Views per optimisation step.
    lr : float
        Adam learning rate.
    beta : float
        Weight of the L1 sparsity term.
    device : torch.device
        Device the bundle was trained on.
    threads : int
        torch CPU threads used.
    history : list of dict
        The per-epoch records of :func:`train`.
    """
    return {
        "name": "glam",
        "version": f"0.2.0-{config.name}",
        "family": "Artificial Intelligence",
        "architecture": {"kind": "glam", **config.to_dict()},
        "input": {
            "views": ["CC", "MLO"],
            "pixel_spacing_mm": config.pixel_spacing_mm,
            "window_rows_cols": list(config.input_shape),
            "intensity": "dicom_ai.preprocess.read_mammogram ([0, 1], dense bright), then z-score over the window",
            "orientation": "flipped to face right (chest wall at column 0)",
            "window": "fixed-size window holding most breast (glam.optimal_window) after resampling to pixel_spacing_mm",
        },
        "thresholds": thresholds,
        "intended_use": INTENDED_USE,
        "training": {
            "data": data_note,
            "labels": "image-level benign/malignant only (pixel masks used for validation Dice and thresholds only)",
            "command": command,
            "seed": seed,
            "stages": {s: e for s, e in stages},
            "batch_size": batch_size, "lr": lr, "beta_l1": beta,
            "device": str(device), "threads": threads,
            "epoch_minutes_total": round(sum(h["seconds"] for h in history) / 60, 1),
            "history": history,
        },
        "metrics": metrics,
    }
