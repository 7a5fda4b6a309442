"""The U-Net at a working pixel size: data from any adapter, patch training, full-breast inference.

Owns :class:`WorkingImage` (one view on the working grid of
:func:`dicom_ai.networks.dunet.working_grid`, with its mass target and its patient-level
fold), the loaders from any :mod:`dicom_ai.data.datasets` adapter and from generated
phantoms (cached per image under ``build/``), the patch sampler, the one training loop of both
stages (``pretrain``: Models-Genesis restoration; ``segment``: the subtraction head towards the
mass mask) with per-epoch checkpoints, curves and ``--resume``, whole-view inference, the
Platt calibration of region scores and the manifest of a patch-trained bundle.
``dicom-ai train dunet`` (:mod:`dicom_ai.cli.train`) is the command line over it.

Why patches: the network is fully convolutional, so it can learn from ``patch`` x ``patch``
windows at the working pixel size and still be run on the whole breast crop; the cost of a
training step no longer grows with the resolution, only inference does (linearly in pixels).

Patch sampling: with probability ``lesion_rate`` a window around a random pixel of a mass
(centre jittered by up to a third of the window), else around a random breast pixel; a
random up-down flip (the images are in canonical orientation, chest wall at column 0, so
left-right flips are not used) and a random gamma in [0.8, 1.25] (exposure and processing
differ between sites). Windows past the image edge are zero padded, as the background is.
"""

from __future__ import annotations

import hashlib
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from dicom_ai.data.evaluate import lesions_of
from dicom_ai.data.metrics import label_regions
from dicom_ai.data.phantom import generate_study
from dicom_ai.data.sample import Sample
from dicom_ai.imaging import Mammogram, read_mammogram
from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig, working_grid
from dicom_ai.training.checkpoint import RunState
from dicom_ai.training.dunet import masked_mse, segmentation_loss
from dicom_ai.training.genesis import GenesisConfig, distort

__all__ = [
    "STAGES",
    "WorkingImage",
    "patient_fold",
    "working_images",
    "phantom_working_images",
    "sample_patches",
    "train",
    "predict_raw",
    "candidate_regions",
    "fit_platt",
    "candidate_level",
    "patch_manifest",
]

#: Training stages of :func:`train`.
STAGES = ("pretrain", "segment")
#: Version of the per-image cache (bump when what is cached changes).
CACHE_VERSION = 1
#: Folds of the patient-level split of adapters that have none of their own.
DEFAULT_FOLDS = 5


@dataclass
class WorkingImage:
    """One view on the working grid: ``image`` float32 in [0, 1], ``lesion`` (mass target) and
    ``breast`` boolean, all (rows, columns) at ``spacing_mm``; ``fold`` is the patient-level
    cross-validation fold (-1: training data of every fold, e.g. generated phantoms);
    ``reference`` names the view without patient identifiers (a MIAS reference, a phantom
    seed, or a hash of the source path)."""

    image: np.ndarray
    lesion: np.ndarray
    breast: np.ndarray
    fold: int
    reference: str
    dataset: str
    spacing_mm: float


def patient_fold(patient: str, k: int = DEFAULT_FOLDS) -> int:
    """A stable patient-level fold in ``[0, k)`` from a patient or study identifier (CRC-32)."""
    return zlib.crc32(patient.encode("utf-8")) % k


def _mass_target(sample: Sample) -> np.ndarray:
    """Every located mass of the sample (benign or malignant) on the stored grid."""
    target = np.zeros(sample.image.shape, dtype=bool)
    for lesion in lesions_of(sample):
        if lesion.kind == "mass" and lesion.mask is not None:
            target |= lesion.mask
    return target


def _cache_key(record, index: int, dataset: str) -> str:
    """A file name for image ``index`` that names no patient: the MIAS reference, else the
    index and a hash of the source path (hybrids of one background differ by index)."""
    path = str(getattr(record, "path", ""))
    if dataset == "mias":
        return path.rsplit("/", 1)[-1].split(".")[0]
    return f"{index:06d}-" + hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]


def _to_working(mammogram: Mammogram, target: np.ndarray, spacing_mm: float, multiple: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    geo, image, breast = working_grid(mammogram, spacing_mm, multiple)
    lesion = geo.forward(target.astype(np.float32)) >= 0.5
    return image, lesion, breast


def _cached(folder: Path | None, key: str, make: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = folder / f"{key}.npz" if folder is not None else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return z["image"], z["lesion"], z["breast"]
    image, lesion, breast = make()
    if path is not None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, image=image.astype(np.float16), lesion=lesion, breast=breast)
        tmp.replace(path)
    return image.astype(np.float16), lesion, breast


def working_images(dataset, name: str, spacing_mm: float, multiple: int = 16,
                   fold_of: Callable[[int], int] | None = None, cache_dir: Path | str | None = None,
                   cache_tag: str = "") -> list[WorkingImage]:
    """Every image of an adapter on the working grid, with its mass target.

    Parameters
    ----------
    dataset
        Any adapter of :mod:`dicom_ai.data.datasets` (``records`` and indexing; hybrids too).
    name : str
        Its name (``mias``, ``hybrid:mias-normals``, ...), recorded and used in cache names.
    spacing_mm : float
        Working pixel size in mm.
    multiple : int
        Working grids are multiples of it (the network's total stride).
    fold_of : callable, optional
        Patient-level fold of image ``index``; default :func:`patient_fold` of its study.
    cache_dir : Path or str, optional
        Root of the per-image cache
        (``<root>/<name><cache_tag>-<spacing>mm-m<multiple>-v<version>/``); a cached image is
        read back without decoding its source.
    cache_tag : str
        Distinguishes variants of one name in the cache (e.g. a hybrid seed).

    Images are stored as float16 (the sources have at most 16 bits; intensity resolution is
    not the bottleneck of the network's input).
    """
    folder = None
    if cache_dir is not None:
        safe = name.replace(":", "_").replace("/", "_")
        folder = Path(cache_dir) / f"{safe}{cache_tag}-{spacing_mm:g}mm-m{multiple}-v{CACHE_VERSION}"
        folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index, record in enumerate(dataset.records):
        key = _cache_key(record, index, name)

        def make(index=index):
            sample = dataset[index]
            return _to_working(sample.image, _mass_target(sample), spacing_mm, multiple)

        image, lesion, breast = _cached(folder, key, make)
        fold = fold_of(index) if fold_of is not None else patient_fold(str(getattr(record, "study", index)))
        out.append(WorkingImage(image, lesion, breast, int(fold), key, name, spacing_mm))
    return out


def phantom_working_images(seeds: Iterable[int], shape: tuple[int, int], spacing_mm: float, multiple: int = 16,
                           cache_dir: Path | str | None = None) -> list[WorkingImage]:
    """The four views of generated phantom studies on the working grid (fold -1: always training).

    ``shape`` is the generated (rows, columns) (pixel spacing ``0.07 * 3328 / rows`` mm); the
    target is every mass, benign or malignant, as for the real data sets.
    """
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / f"phantom-p{shape[0]}x{shape[1]}-{spacing_mm:g}mm-m{multiple}-v{CACHE_VERSION}"
        folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in seeds:
        keys = [f"{seed}-{v}" for v in ("L-CC", "L-MLO", "R-CC", "R-MLO")]
        if folder is not None and all((folder / f"{k}.npz").is_file() for k in keys):
            views = [_cached(folder, k, lambda: None) for k in keys]  # type: ignore[arg-type, return-value]
        else:
            study = generate_study(int(seed), shape=tuple(shape))
            views = []
            for k, im in zip(keys, study.images):
                target = im.masks["mass_malignant"] | im.masks["mass_benign"]
                views.append(_cached(folder, k, lambda: _to_working(read_mammogram(im.dataset), target,
                                                                    spacing_mm, multiple)))
        out += [WorkingImage(*v, fold=-1, reference=k, dataset="phantom", spacing_mm=spacing_mm)
                for k, v in zip(keys, views)]
    return out


# --------------------------------------------------------------------------- patches


def _window(a: np.ndarray, r0: int, c0: int, size: int) -> np.ndarray:
    out = np.zeros((size, size), dtype=a.dtype)
    rows, cols = a.shape
    sr0, sr1, sc0, sc1 = max(r0, 0), min(r0 + size, rows), max(c0, 0), min(c0 + size, cols)
    if sr1 > sr0 and sc1 > sc0:
        out[sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = a[sr0:sr1, sc0:sc1]
    return out


def sample_patches(images: Sequence[WorkingImage], n: int, size: int, rng: np.random.Generator,
                   lesion_rate: float = 0.5, augment: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` windows of ``size`` x ``size`` working pixels (module docstring).

    Returns float32 images (n, size, size) in [0, 1] and boolean lesion and breast windows.
    """
    with_lesion = [i for i, im in enumerate(images) if im.lesion.any()]
    xs, ys, bs = [], [], []
    for _ in range(n):
        if with_lesion and rng.random() < lesion_rate:
            im = images[with_lesion[rng.integers(len(with_lesion))]]
            rr, cc = np.nonzero(im.lesion)
            j = rng.integers(len(rr))
            jitter = rng.integers(-(size // 3), size // 3 + 1, size=2)
            r, c = int(rr[j] + jitter[0]), int(cc[j] + jitter[1])
        else:
            im = images[rng.integers(len(images))]
            rr, cc = np.nonzero(im.breast)
            if len(rr):
                j = rng.integers(len(rr))
                r, c = int(rr[j]), int(cc[j])
            else:
                r, c = im.image.shape[0] // 2, im.image.shape[1] // 2
        r0, c0 = r - size // 2, c - size // 2
        x = _window(im.image, r0, c0, size).astype(np.float32)
        y, b = _window(im.lesion, r0, c0, size), _window(im.breast, r0, c0, size)
        if augment:
            if rng.random() < 0.5:
                x, y, b = x[::-1], y[::-1], b[::-1]
            x = np.clip(x, 0.0, 1.0) ** float(np.exp(rng.uniform(math.log(0.8), math.log(1.25))))
        xs.append(x)
        ys.append(y)
        bs.append(b)
    return np.stack(xs).astype(np.float32), np.stack(ys), np.stack(bs)


def _batch(stage: str, images: Sequence[WorkingImage], n: int, size: int, rng: np.random.Generator,
           lesion_rate: float, genesis: GenesisConfig, augment: bool = True):
    """(input, target, weight mask) float32 arrays (n, 1, size, size) for one step of ``stage``."""
    x, y, b = sample_patches(images, n, size, rng, lesion_rate if stage == "segment" else 0.0, augment)
    if stage == "pretrain":
        dists = [distort(xi, bi, rng, genesis) for xi, bi in zip(x, b)]
        x = np.stack([d.image for d in dists])
        target = np.stack([d.target for d in dists])
        weight = np.stack([d.mask for d in dists])
    else:
        target, weight = y, b
    return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None] for a in (x, target, weight))


def _loss(stage: str, network: DiscriminativeUNet, x: torch.Tensor, target: torch.Tensor,
          weight: torch.Tensor) -> torch.Tensor:
    if stage == "pretrain":
        return masked_mse(network.reconstruct(x), target, weight)
    return segmentation_loss(network, network(x), target)


def train(network: DiscriminativeUNet, images: Sequence[WorkingImage], *, stage: str, epochs: int,
          steps_per_epoch: int, batch_size: int = 8, patch: int = 128, lr: float = 1e-3, seed: int = 0,
          lesion_rate: float = 0.5, validation: Sequence[WorkingImage] = (), state: RunState | None = None,
          resume: bool = False, info: dict | None = None, device: torch.device | str = "cpu",
          genesis: GenesisConfig = GenesisConfig(),
          on_epoch: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``network`` in place on patches of ``images`` for one stage; per-epoch checkpoints.

    Parameters
    ----------
    network : DiscriminativeUNet
        ``pretrain`` trains its backbone to restore Genesis distortions (MSE in the breast);
        ``segment`` trains all of it with :func:`~dicom_ai.training.dunet.segmentation_loss`.
    images : sequence of WorkingImage
        Training views (any pixel sizes; the sampler does not mix them within a window).
    stage : str
        One of :data:`STAGES`.
    epochs, steps_per_epoch : int
        An epoch is ``steps_per_epoch`` Adam steps of ``batch_size`` windows of ``patch`` px.
    lr : float
        Adam learning rate, cosine-annealed to a tenth over all epochs.
    seed : int
        Epoch ``e`` draws its windows from ``(seed, e)``, so a resumed run continues exactly
        as an uninterrupted one would (up to floating-point non-determinism).
    lesion_rate : float
        Share of windows centred near a mass (``segment`` only).
    validation : sequence of WorkingImage
        Fixed windows (seeded, 4 batches) scored after each epoch: ``validation_loss``
        (never used to choose anything here; it is the learning curve).
    state : RunState, optional
        Checkpoint folder written after every epoch (weights, optimiser, curves).
    resume : bool
        Continue from ``state``'s last checkpoint (its finished epochs are skipped).
    info : dict, optional
        Stored with each checkpoint (JSON).

    Returns
    -------
    list of dict
        One record per epoch: ``epoch``, ``train_loss``, ``validation_loss`` (with
        ``validation``), ``lr`` and ``seconds``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not images:
        raise ValueError("no training images")
    device = torch.device(device)
    network.to(device)
    params = network.unet.parameters() if stage == "pretrain" else network.parameters()
    optimizer = torch.optim.Adam(params, lr=lr)
    history: list[dict] = []
    start = 0
    if resume and state is not None and state.exists():
        start, history, _ = state.load(network, optimizer)
    val = None
    if validation:
        vrng = np.random.default_rng([seed, 0xA11])
        val = [_batch(stage, validation, batch_size, patch, vrng, lesion_rate, genesis, augment=False)
               for _ in range(4)]
    total = epochs * steps_per_epoch
    for epoch in range(start, epochs):
        t0 = time.time()
        rng = np.random.default_rng([seed, epoch])
        network.train()
        losses = []
        for step in range(steps_per_epoch):
            k = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / max(total, 1))))
            x, target, weight = (t.to(device) for t in _batch(stage, images, batch_size, patch, rng, lesion_rate,
                                                              genesis))
            loss = _loss(stage, network, x, target, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.item()))
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if val is not None:
            network.eval()
            with torch.no_grad():
                record["validation_loss"] = float(np.mean([
                    _loss(stage, network, *(t.to(device) for t in b)).item() for b in val]))
        record["lr"] = optimizer.param_groups[0]["lr"]
        record["seconds"] = round(time.time() - t0, 1)
        history.append(record)
        if state is not None:
            state.save(network, optimizer, epoch + 1, history,
                       dict(info or {}, stage=stage, config=network.config.to_dict()))
        if on_epoch is not None:
            on_epoch(epoch + 1, record)
    return history


# --------------------------------------------------------------------------- inference and scores


@torch.no_grad()
def predict_raw(network: DiscriminativeUNet, image: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """The head's raw output on a whole working-grid view, float32 (rows, columns).

    For the subtraction head ``x - f(x)`` unclipped (the map is its clip to [0, 1]; the
    calibration of :func:`fit_platt` reads it unclipped). Rows and columns must be
    multiples of ``network.config.multiple`` (:func:`~dicom_ai.networks.dunet.working_grid`
    makes them so).
    """
    network.eval()
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(torch.device(device))[None, None]
    return network(x)[0, 0].float().cpu().numpy()


def candidate_regions(raw: np.ndarray, level: float = 0.1) -> list[tuple[float, np.ndarray]]:
    """(peak raw output, boolean region) of each connected region of ``raw >= level``."""
    labels = label_regions(raw >= level)
    out = []
    for lab in range(1, int(labels.max()) + 1):
        region = labels == lab
        out.append((float(raw[region].max()), region))
    return out


def fit_platt(scores: Sequence[float], hits: Sequence[bool], iterations: int = 500) -> dict:
    """Platt scaling ``P(hit | s) = sigmoid(slope * s + intercept)`` by logistic regression.

    Fitted on validation candidates only (their peak raw outputs ``scores`` and whether each
    hit a mass). Label smoothing as Platt (1999) proposed keeps it finite when the classes
    separate. Returns the manifest's ``calibration`` entry.
    """
    s = torch.tensor(np.asarray(scores, dtype=np.float64))
    y = np.asarray(hits, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"Platt scaling needs hits and misses among the candidates ({n_pos} hits, {n_neg} misses)")
    t = torch.tensor(np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2)))
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(params[0] * s + params[1], t)
        loss.backward()
        return loss

    opt.step(closure)
    slope, intercept = (float(v) for v in params.detach())
    return {"method": "platt", "slope": round(slope, 6), "intercept": round(intercept, 6),
            "input": "peak of the unclipped subtraction output x - f(x) over a candidate region",
            "fitted_on": f"{len(y)} validation candidates ({n_pos} on a mass)"}


def candidate_level(calibration: dict, raw_level: float = 0.1) -> float:
    """The calibrated map's value at raw output ``raw_level``: as a map threshold it keeps the
    candidate regions of the uncalibrated map (raw >= 0.1) and changes only their scores."""
    return float(torch.sigmoid(torch.tensor(calibration["slope"] * raw_level + calibration["intercept"])))


# --------------------------------------------------------------------------- the bundle


def patch_manifest(config: DUNetConfig, *, name: str, version: str, sources: list[dict], command: str,
                   history: list[dict], pretraining: dict | None, training: dict, metrics: dict | None = None,
                   calibration: dict | None = None) -> dict:
    """The manifest of a patch-trained U-Net bundle.

    Parameters
    ----------
    config : DUNetConfig
        With ``pixel_spacing_mm`` set (the working pixel size).
    sources : list of dict
        Per data source: ``dataset``, ``images``, ``with_mass``, ``folds`` and ``licence``.
    command : str
        The command line that trained it (no paths to patient data).
    history : list of dict
        Per-epoch records of the segmentation stage.
    pretraining : dict, optional
        The pretraining checkpoint's info (stage, sources, epochs ...).
    training : dict
        Hyper-parameters (epochs, steps, batch, patch, lr, seed, seconds).
    metrics : dict, optional
        Cross-validated figures (the benchmark that validated the bundle fills them in).
    calibration : dict, optional
        :func:`fit_platt` result; without it the map is the clipped subtraction output.
    """
    licences = sorted({s["licence"] for s in sources if s.get("licence")})
    manifest = {
        "name": name,
        "version": version,
        "family": "Artificial Intelligence",
        "architecture": {"kind": "dunet", **config.to_dict()},
        "input": {
            "views": ["CC", "MLO"],
            "intensity": "[0, 1], dense tissue bright (dicom_ai.imaging.read_mammogram)",
            "geometry": f"breast crop in canonical orientation (chest wall at column 0) resampled to "
                        f"{config.pixel_spacing_mm} mm working pixels (dicom_ai.networks.dunet.working_grid), "
                        f"rows and columns multiples of {config.multiple}; trained on {config.input_shape[0]}x"
                        f"{config.input_shape[1]} windows; the map is resized back to the source grid",
            "trained_pixel_spacing_mm": config.pixel_spacing_mm,
        },
        "outputs": {
            "mass": ("probability map on the source grid of a MASS (benign or malignant), "
                     + ("Platt-calibrated subtraction output sigmoid(slope * (x - f(x)) + intercept)"
                        if calibration else "subtraction head clip(x - f(x), 0, 1)")),
            "malignant": f"image score = mean of the top {config.score_top_fraction:.1%} of the working-grid map",
        },
        "finding": "mass",
        "thresholds": {"mass": round(candidate_level(calibration), 6) if calibration else 0.5},
        # Not common.INTENDED_USE ("trained on synthetic phantoms"): these bundles are trained on
        # the real sources listed.
        "intended_use": "research / demonstration, not for clinical use. Segments masses (benign or malignant) on "
                        "2-D mammography views; trained on the images of the sources listed (research use only).",
        "licence": " | ".join(licences) if licences else "synthetic phantoms only",
        "training": {"data": sources, "command": command, "pretraining": pretraining, **training,
                     "history": history},
        "metrics": metrics or {},
    }
    if calibration:
        manifest["calibration"] = calibration
    return manifest
