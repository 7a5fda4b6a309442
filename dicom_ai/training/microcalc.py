"""Training of the microcalcification Detector and Segmentator (``dicom-ai train microcalc``).

Data: phantom studies (``dicom_ai.phantom``) at full size, decoded with the node's own
preprocessing, resampled to the method's 0.05 mm pixels. Around every image, patches of the
largest size (49 px) are cut at centres drawn by distance to the nearest calcification (on,
next to, near, in the periphery of, far from one), so every patch class C1-C4 is present for
every patch size; smaller patch sizes are centre crops. The patches and their MC masks are
cached as ``.npy`` files (one folder per phantom seed) so a rerun does not regenerate.

Training draws class-balanced batches over C1-C4 (Detector: half C4, half C1-C3 in equal
thirds; Segmentator: a quarter of each), with random 90-degree rotations and flips, and
minimises the cross-entropy with Adam. Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Largest patch size: the cache stores patches of this size, smaller ones are centre crops.
CACHE_PATCH = 49
#: Centre strata by Chebyshev distance (px at 0.05 mm) to the nearest MC pixel.
STRATA = ("on", "edge", "near", "periphery", "far")
STRATUM_BOUNDS = {"on": (0, 0), "edge": (1, 2), "near": (3, 8), "periphery": (9, CACHE_PATCH // 2)}
DEFAULT_PER_STRATUM = {"on": 120, "edge": 80, "near": 80, "periphery": 120, "far": 300}

INTENDED_USE = "research / demonstration, trained on synthetic phantoms, not for clinical use"


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


def microcalcification_mask(masks: dict[str, np.ndarray], spacing_mm: float,
                            max_diameter_mm: float = 1.0) -> np.ndarray:
    """MC ground truth of a phantom image: both calcification masks, without the coarse
    macrocalcifications (components of equivalent diameter above ``max_diameter_mm``),
    which are not microcalcifications and are as large as a whole patch."""
    import SimpleITK as sitk

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
                    source: int = 0) -> PatchSet:
    """Cut 49 px patches from one 0.05 mm image at centres drawn per distance stratum.

    ``image`` is float [0, 1]; ``mc_mask`` and ``breast`` are boolean on the same grid.
    Centres are inside the breast; outside the image is zero (as at inference).
    """
    per_stratum = per_stratum or DEFAULT_PER_STRATUM
    from dicom_ai.networks.microcalc import box_any

    half = CACHE_PATCH // 2
    within = {d: box_any(mc_mask, d) for d in (0, 2, 8, half)}
    pools = {
        "on": mc_mask,
        "edge": within[2] & ~mc_mask,
        "near": within[8] & ~within[2],
        "periphery": within[half] & ~within[8],
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
    """49 px patches (and MC masks) centred on flat pixel indices ``centres``; zero outside."""
    half = CACHE_PATCH // 2
    padded_img = np.pad(image.astype(np.float32), half)
    padded_mask = np.pad(mc_mask, half)
    rr, cc = np.divmod(np.asarray(centres, dtype=np.int64), image.shape[1])
    win = np.arange(CACHE_PATCH)
    rows = rr[:, None, None] + win[None, :, None]
    cols = cc[:, None, None] + win[None, None, :]
    return PatchSet(padded_img[rows, cols], padded_mask[rows, cols], np.full(len(rr), source, dtype=np.int64))


def working_grid(img, spacing_mm: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A PhantomImage's breast box on the 0.05 mm grid, decoded as the node does:
    (image [0, 1], MC mask, breast mask)."""
    from dicom_ai.imaging import read_mammogram, resize

    mg = read_mammogram(img.dataset)
    mc = microcalcification_mask(img.masks, mg.spacing_mm[0])
    breast = np.asarray(img.breast_mask, dtype=bool)
    r_idx, c_idx = np.flatnonzero(breast.any(axis=1)), np.flatnonzero(breast.any(axis=0))
    r0, r1, c0, c1 = r_idx[0], r_idx[-1] + 1, c_idx[0], c_idx[-1] + 1
    shape = (round((r1 - r0) * mg.spacing_mm[0] / spacing_mm), round((c1 - c0) * mg.spacing_mm[1] / spacing_mm))
    image = resize(mg.pixels[r0:r1, c0:c1], shape)
    mc_w = resize(mc[r0:r1, c0:c1].astype(np.float32), shape, mode="nearest") > 0.5
    br_w = resize(breast[r0:r1, c0:c1].astype(np.float32), shape, mode="nearest") > 0.5
    return image, mc_w, br_w


def phantom_image_patches(img, rng: np.random.Generator, spacing_mm: float = 0.05,
                          per_stratum: dict[str, int] | None = None, source: int = 0) -> PatchSet:
    """Patches of one PhantomImage, decoded and resampled exactly as the node does."""
    image, mc_w, br_w = working_grid(img, spacing_mm)
    return extract_patches(image, mc_w, br_w, rng, per_stratum, source)


def mine_hard_negatives(detector, segmentator, seeds: list[int], shape: tuple[int, int] = (3328, 2560),
                        per_image: int = 300, seed: int = 0, progress: bool = True) -> tuple[PatchSet, PatchSet]:
    """False positives of a first-round cascade on whole training images.

    Detector: grid points where it fires on a C4 patch. Segmentator: pixels inside the
    fired area, not MC, where it says MC (tested on a random sample of such pixels).
    Returns (detector hard negatives, segmentator hard negatives), at most ``per_image``
    of each per image.
    """
    import torch
    from tqdm import tqdm

    from dicom_ai.core.findings import ModelIdentity
    from dicom_ai.networks.microcalc import C4, MicrocalcModel, box_any, patch_classes
    from dicom_ai.data.phantom import generate_study

    rng = np.random.default_rng(seed)
    model = MicrocalcModel(detector, segmentator, ModelIdentity("mining", "0"))
    cfg, s, half = model.config, model.config.detector_stride, model.config.patch_size // 2
    det_sets, seg_sets = [], []
    for study_seed in tqdm(seeds, desc="mining hard negatives", disable=not progress):
        study = generate_study(study_seed, shape=shape)
        for k, img in enumerate(study.images):
            image, mc, breast = working_grid(img, cfg.pixel_spacing_mm)
            det = model.detector_map(image, breast)
            grid_breast = breast[::s, ::s][:det.shape[0], :det.shape[1]]
            grid_class = patch_classes(mc, cfg.patch_size)[::s, ::s][:det.shape[0], :det.shape[1]]
            fired = (det >= cfg.detector_threshold) & grid_breast
            hard = np.flatnonzero(fired & (grid_class == C4))
            if len(hard):
                pick = rng.choice(hard, size=min(per_image, len(hard)), replace=False)
                gi, gj = np.divmod(pick, det.shape[1])
                det_sets.append(cut_patches(image, mc, gi * s * image.shape[1] + gj * s, study_seed * 10 + k))
            # Pixels the Segmentator would visit: within half a patch of a fired grid point.
            fired_px = np.zeros(image.shape, dtype=bool)
            fired_px[::s, ::s][:fired.shape[0], :fired.shape[1]] = fired
            fired_px = box_any(fired_px, half) & breast & ~mc
            cand = np.flatnonzero(fired_px)
            if len(cand):
                cand = rng.choice(cand, size=min(20 * per_image, len(cand)), replace=False)
                patches = cut_patches(image, mc, cand, study_seed * 10 + k)
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


def phantom_patches(seed: int, cache_dir: Path, shape: tuple[int, int] = (3328, 2560),
                    per_stratum: dict[str, int] | None = None) -> PatchSet:
    """Patches of the 4 images of phantom study ``seed``, from the cache or generated once."""
    folder = Path(cache_dir) / f"seed{seed}_{shape[0]}x{shape[1]}"
    if (folder / "meta.json").is_file():
        return PatchSet(np.load(folder / "images.npy").astype(np.float32), np.load(folder / "masks.npy"),
                        np.load(folder / "source.npy"))
    from dicom_ai.data.phantom import generate_study

    study = generate_study(seed, shape=shape)
    rng = np.random.default_rng(seed)
    sets = [phantom_image_patches(img, rng, per_stratum=per_stratum, source=seed * 10 + k)
            for k, img in enumerate(study.images)]
    patches = PatchSet.concat(sets)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", patches.images.astype(np.float16))
    np.save(folder / "masks.npy", patches.masks)
    np.save(folder / "source.npy", patches.source)
    (folder / "meta.json").write_text(json.dumps({"seed": seed, "shape": list(shape), "count": len(patches)}))
    patches.images = patches.images.astype(np.float16).astype(np.float32)  # as if read back
    return patches


def has_cluster(seed: int) -> bool:
    """Whether phantom study ``seed`` holds a calcification cluster (checked on a tiny render:
    findings are drawn in mm before rendering, so they do not depend on the image size)."""
    from dicom_ai.data.phantom import generate_study

    study = generate_study(seed, shape=(128, 96))
    return any(f.kind == "cluster" for found in study.findings.values() for f in found)


def load_patches(seeds: list[int], cache_dir: Path, shape: tuple[int, int] = (3328, 2560),
                 progress: bool = True) -> PatchSet:
    """Patches of several phantom studies (cached per seed)."""
    from tqdm import tqdm

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
    """``n`` patch indices drawn per the role's class quota (classes with no patches are
    skipped and their share goes to the others)."""
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
    import torch

    k = torch.randint(0, 8, (batch.shape[0],), generator=generator)
    out = batch.clone()
    for t in range(8):
        sel = k == t
        if sel.any():
            x = torch.rot90(batch[sel], t % 4, dims=(-2, -1))
            out[sel] = torch.flip(x, dims=(-1,)) if t >= 4 else x
    return out


def train_network(config, role: str, patches: PatchSet, steps: int = 1000, batch: int = 64,
                  lr: float = 1e-3, seed: int = 0, checkpoint: Path | None = None,
                  progress: bool = True, desc: str | None = None, init=None,
                  hard: PatchSet | None = None, hard_share: float = 0.25):
    """Train one network for ``role`` on class-balanced batches; returns (net, losses).

    ``init`` (a PatchCNN) continues from its weights. ``hard`` adds mined hard negatives,
    which fill ``hard_share`` of every batch. ``checkpoint`` (optional) receives the weights
    as safetensors every 200 steps and at the end.
    """
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm import tqdm

    from dicom_ai.networks.microcalc import PatchCNN, role_targets

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    net = PatchCNN(config)
    if init is not None:
        net.load_state_dict(init.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.05)
    images, _ = patches.crop(config.patch_size)
    classes = patches.classes(config.patch_size)
    targets = torch.from_numpy(role_targets(classes, role).astype(np.int64))
    n_hard = int(round(batch * hard_share)) if hard is not None and len(hard) else 0
    if n_hard:
        hard_images, _ = hard.crop(config.patch_size)
        images = np.concatenate([images, hard_images])
        targets = torch.cat([targets, torch.from_numpy(role_targets(hard.classes(config.patch_size), role).astype(np.int64))])
    images_t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    losses = []
    net.train()
    bar = tqdm(range(steps), desc=desc or f"{role} {config.patch_size}px {config.padding}", disable=not progress)
    for step in bar:
        idx = balanced_indices(classes, role, batch - n_hard, rng)
        if n_hard:
            idx = np.concatenate([idx, len(classes) + rng.integers(0, len(hard), n_hard)])
        idx = torch.from_numpy(idx)
        x = augment(images_t[idx][:, None], gen)
        loss = F.cross_entropy(net(x), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if checkpoint is not None and ((step + 1) % 200 == 0 or step + 1 == steps):
            Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(checkpoint))
    net.eval()
    return net, losses


def evaluate_patches(net, role: str, patches: PatchSet, per_class: int = 500, seed: int = 1) -> dict:
    """Accuracy, sensitivity and specificity on a held-out set balanced per the role's quota.

    Patch-level accuracy on a balanced set is the seed paper's metric; sensitivity and
    specificity say what it hides.
    """
    import torch

    from dicom_ai.networks.microcalc import role_targets

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
# Command line


def _seed_list(text: str) -> list[int]:
    """'0:6' -> [0..5]; '1,4,7' -> [1, 4, 7]."""
    if ":" in text:
        a, b = text.split(":")
        return list(range(int(a), int(b)))
    return [int(s) for s in text.split(",") if s]


def select_seeds(candidates: list[int], cluster_studies: int, normal_studies: int) -> list[int]:
    """The first ``cluster_studies`` candidates with a cluster and ``normal_studies`` without
    (``cluster_studies`` 0 keeps every candidate)."""
    if cluster_studies <= 0:
        return list(candidates)
    with_cluster, without = [], []
    for seed in candidates:
        if len(with_cluster) >= cluster_studies and len(without) >= normal_studies:
            break
        (with_cluster if has_cluster(seed) else without).append(seed)
    return with_cluster[:cluster_studies] + without[:normal_studies]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dicom-ai train microcalc``."""
    p = subparsers.add_parser(
        "microcalc", help="train the microcalcification Detector and Segmentator on phantoms",
        description="Train both microcalcification CNNs on full-size phantom studies and write a model bundle.")
    p.add_argument("--out", default="models/microcalc", help="bundle folder to write (default models/microcalc)")
    p.add_argument("--train-seeds", default="0:30", help="candidate phantom seeds for training, 'a:b' or 'a,b,c'")
    p.add_argument("--cluster-studies", type=int, default=10,
                   help="use the first N candidate studies that hold a calcification cluster (0: all candidates)")
    p.add_argument("--normal-studies", type=int, default=2,
                   help="plus the first N candidates without one (extra negatives)")
    p.add_argument("--val-seeds", default="1001,1003,1005", help="held-out phantom seeds for the manifest metrics")
    p.add_argument("--cache", default="build/microcalc", help="folder for the cached .npy patches")
    p.add_argument("--patch-size", type=int, default=49, choices=(29, 39, 49))
    p.add_argument("--padding", default="valid", choices=("valid", "same"))
    p.add_argument("--steps", type=int, default=500, help="first-round optimisation steps per network")
    p.add_argument("--mine-studies", type=int, default=6,
                   help="training studies (the first N) on which first-round false positives are mined")
    p.add_argument("--hard-steps", type=int, default=300,
                   help="second-round steps per network with a quarter of each batch mined hard negatives (0: none)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1 is fastest on a shared, loaded machine)")
    p.add_argument("--version", default="0.1.0", help="bundle version string")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from dicom_ai.networks.bundle import save_bundle
    from dicom_ai.networks.microcalc import MicrocalcConfig, MicrocalcModel
    from dicom_ai.core.findings import ModelIdentity

    torch.set_num_threads(args.threads)
    t0 = time.time()
    cache = Path(args.cache)
    config = MicrocalcConfig(patch_size=args.patch_size, padding=args.padding)
    train_seeds, val_seeds = select_seeds(_seed_list(args.train_seeds), args.cluster_studies,
                                          args.normal_studies), _seed_list(args.val_seeds)
    print(f"training studies (phantom seeds): {train_seeds}")
    train = load_patches(train_seeds, cache)
    val = load_patches(val_seeds, cache)
    counts = {f"C{c}": int(np.sum(train.classes(config.patch_size) == c)) for c in (1, 2, 3, 4)}
    print(f"training patches: {len(train)} ({counts}); held-out patches: {len(val)}")
    nets, metrics, history = {}, {}, {}
    for k, role in enumerate(("detector", "segmentator")):
        nets[role], history[role] = train_network(
            config, role, train, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed + k,
            checkpoint=cache / "checkpoints" / f"{role}.safetensors")
    mined = {"detector": 0, "segmentator": 0}
    if args.hard_steps > 0 and args.mine_studies > 0:
        split = len(train_seeds) - args.normal_studies if args.cluster_studies > 0 else len(train_seeds)
        mine_seeds = (train_seeds[split:] + train_seeds[:split])[:args.mine_studies]  # normal studies first
        hard = dict(zip(("detector", "segmentator"),
                        mine_hard_negatives(nets["detector"], nets["segmentator"], mine_seeds, seed=args.seed)))
        for k, role in enumerate(("detector", "segmentator")):
            mined[role] = len(hard[role])
            print(f"{role}: {len(hard[role])} mined hard negatives from studies {mine_seeds}")
            nets[role], more = train_network(
                config, role, train, steps=args.hard_steps, batch=args.batch, lr=args.lr / 3, seed=args.seed + 10 + k,
                init=nets[role], hard=hard[role], checkpoint=cache / "checkpoints" / f"{role}.safetensors",
                desc=f"{role} with hard negatives")
            history[role] = history[role] + more
    for role in ("detector", "segmentator"):
        net, losses = nets[role], history[role]
        metrics[f"{role}_patch"] = evaluate_patches(net, role, val)
        history[role] = {"first_100_mean_loss": float(np.mean(losses[:100])),
                         "last_100_mean_loss": float(np.mean(losses[-100:]))}
        m = metrics[f"{role}_patch"]
        print(f"{role}: held-out patch accuracy {m['accuracy']:.4f} sensitivity {m['sensitivity']:.4f} "
              f"specificity {m['specificity']:.4f} (n={m['n']})")
    identity = ModelIdentity(name="microcalc", version=args.version)
    model = MicrocalcModel(nets["detector"], nets["segmentator"], identity)
    manifest = {
        "name": "microcalc",
        "version": args.version,
        "family": "Artificial Intelligence",
        "architecture": {"kind": "microcalc", **config.to_dict()},
        "input": {"modality": "MG", "views": ["CC", "MLO"], "pixel_spacing_mm": config.pixel_spacing_mm,
                  "resampling": "breast bounding box resampled (bilinear) from Imager Pixel Spacing to 0.05 mm",
                  "intensity": "dicom_ai.preprocess [0, 1], dense tissue bright"},
        "thresholds": {"calcification": config.calcification_threshold,
                       "calcification_cluster": config.cluster_threshold},
        "intended_use": INTENDED_USE,
        "training": {
            "data": f"dicom_ai.phantom full-size studies (3328x2560 at 0.07 mm), seeds {train_seeds}",
            "command": "dicom-ai train microcalc " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
                if k not in ("handler", "command", "model")),
            "seed": args.seed, "steps_per_network": args.steps, "batch": args.batch, "lr": args.lr,
            "patches": {"train": len(train), "train_classes": counts, "mined_hard_negatives": mined},
            "hard_negative_steps_per_network": args.hard_steps,
            "loss": history, "wall_time_s": round(time.time() - t0, 1),
        },
        "metrics": {"held_out_seeds": args.val_seeds, **metrics},
    }
    save_bundle(args.out, manifest, model.state_dict())
    print(f"bundle written to {args.out} in {time.time() - t0:.0f} s")
    return 0
