"""Training and evaluation of the discriminative U-Net (the library behind `dicom-ai train dunet-*`).

Stage 1 (:func:`pretrain`): restoration of Models-Genesis distortions (``dicom_ai.genesis``)
on images without malignancy, MSE inside the breast.
Stage 2 (:func:`train_segmentation`): malignancy segmentation with either head of
``dicom_ai.dunet``; malignant images with their masks, benign images as empty targets.

Data live on the model grid (``dunet.model_grid``): an :class:`ImageSet` holds the network
inputs, the malignant-lesion masks and the breast masks of a list of images. Phantom
studies are turned into ImageSets once and cached as .npy files under ``build/``.

Malignant-lesion mask (the seed combines mass and calcification masks): ``mass_malignant |
calcification_malignant``; the cluster outline ``cluster_malignant`` is a region annotation
around the specks, not lesion pixels, and is left out. On the reduced grids used here a
calcification covers a fraction of a model pixel, so a model pixel is a lesion pixel when a
mass covers at least half of it or malignant calcifications cover more than
``calcification_cover`` of it (default 0.001, i.e. any speck; 0.5 treats them like masses,
which at coarse grids drops them).

Owns the :class:`ImageSet` cache of phantom studies (one folder per grid pair, named with
:func:`dicom_ai.data.cache.generator_version`), the losses, both training loops, the
checkpoint format of stage 1 and the bundle manifest of stage 2 (:func:`segmentation_manifest`);
``dicom-ai train dunet-pretrain | dunet-seg`` (:mod:`dicom_ai.cli.train`) is the command line
over these functions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dicom_ai.data import metrics
from dicom_ai.data.cache import cache_folder
from dicom_ai.data.datasets import MIAS_LICENCE_NOTE, MIAS_SPACING_MM
from dicom_ai.data.phantom import FULL_SHAPE, FULL_SPACING_MM, generate_study
from dicom_ai.imaging import read_mammogram
from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig, model_grid
from dicom_ai.training import common
from dicom_ai.training.genesis import GenesisConfig, distort

__all__ = [
    "INTENDED_USE",
    "ImageSet",
    "image_set_cache_folder",
    "phantom_image_set",
    "masked_mse",
    "soft_dice_loss",
    "segmentation_loss",
    "pretrain",
    "train_segmentation",
    "evaluate_segmentation",
    "dice_scores",
    "save_checkpoint",
    "load_checkpoint",
    "seed_everything",
    "segmentation_metrics",
    "segmentation_manifest",
    "mias_image_set",
    "mias_manifest",
]

#: The shipped bundle's intended use (written to every manifest of :func:`segmentation_manifest`).
INTENDED_USE = (common.INTENDED_USE + ". Segments malignant lesions (masses and calcifications combined) "
                "on 2-D mammography views; outputs are not calibrated.")

#: Default cache of phantom ImageSets (git-ignored).
CACHE_DIR = Path("build") / "dunet-cache"


@dataclass
class ImageSet:
    """Images on the model grid: ``images`` float32 (N, H, W) in [0, 1], ``lesions`` and
    ``breasts`` bool (N, H, W), image labels ``benign`` and ``malignant`` bool (N,), and the
    ``source`` of each image (``"<study seed>:<laterality>-<view>"``)."""

    images: np.ndarray
    lesions: np.ndarray
    breasts: np.ndarray
    benign: np.ndarray
    malignant: np.ndarray
    source: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: np.ndarray | Sequence[int]) -> "ImageSet":
        idx = np.asarray(index, dtype=np.int64)
        return ImageSet(self.images[idx], self.lesions[idx], self.breasts[idx], self.benign[idx],
                        self.malignant[idx], [self.source[i] for i in idx])

    @classmethod
    def concatenate(cls, sets: Sequence["ImageSet"]) -> "ImageSet":
        return cls(*(np.concatenate([getattr(s, k) for s in sets]) for k in
                     ("images", "lesions", "breasts", "benign", "malignant")),
                   source=[src for s in sets for src in s.source])

    def pretraining_pool(self) -> "ImageSet":
        """Images without malignancy (benign and normal): the stage-1 data of the paper."""
        return self.subset(np.flatnonzero(~self.malignant))

    def segmentation_pool(self, empty_targets: bool = True) -> "ImageSet":
        """Malignant images with a visible mask, plus benign images as empty targets."""
        positive = self.malignant & self.lesions.any(axis=(1, 2))
        keep = positive | (self.benign & ~self.malignant) if empty_targets else positive
        return self.subset(np.flatnonzero(keep))

    def positives(self) -> "ImageSet":
        """Images with a non-empty malignant-lesion mask."""
        return self.subset(np.flatnonzero(self.lesions.any(axis=(1, 2))))


_STUDY_KEYS = ("images", "mass_cover", "calcification_cover", "breasts", "benign", "malignant")


def _study_arrays(seed: int, phantom_shape: tuple[int, int], input_shape: tuple[int, int]) -> dict[str, np.ndarray]:
    study = generate_study(seed, shape=phantom_shape)
    out: dict[str, list] = {k: [] for k in _STUDY_KEYS}
    for im in study.images:
        # The same decoding and geometry as at inference, from the DICOM data set.
        mammogram = read_mammogram(im.dataset)
        geo, image, breast = model_grid(mammogram, input_shape)
        # Fraction of each model pixel the lesion covers (antialiased bilinear ~ area average).
        mass = geo.forward(im.masks["mass_malignant"].astype(np.float32))
        calc = geo.forward(im.masks["calcification_malignant"].astype(np.float32))
        out["images"].append(image)
        out["mass_cover"].append(mass.astype(np.float16))
        out["calcification_cover"].append(calc.astype(np.float16))
        out["breasts"].append(breast)
        out["benign"].append(im.labels["benign"])
        out["malignant"].append(im.labels["malignant"])
    return {k: np.asarray(v) for k, v in out.items()}


def image_set_cache_folder(cache_dir: Path | str, input_shape: tuple[int, int],
                           phantom_shape: tuple[int, int]) -> Path:
    """The cache folder of :func:`phantom_image_set` for one pair of grids.

    Parameters
    ----------
    cache_dir : Path or str
        Root of the U-Net cache (``build/dunet-cache`` for ``dicom-ai train dunet-*``).
    input_shape : tuple of int
        Model grid (rows, columns), in pixels.
    phantom_shape : tuple of int
        Stored (rows, columns) of the generated phantom views, in pixels.

    Returns
    -------
    Path
        ``cache_dir / "p<rows>x<cols>-m<rows>x<cols>-v2-<generator version>"`` (not created).
    """
    return cache_folder(cache_dir, f"p{phantom_shape[0]}x{phantom_shape[1]}-m{input_shape[0]}x{input_shape[1]}-v2")


def phantom_image_set(seeds: Sequence[int], input_shape: tuple[int, int], phantom_shape: tuple[int, int],
                      cache_dir: Path | str | None = CACHE_DIR, progress: bool = False,
                      calcification_cover: float = 1e-3) -> ImageSet:
    """The four views of each phantom study ``seeds`` on the model grid, cached per study.

    Parameters
    ----------
    seeds : sequence of int
        Phantom study seeds.
    input_shape : tuple of int
        Model grid (rows, columns), in pixels (:func:`~dicom_ai.networks.dunet.model_grid`:
        breast crop in canonical orientation, chest wall at column 0).
    phantom_shape : tuple of int
        Stored (rows, columns) of the generated images, in pixels.
    cache_dir : Path, str or None
        Root of the cache (folder :func:`image_set_cache_folder`); None does not cache.
    progress : bool
        Show a progress bar.
    calcification_cover : float
        Fraction of a model pixel malignant calcifications must exceed for it to be a lesion
        pixel (a mass must cover half of it); see the module docstring.

    Returns
    -------
    ImageSet
        Views in the order L-CC, L-MLO, R-CC, R-MLO per study.

    Notes
    -----
    The cache holds per study and array one ``<seed>_<name>.npy`` (images, lesion covers,
    breast masks, labels); a study is read back only when all of its files are there.
    """
    folder = None
    if cache_dir is not None:
        folder = image_set_cache_folder(cache_dir, input_shape, phantom_shape)
        folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for seed in tqdm(list(seeds), desc="phantom studies", disable=not progress, leave=False):
        arrays = None
        if folder is not None:
            files = {k: folder / f"{seed}_{k}.npy" for k in _STUDY_KEYS}
            if all(f.is_file() for f in files.values()):
                arrays = {k: np.load(f, allow_pickle=False) for k, f in files.items()}
        if arrays is None:
            arrays = _study_arrays(int(seed), phantom_shape, input_shape)
            if folder is not None:
                for k, f in files.items():
                    np.save(f, arrays[k], allow_pickle=False)
        lesions = (arrays["mass_cover"] >= 0.5) | (arrays["calcification_cover"] > calcification_cover)
        views = ("L-CC", "L-MLO", "R-CC", "R-MLO")
        parts.append(ImageSet(arrays["images"], lesions, arrays["breasts"], arrays["benign"], arrays["malignant"],
                              source=[f"{seed}:{v}" for v in views]))
    return ImageSet.concatenate(parts)


# --------------------------------------------------------------------------- losses


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels where ``mask`` is set.

    Parameters
    ----------
    prediction, target : torch.Tensor
        (N, 1, H, W) images on the model grid.
    mask : torch.Tensor
        (N, 1, H, W) breast mask (boolean or 0/1); an empty mask gives 0.
    """
    weight = mask.to(prediction.dtype)
    return ((prediction - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


def soft_dice_loss(probability: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, per image, averaged over the images whose target is not empty.

    Parameters
    ----------
    probability : torch.Tensor
        (N, ...) lesion probabilities in [0, 1].
    target : torch.Tensor
        (N, ...) 0/1 lesion masks.
    eps : float
        Smoothing added to numerator and denominator (in pixels).

    Returns 0 when no image of the batch has a lesion (Dice is undefined there).
    """
    p, g = probability.flatten(1), target.flatten(1).to(probability.dtype)
    positive = g.sum(1) > 0
    if not positive.any():
        return probability.sum() * 0.0
    dice = (2 * (p * g).sum(1) + eps) / (p.sum(1) + g.sum(1) + eps)
    return 1.0 - dice[positive].mean()


def segmentation_loss(network: DiscriminativeUNet, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Stage-2 loss of either head: a pixel term plus soft Dice on the images with lesions.

    Subtraction head: MSE between ``x - f(x)`` and the 0/1 mask (so ``f`` keeps being trained
    as a reconstruction, towards the image with its lesion subtracted) plus soft Dice of the
    clipped difference. Standard head: BCE on the logit plus soft Dice of the sigmoid.

    Parameters
    ----------
    network : DiscriminativeUNet
        Decides the head and how ``output`` becomes a probability.
    output : torch.Tensor
        (N, 1, H, W) the network's raw output.
    target : torch.Tensor
        (N, 1, H, W) 0/1 malignant-lesion masks.
    """
    target = target.to(output.dtype)
    probability = network.probability(output)
    if network.head == "subtraction":
        pixel = F.mse_loss(output, target)
    else:
        pixel = F.binary_cross_entropy_with_logits(output, target)
    return pixel + soft_dice_loss(probability, target)


# --------------------------------------------------------------------------- loops


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (numpy generators are passed explicitly)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)[:, None].float()


def pretrain(network: DiscriminativeUNet, data: ImageSet, epochs: int, batch_size: int = 4, lr: float = 1e-3,
             seed: int = 0, genesis: GenesisConfig = GenesisConfig(), validation: ImageSet | None = None,
             device: torch.device | str = "cpu", progress: bool = True,
             on_epoch: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Stage 1: train ``network.unet`` to restore Genesis-distorted images (MSE in the breast).

    Parameters
    ----------
    network : DiscriminativeUNet
        Its ``unet`` is trained in place.
    data : ImageSet
        Every image is used (pass ``ImageSet.pretraining_pool()``).
    epochs : int
        Passes over ``data``.
    batch_size : int
        Images per step.
    lr : float
        Adam learning rate.
    seed : int
        Seeds the order and the distortions of epoch ``e`` (``(seed, e)``).
    genesis : GenesisConfig
        The distortions.
    validation : ImageSet, optional
        Restoration MSE on a fixed set of distortions of it after every epoch.
    device : torch.device or str
        Where to train.
    progress : bool
        Show progress bars.
    on_epoch : callable, optional
        Called with (epoch number from 1, record) after every epoch.

    Returns
    -------
    list of dict
        One record per epoch: ``train_mse`` and, with ``validation``, ``validation_mse``.
    """
    device = torch.device(device)
    unet = network.unet.to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    history = []
    val_batch = None
    if validation is not None and len(validation):
        vrng = np.random.default_rng([seed, 0x7A1])
        dists = [distort(im, m, vrng, genesis) for im, m in zip(validation.images, validation.breasts)]
        val_batch = tuple(np.stack([getattr(d, k) for d in dists]) for k in ("image", "target", "mask"))
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        unet.train()
        losses = []
        batches = _batches(len(data), batch_size, rng)
        for idx in tqdm(batches, desc=f"pretrain epoch {epoch + 1}/{epochs}", disable=not progress, leave=False):
            dists = [distort(data.images[i], data.breasts[i], rng, genesis) for i in idx]
            x = _tensor(np.stack([d.image for d in dists]), device)
            y = _tensor(np.stack([d.target for d in dists]), device)
            m = _tensor(np.stack([d.mask for d in dists]), device)
            loss = masked_mse(unet(x), y, m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        record = {"epoch": epoch + 1, "train_mse": float(np.mean(losses))}
        if val_batch is not None:
            unet.eval()
            with torch.no_grad():
                x, y, m = (_tensor(a, device) for a in val_batch)
                record["validation_mse"] = float(masked_mse(_predict(unet, x, batch_size), y, m))
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch + 1, record)
    return history


def _predict(module: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([module(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def dice_scores(probability: np.ndarray, lesion: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Per-image hard Dice (map binarised at ``threshold``) and soft Dice, arrays (N,) each.

    Parameters
    ----------
    probability : numpy.ndarray
        (N, H, W) probability maps on the model grid.
    lesion : numpy.ndarray
        (N, H, W) boolean ground truth on the same grid.
    threshold : float
        Binarisation threshold of the hard Dice.

    Uses :mod:`dicom_ai.data.metrics`; images with an empty ``lesion`` get NaN, so they are
    excluded from the Dice means (their false-positive area is reported separately).
    """
    hard = np.full(len(probability), np.nan)
    soft = np.full(len(probability), np.nan)
    for i, (p, g) in enumerate(zip(probability, lesion)):
        if g.any():
            hard[i] = metrics.dice(p, g, threshold)
            soft[i] = metrics.soft_dice(p, g)
    return {"dice": hard, "soft_dice": soft}


@torch.no_grad()
def predict_probability(network: DiscriminativeUNet, images: np.ndarray, batch_size: int = 8,
                        device: torch.device | str = "cpu") -> np.ndarray:
    """Probability maps (N, H, W) of a stack of model-grid images.

    Parameters
    ----------
    network : DiscriminativeUNet
        The network (put in eval mode).
    images : numpy.ndarray
        (N, H, W) float images in [0, 1] on the model grid.
    batch_size : int
        Images per forward pass.
    device : torch.device or str
        Where to run.
    """
    network.eval()
    x = _tensor(images, torch.device(device))
    return network.probability(_predict(network, x, batch_size))[:, 0].cpu().numpy()


def evaluate_segmentation(network: DiscriminativeUNet, data: ImageSet, batch_size: int = 8,
                          device: torch.device | str = "cpu", threshold: float = 0.5) -> dict[str, float]:
    """Mean per-image Dice and soft Dice over images with lesions; false-positive area on the rest.

    Parameters
    ----------
    network : DiscriminativeUNet
        The network.
    data : ImageSet
        Images with and without lesions.
    batch_size : int
        Images per forward pass.
    device : torch.device or str
        Where to run.
    threshold : float
        Map probability at or above which a pixel is lesion.

    Returns
    -------
    dict
        ``dice`` and ``soft_dice`` (means over images with a lesion, NaN when none) and
        ``fp_fraction``, the mean fraction of breast pixels at or above ``threshold`` on
        images whose mask is empty (NaN when there are none).
    """
    prob = predict_probability(network, data.images, batch_size, device)
    scores = dice_scores(prob, data.lesions, threshold)
    empty = ~data.lesions.any(axis=(1, 2))
    fp = [float(((p >= threshold) & b).sum() / max(b.sum(), 1)) for p, b in zip(prob[empty], data.breasts[empty])]
    return {
        "dice": float(np.nanmean(scores["dice"])) if np.isfinite(scores["dice"]).any() else math.nan,
        "soft_dice": float(np.nanmean(scores["soft_dice"])) if np.isfinite(scores["soft_dice"]).any() else math.nan,
        "fp_fraction": float(np.mean(fp)) if fp else math.nan,
    }


def train_segmentation(network: DiscriminativeUNet, data: ImageSet, epochs: int, batch_size: int = 4,
                       lr: float = 5e-4, seed: int = 0, test: ImageSet | None = None,
                       device: torch.device | str = "cpu", progress: bool = True,
                       on_epoch: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Stage 2: train the whole network (either head) on ``data`` (``segmentation_pool()``).

    Augmentation: a random up-down flip (p = 0.5) of image and mask.

    Parameters
    ----------
    network : DiscriminativeUNet
        Trained in place (all of it).
    data : ImageSet
        Training images (``segmentation_pool()``).
    epochs : int
        Passes over ``data``.
    batch_size : int
        Images per step.
    lr : float
        Adam learning rate.
    seed : int
        Seeds the order and the flips of epoch ``e`` (``(seed, 0x5E6, e)``).
    test : ImageSet, optional
        Evaluated after every epoch (:func:`evaluate_segmentation`), which gives the Dice
        curve from which DICE_max and DICE_avg are read.
    device : torch.device or str
        Where to train.
    progress : bool
        Show progress bars.
    on_epoch : callable, optional
        Called with (epoch number from 1, record) after every epoch.

    Returns
    -------
    list of dict
        One record per epoch: ``train_loss`` and, with ``test``, ``test_dice``,
        ``test_soft_dice`` and ``test_fp_fraction``.
    """
    device = torch.device(device)
    network.to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, 0x5E6, epoch])
        network.train()
        losses = []
        batches = _batches(len(data), batch_size, rng)
        for idx in tqdm(batches, desc=f"segmentation epoch {epoch + 1}/{epochs}", disable=not progress, leave=False):
            images, lesions = data.images[idx], data.lesions[idx]
            flips = rng.random(len(idx)) < 0.5
            images = np.where(flips[:, None, None], images[:, ::-1], images)
            lesions = np.where(flips[:, None, None], lesions[:, ::-1], lesions)
            x, y = _tensor(images, device), _tensor(lesions, device)
            loss = segmentation_loss(network, network(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if test is not None and len(test):
            record.update({f"test_{k}": v for k, v in evaluate_segmentation(network, test, batch_size, device).items()})
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch + 1, record)
    return history


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path | str, network: DiscriminativeUNet, info: dict | None = None) -> Path:
    """Weights as safetensors; the config and ``info`` go into the file's string metadata.

    Parameters
    ----------
    path : Path or str
        The ``.safetensors`` file to write (parent folders are created).
    network : DiscriminativeUNet
        Whose weights and config.
    info : dict, optional
        JSON-serialisable run information (stage 1 records ``"stage": "pretrain"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(network.config.to_dict()), "info": json.dumps(info or {})}
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(path),
              metadata=metadata)
    return path


def load_checkpoint(path: Path | str) -> tuple[DUNetConfig, dict[str, torch.Tensor], dict]:
    """Config, weights and info of a :func:`save_checkpoint` file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint {path} must be a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; run `dicom-ai train dunet-pretrain` first")
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path} has no U-Net config in its metadata; was it written by save_checkpoint?")
    config = DUNetConfig.from_dict(json.loads(metadata["config"]))
    return config, load_file(str(path)), json.loads(metadata.get("info", "{}"))


# --------------------------------------------------------------------------- the bundle


def segmentation_metrics(test: ImageSet, test_seeds: range, final: dict[str, float],
                         history: list[dict]) -> dict:
    """The manifest's metrics of a stage-2 run.

    Parameters
    ----------
    test : ImageSet
        The held-out images (:func:`phantom_image_set` of ``test_seeds``).
    test_seeds : range
        Their phantom study seeds.
    final : dict
        :func:`evaluate_segmentation` of the final network on ``test``.
    history : list of dict
        The per-epoch records of :func:`train_segmentation` (``test_dice`` read from them).

    Returns
    -------
    dict
        The test set in words, the Dice protocol, final Dice, soft Dice and false-positive
        fraction, and the maximum and the mean of the last 10 epochs of the Dice curve.
    """
    dice_curve = [r["test_dice"] for r in history if "test_dice" in r]
    return {
        "test_set": f"phantom seeds {test_seeds.start}:{test_seeds.stop}, "
                    f"{int(test.lesions.any(axis=(1, 2)).sum())} images with malignant lesions, "
                    f"{len(test)} images in all",
        "dice_protocol": "per image on the model grid, map >= 0.5, mean over images with a lesion",
        "dice_final": final["dice"],
        "soft_dice_final": final["soft_dice"],
        "fp_fraction_lesion_free_images": final["fp_fraction"],
        "dice_max": float(np.nanmax(dice_curve)) if dice_curve else None,
        "dice_avg_last10": float(np.nanmean(dice_curve[-10:])) if dice_curve else None,
    }


def segmentation_manifest(config: DUNetConfig, *, name: str, version: str, phantom_shape: tuple[int, int],
                          train_seeds: range, data: ImageSet, init_info: dict, command: str, seed: int,
                          epochs: int, lr: float, batch_size: int, seconds: float, history: list[dict],
                          metrics: dict) -> dict:
    """The manifest of a U-Net bundle trained by :func:`train_segmentation`.

    Parameters
    ----------
    config : DUNetConfig
        The network configuration (head and input grid).
    name : str
        Bundle name (written into SEG/SR).
    version : str
        Bundle version.
    phantom_shape : tuple of int
        Stored (rows, columns) of the training phantoms, in pixels; the trained pixel spacing
        in mm follows from it (a full-size phantom is 3328 rows at 0.07 mm).
    train_seeds : range
        Phantom seeds of the training studies.
    data : ImageSet
        The stage-2 training images (``segmentation_pool()``).
    init_info : dict
        The stage-1 checkpoint's info (:func:`load_checkpoint`), empty when trained from scratch.
    command : str
        The command line that trained the bundle.
    seed : int
        Training seed.
    epochs : int
        Stage-2 epochs.
    lr : float
        Adam learning rate.
    batch_size : int
        Images per step.
    seconds : float
        Training time, seconds.
    history : list of dict
        The per-epoch records of :func:`train_segmentation`.
    metrics : dict
        :func:`segmentation_metrics`.
    """
    return {
        "name": name,
        "version": version,
        "family": "Artificial Intelligence",
        "architecture": {"kind": "dunet", **config.to_dict()},
        "input": {
            "views": ["CC", "MLO"],
            "intensity": "[0, 1], dense tissue bright (dicom_ai.preprocess.read_mammogram)",
            "geometry": f"breast crop in canonical orientation (chest wall at column 0), grown to the "
                        f"input aspect and resized to {config.input_shape[0]}x{config.input_shape[1]}",
            "trained_pixel_spacing_mm": round(FULL_SPACING_MM * FULL_SHAPE[0] / phantom_shape[0], 4),
        },
        "outputs": {
            "malignant_lesion": "probability map on the source grid (subtraction head: clip(x - f(x), 0, 1))"
            if config.head == "subtraction" else "probability map on the source grid (sigmoid head)",
            "malignant": f"image score = mean of the top {config.score_top_fraction:.1%} of the model-grid map",
            "reconstruction": "f(x), optional explainability image (DUNetModel.predict_with_reconstruction)",
        },
        "thresholds": {"malignant_lesion": 0.5},
        "intended_use": INTENDED_USE,
        "training": {
            "data": f"synthetic phantom studies (dicom_ai.phantom) seeds {train_seeds.start}:"
                    f"{train_seeds.stop} at {phantom_shape[0]}x{phantom_shape[1]}; "
                    f"{int(data.lesions.any(axis=(1, 2)).sum())} malignant images, "
                    f"{int((~data.lesions.any(axis=(1, 2))).sum())} benign images as empty targets",
            "lesion_mask": "mass_malignant | calcification_malignant",
            "command": command,
            "pretraining": init_info.get("stage") and {k: v for k, v in init_info.items() if k != "history"},
            "head": config.head,
            "seed": seed,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seconds": seconds,
            "history": history,
        },
        "metrics": metrics,
    }


# --------------------------------------------------------------------------- mini-MIAS fine-tuning


def mias_image_set(dataset, input_shape: tuple[int, int], progress: bool = True) -> ImageSet:
    """A mini-MIAS dataset (:class:`~dicom_ai.data.datasets.MIASDataset`) on the model grid.

    Each image goes through :func:`~dicom_ai.networks.dunet.model_grid`, as at inference: the
    breast crop (0.2 mm pixels) in canonical orientation, grown to the aspect of
    ``input_shape`` and resized to it (a MIAS breast of ~160 x 100 mm becomes ~1.2-1.6 mm per
    model pixel). The lesion target is every located mass, benign or malignant (the drawn
    outline where there is one, else the Info.txt circle); a model pixel is lesion when the
    mass covers at least half of it. Calcifications, architectural distortions and
    asymmetries are not targets (their images are empty targets unless they also hold a mass).
    ``source`` is the MIAS reference.
    """
    images, lesions, breasts, benign, malignant, source = [], [], [], [], [], []
    for sample in tqdm(dataset, desc="MIAS on the model grid", unit="image", disable=not progress):
        geo, image, breast = model_grid(sample.image, input_shape)
        mass = np.zeros(sample.image.shape, dtype=np.float32)
        for lesion in sample.lesions:
            if lesion.kind == "mass" and lesion.mask is not None:
                mass[lesion.mask] = 1.0
        images.append(image)
        lesions.append(geo.forward(mass) >= 0.5)
        breasts.append(breast)
        benign.append(bool(sample.labels.get("benign")))
        malignant.append(bool(sample.labels.get("malignant")))
        source.append(str(sample.source).rsplit("/", 1)[-1].split(".")[0])
    return ImageSet(np.stack(images).astype(np.float32), np.stack(lesions), np.stack(breasts),
                    np.array(benign), np.array(malignant), source)


def mias_manifest(config: DUNetConfig, *, base: dict, name: str, version: str, train_folds: Sequence[int],
                  data: ImageSet, positive_repeat: int, command: str, seed: int, epochs: int, lr: float,
                  batch_size: int, seconds: float, history: list[dict], metrics: dict | None = None) -> dict:
    """The manifest of a U-Net fine-tuned on mini-MIAS folds from a phantom-trained bundle.

    Parameters
    ----------
    config : DUNetConfig
        The network configuration (unchanged from ``base``).
    base : dict
        The manifest of the bundle the weights started from (its training becomes
        ``training.pretraining``).
    name, version : str
        Bundle identity (written into SEG/SR).
    train_folds : sequence of int
        The :func:`~dicom_ai.data.datasets.mias_folds` folds trained on.
    data : ImageSet
        The training images (:func:`mias_image_set` of those folds).
    positive_repeat : int
        How many times each image with a mass appears per epoch.
    command, seed, epochs, lr, batch_size, seconds, history
        As for :func:`segmentation_manifest`.
    metrics : dict, optional
        Held-out figures (filled in by the benchmark that validated the bundle).
    """
    n_pos = int(data.lesions.any(axis=(1, 2)).sum())
    return {
        "name": name,
        "version": version,
        "family": "Artificial Intelligence",
        "architecture": {"kind": "dunet", **config.to_dict()},
        "input": {
            "views": ["CC", "MLO"],
            "intensity": "[0, 1], dense tissue bright (dicom_ai.imaging.read_mammogram; MIAS PGM / 255)",
            "geometry": f"breast crop (dicom_ai.imaging.breast_mask) in canonical orientation (chest wall at "
                        f"column 0), grown to the input aspect and resized to {config.input_shape[0]}x"
                        f"{config.input_shape[1]}",
            "trained_pixel_spacing_mm": {
                "source": list(MIAS_SPACING_MM),
                "model_grid": "about 1.2-1.6 mm per model pixel (a 140-200 mm breast crop over "
                              f"{config.input_shape[0]} rows); the map is resized back to the source grid",
            },
        },
        "outputs": dict({k: v for k, v in base.get("outputs", {}).items() if k != "malignant_lesion"}, mass=(
            "probability map on the source grid of a MASS (benign or malignant: MIAS masses of both severities "
            "were the targets), subtraction head clip(x - f(x), 0, 1)")),
        # Marks masses of either severity: the SR must not call them malignant.
        "finding": "mass",
        "thresholds": {"mass": float(base.get("thresholds", {}).get("malignant_lesion", 0.5))},
        "intended_use": INTENDED_USE + " Fine-tuned on mini-MIAS (research use only).",
        "licence": MIAS_LICENCE_NOTE,
        "training": {
            "data": f"mini-MIAS folds {', '.join(str(f) for f in train_folds)} of dicom_ai.data.datasets.mias_folds "
                    f"(patient level, fixed): {len(data)} MLO images, {n_pos} with a located mass (each seen "
                    f"{positive_repeat}x per epoch), the rest empty targets; starting from the phantom-trained "
                    f"bundle {base.get('name')} {base.get('version')}",
            "lesion_mask": "MIAS masses (CIRC, SPIC, MISC; benign and malignant): drawn outline, else Info.txt circle",
            "command": command,
            "pretraining": {"bundle": f"{base.get('name')} {base.get('version')}",
                            "data": dict(base.get("training", {})).get("data")},
            "head": config.head,
            "seed": seed,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seconds": seconds,
            "history": history,
        },
        "metrics": metrics or {},
    }
