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
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dicom_ai.data import metrics
from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig, model_grid
from dicom_ai.training.genesis import GenesisConfig, distort
from dicom_ai.imaging import read_mammogram

__all__ = [
    "ImageSet",
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
]

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


def _phantom_version() -> str:
    import dicom_ai.data.phantom as phantom

    return hashlib.sha256(Path(phantom.__file__).read_bytes()).hexdigest()[:12]


_STUDY_KEYS = ("images", "mass_cover", "calcification_cover", "breasts", "benign", "malignant")


def _study_arrays(seed: int, phantom_shape: tuple[int, int], input_shape: tuple[int, int]) -> dict[str, np.ndarray]:
    from dicom_ai.data.phantom import generate_study

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


def phantom_image_set(seeds: Sequence[int], input_shape: tuple[int, int], phantom_shape: tuple[int, int],
                      cache_dir: Path | str | None = CACHE_DIR, progress: bool = False,
                      calcification_cover: float = 1e-3) -> ImageSet:
    """The four views of each phantom study ``seeds`` on the model grid, cached per study.

    ``phantom_shape`` is the stored (rows, columns) of the generated images; the cache key
    includes both shapes and a digest of the phantom generator's source.
    """
    folder = None
    if cache_dir is not None:
        key = f"p{phantom_shape[0]}x{phantom_shape[1]}-m{input_shape[0]}x{input_shape[1]}-{_phantom_version()}-v2"
        folder = Path(cache_dir) / key
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
    """Mean squared error over the pixels where ``mask`` is set (all tensors (N, 1, H, W))."""
    weight = mask.to(prediction.dtype)
    return ((prediction - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


def soft_dice_loss(probability: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, per image, averaged over the images whose target is not empty.

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

    Uses every image of ``data`` (pass ``ImageSet.pretraining_pool()``). Returns one record
    per epoch: mean training loss and, with ``validation``, the restoration MSE on a fixed
    set of distortions of it.
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

    Uses ``dicom_ai.metrics``; images with an empty ``lesion`` get NaN, so they are excluded
    from the Dice means (their false-positive area is reported separately).
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
    """Probability maps (N, H, W) of a stack of model-grid images."""
    network.eval()
    x = _tensor(images, torch.device(device))
    return network.probability(_predict(network, x, batch_size))[:, 0].cpu().numpy()


def evaluate_segmentation(network: DiscriminativeUNet, data: ImageSet, batch_size: int = 8,
                          device: torch.device | str = "cpu", threshold: float = 0.5) -> dict[str, float]:
    """Mean per-image Dice and soft Dice over images with lesions; false-positive area on the rest.

    ``fp_fraction`` is the mean fraction of breast pixels at or above ``threshold`` on images
    whose mask is empty (NaN when there are none).
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

    Augmentation: a random up-down flip (p = 0.5) of image and mask. With ``test``, every
    epoch is evaluated (:func:`evaluate_segmentation`), which gives the Dice curve from which
    DICE_max and DICE_avg are read. Returns one record per epoch.
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
    """Weights as safetensors; the config and ``info`` go into the file's string metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(network.config.to_dict()), "info": json.dumps(info or {})}
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(path),
              metadata=metadata)
    return path


def load_checkpoint(path: Path | str) -> tuple[DUNetConfig, dict[str, torch.Tensor], dict]:
    """Config, weights and info of a :func:`save_checkpoint` file."""
    from safetensors import safe_open

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
