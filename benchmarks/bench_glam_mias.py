"""GLAM on real mammograms: mini-MIAS five-fold cross-validation of the phantom-trained bundle fine-tuned.

For each of the five folds of :func:`dicom_ai.data.datasets.mias_folds` (women kept
together), GLAM starts from the phantom-trained bundle and the CAM baseline from its
phantom-trained weights; both are fine-tuned on the other four folds with image-level labels
only (benign mass / malignant mass, from Info.txt: CIRC, SPIC, MISC rows) and applied to
the held-out fold. Over the 322 held-out predictions:

* image-level ROC AUC (benign mass, malignant mass, any mass) with bootstrap 95 % CIs, for
  GLAM's global prediction and the CAM classifier;
* Dice on the hand-drawn mass outlines (``masks/``; masses without a drawing are not in the
  Dice) of the fused map, the global map alone and the CAM map, channel of the mass's
  class: soft Dice and Dice at the threshold that maximised Dice on the training folds;
* lesion-level FROC of GLAM's regions (connected components of the fused map, either
  class, p >= 0.05, scored by their peak) against every located mass (circle or drawing),
  calcification clusters and other findings ignored.

``--ship DIR`` also fine-tunes on all five folds and writes that bundle (the node's GLAM) with
the cross-validated figures in its manifest. Overlays: held-out predictions of a few MIAS
cases and the four real images of shared/data/real.

Run: ``.venv/bin/python benchmarks/bench_glam_mias.py --mias /work/data/mias``.
Result: benchmarks/results/glam_mias.json; overlays: build/previews/glam_mias_*.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_glam import THRESHOLDS, bootstrap_auc, mean_ci, overlay_panels, cam_maps, glam_maps  # noqa: E402
from dicom_ai.data.datasets import MIAS_FOLDS, MIASDataset  # noqa: E402
from dicom_ai.data.metrics import detections_from_map, dice, lesion_froc, roc_auc, soft_dice  # noqa: E402
from dicom_ai.networks.bundle import load_bundle, save_bundle  # noqa: E402
from dicom_ai.networks.glam import CamClassifier, Glam, GlamModel  # noqa: E402
from dicom_ai.training.glam import GlamData, class_weights, train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# Pictures of real images (the shared FFDM exams, mini-MIAS) are derived data: their sources may not be
# committed, so they go to build/ (ignored), never to benchmarks/results.
PREVIEWS = ROOT / "build" / "previews"
CLASSES = ("benign", "malignant")


def load_mias(root: Path):
    """All MIAS samples as GlamData (mass labels, lesion masks), plus folds, drawn masks and lesions."""
    mias = MIASDataset(root)
    mammograms, breasts, labels, lesions, folds, drawn, located, refs = [], [], [], [], [], [], [], []
    for i in range(len(mias)):
        s = mias[i]
        masses = [l for l in s.lesions if l.kind == "mass"]
        mammograms.append(s.image)
        breasts.append(s.image.breast_mask)
        labels.append([float(any(l.severity == c for l in masses)) for c in CLASSES])
        lesions.append(np.stack([s.masks["mass_benign"], s.masks["mass_malignant"]]))
        folds.append(mias.records[i].extra["fold"])
        refs.append(mias.records[i].extra["reference"])
        drawn.append([(CLASSES.index(l.severity), l.mask) for l in masses if l.outline == "mask"])
        located.append({"masses": [l.mask for l in masses if l.mask is not None],
                        "other": [l.mask for l in s.lesions if l.kind != "mass" and l.mask is not None]})
    data = GlamData(mammograms, breasts, np.asarray(labels, np.float32), np.asarray(lesions, bool))
    return data, np.asarray(folds), drawn, located, refs, mias.licence


def subset(data: GlamData, idx) -> GlamData:
    idx = list(idx)
    return GlamData([data.mammograms[i] for i in idx], [data.breast_masks[i] for i in idx], data.labels[idx],
                    data.lesions[idx])


def fine_tune(bundle, cam_state, data: GlamData, args, seed: int):
    """GLAM (all three stages) and CAM fine-tuned on ``data``; returns (GlamModel, CamClassifier, history)."""
    base = GlamModel.from_bundle(bundle, "cpu")
    config = base.config
    net = Glam(config)
    net.load_state_dict(base.network.state_dict())
    weights = class_weights(data.labels, "sqrt")
    stages = [("global", args.epochs_global), ("local", args.epochs_local), ("joint", args.epochs_joint)]
    history = train(net, data, config, stages=stages, batch_size=8, lr=args.lr, beta=args.beta, seed=seed,
                    device=torch.device("cpu"), progress=False, pos_weight=weights, schedule="cosine", warmup_steps=5)
    cam = CamClassifier(config)
    cam.load_state_dict(cam_state)
    from dicom_ai.training.glam import cam_loss

    train(cam, data, config, stages=[("cam", args.epochs_global)], batch_size=8, lr=args.lr, beta=0.0, seed=seed,
          device=torch.device("cpu"), progress=False, schedule="cosine", warmup_steps=5,
          loss_fn=lambda stage, n, x, mask, y: cam_loss(n, x, y, 0.0, weights))
    model = GlamModel(net, base.identity, base.thresholds, "cpu")
    return model, cam.eval(), history


def _best_threshold(maps, key, drawn_items) -> float:
    """Threshold maximising mean Dice over the drawn masses of ``maps`` (training folds)."""
    scores = {float(t): np.mean([dice(maps[i][key][c], m, threshold=float(t)) for i, c, m in drawn_items])
              for t in THRESHOLDS} if drawn_items else {0.5: 0.0}
    return max(scores, key=scores.get)


def _drawn_items(indices, drawn):
    return [(k, c, m) for k, i in enumerate(indices) for c, m in drawn[i]]


def _dice_block(maps, key, items, threshold) -> dict:
    return {"threshold_from_training_folds": threshold,
            "dice": [float(dice(maps[k][key][c], m, threshold=threshold)) for k, c, m in items],
            "soft_dice": [float(soft_dice(maps[k][key][c], m)) for k, c, m in items]}


def _mean_ci(values) -> dict:
    """Mean, bootstrap 95 % interval (bench_glam.mean_ci) and count of per-mass values."""
    v = np.asarray(values, float)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    return {"mean": round(float(v.mean()), 4), "ci95": mean_ci(v), "n": int(v.size)}


def _regions(fused: np.ndarray) -> list[tuple[float, float, float]]:
    return detections_from_map(fused.max(0), threshold=0.05)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mias", type=Path, default=Path("/work/data/mias"))
    parser.add_argument("--bundle", default=str(ROOT / "build" / "glam-phantom"))
    parser.add_argument("--cam", default=str(ROOT / "build" / "glam-cam" / "cam.safetensors"))
    parser.add_argument("--epochs-global", type=int, default=8)
    parser.add_argument("--epochs-local", type=int, default=3)
    parser.add_argument("--epochs-joint", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--folds", type=int, nargs="*", default=list(range(MIAS_FOLDS)))
    parser.add_argument("--ship", default=None, help="also fine-tune on all folds and write the bundle here")
    parser.add_argument("--save-folds", type=Path, default=ROOT / "build" / "glam-mias",
                        help="write each fold's fine-tuned bundle to DIR/fold<k> (for bench_mias_node.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not (args.mias / "Info.txt").is_file():
        raise SystemExit(f"{args.mias}: no mini-MIAS (Info.txt); see the README section on real mammograms")
    t0 = time.time()
    data, folds, drawn, located, refs, licence = load_mias(args.mias)
    bundle = load_bundle(args.bundle)
    cam_state = load_file(args.cam)
    print(f"MIAS loaded: {len(data)} images in {time.time() - t0:.0f} s; mass labels benign "
          f"{int(data.labels[:, 0].sum())}, malignant {int(data.labels[:, 1].sum())}", file=sys.stderr)

    order, g_all, c_all, dice_rows, histories = [], [], [], {"glam_fused": [], "global_only": [], "cam": []}, {}
    for fold in args.folds:
        t1 = time.time()
        train_idx = np.flatnonzero(folds != fold)
        test_idx = np.flatnonzero(folds == fold)
        model, cam, history = fine_tune(bundle, cam_state, subset(data, train_idx), args, seed=fold)
        histories[str(fold)] = history
        if args.save_folds:
            manifest = copy.deepcopy(bundle.manifest)
            manifest["version"] = f"{manifest['version']}+mias-fold{fold}"
            manifest["training"]["fine_tuning"] = {"data": f"mini-MIAS folds other than {fold}", "history": history}
            save_bundle(args.save_folds / f"fold{fold}", manifest, model.network.state_dict())
        # Thresholds need only the training images with a drawn mass.
        tr_drawn = [i for i in train_idx if drawn[i]]
        g_train, c_train = glam_maps(model, subset(data, tr_drawn)), cam_maps(cam, subset(data, tr_drawn), model.config)
        g_test, c_test = glam_maps(model, subset(data, test_idx)), cam_maps(cam, subset(data, test_idx), model.config)
        tr_items, te_items = _drawn_items(tr_drawn, drawn), _drawn_items(test_idx, drawn)
        for name, key, mtr, mte in (("glam_fused", "fused", g_train, g_test), ("global_only", "global", g_train, g_test),
                                    ("cam", "cam", c_train, c_test)):
            dice_rows[name].append(_dice_block(mte, key, te_items, _best_threshold(mtr, key, tr_items)))
        order += list(test_idx)
        g_all += g_test
        c_all += c_test
        print(f"fold {fold}: {len(train_idx)} train / {len(test_idx)} test images, {time.time() - t1:.0f} s",
              file=sys.stderr)

    labels = data.labels[order]
    auc = {}
    for name, maps, key in (("glam_global_prediction", g_all, "score"), ("glam_local_prediction", g_all, "local_score"),
                            ("cam_classifier", c_all, "score")):
        s = np.stack([m[key] for m in maps])
        auc[name] = {cls: {"auc": round(roc_auc(s[:, c], labels[:, c]), 4), "ci95": bootstrap_auc(s[:, c], labels[:, c])}
                     for c, cls in enumerate(CLASSES)}
        any_label, any_score = labels.max(1), s.max(1)
        auc[name]["any_mass"] = {"auc": round(roc_auc(any_score, any_label), 4), "ci95": bootstrap_auc(any_score, any_label)}
    dice_summary = {}
    for name, blocks in dice_rows.items():
        d = [v for b in blocks for v in b["dice"]]
        sd = [v for b in blocks for v in b["soft_dice"]]
        dice_summary[name] = {"dice_at_training_fold_threshold": _mean_ci(d), "soft_dice": _mean_ci(sd),
                              "thresholds_per_fold": [b["threshold_from_training_folds"] for b in blocks]}
    gains = {}
    for metric in ("dice_at_training_fold_threshold", "soft_dice"):
        f, g = dice_summary["glam_fused"][metric]["mean"], dice_summary["global_only"][metric]["mean"]
        gains[metric] = round(100 * (f - g) / g, 1) if f is not None and g else None
    froc = lesion_froc([_regions(m["fused"]) for m in g_all], [located[i]["masses"] for i in order],
                       ignore=[located[i]["other"] for i in order])
    result = {
        "data": f"mini-MIAS, {len(data)} MLO images (200 um), five folds by woman (dicom_ai.data.datasets.mias_folds); "
                f"image-level mass labels benign {int(data.labels[:, 0].sum())} / malignant "
                f"{int(data.labels[:, 1].sum())}; {sum(len(d) for d in drawn)} hand-drawn mass outlines for Dice; "
                f"{sum(len(l['masses']) for l in located)} located masses for FROC",
        "licence": licence,
        "start": f"{bundle.manifest['name']} {bundle.manifest['version']} ({args.bundle}); CAM {args.cam}",
        "fine_tuning": {"stages": {"global": args.epochs_global, "local": args.epochs_local, "joint": args.epochs_joint},
                        "cam_epochs": args.epochs_global, "lr": args.lr, "beta": args.beta, "batch_size": 8,
                        "class_weighting": "sqrt", "schedule": "cosine, 5 warm-up steps", "labels": "image-level only"},
        "auc": auc, "dice_on_drawn_masses": dice_summary, "relative_gain_fused_over_global_percent": gains,
        "froc_glam_regions": {"sensitivity_at": {str(k): round(v, 4) for k, v in froc.sensitivity_at.items()},
                              "mean_sensitivity": round(froc.mean_sensitivity, 4), "masses": froc.n_regions,
                              "images": froc.n_images},
        "fold_histories": histories, "minutes": round((time.time() - t0) / 60, 1),
    }
    _overlays(g_all, order, data, refs, result)
    if args.ship:
        model, cam, history = fine_tune(bundle, cam_state, data, args, seed=99)
        manifest = copy.deepcopy(bundle.manifest)
        manifest["version"] = manifest["version"] + "+mias"
        manifest["training"]["fine_tuning"] = {
            "data": "all 322 mini-MIAS images (five folds), image-level mass labels only", **result["fine_tuning"],
            "history": history, "licence": licence}
        manifest["metrics"]["mini_mias_cross_validation"] = {
            k: result[k] for k in ("data", "auc", "dice_on_drawn_masses", "relative_gain_fused_over_global_percent",
                                   "froc_glam_regions")}
        manifest["metrics"]["mini_mias_cross_validation"]["source"] = "benchmarks/results/glam_mias.json"
        save_bundle(args.ship, manifest, model.network.state_dict())
        result["shipped_bundle"] = args.ship
    RESULTS.mkdir(parents=True, exist_ok=True)
    PREVIEWS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "glam_mias.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    _print(result)
    print(f"wrote {out}")
    return 0


def _overlays(g_all, order, data: GlamData, refs, result: dict, n: int = 4) -> None:
    """Held-out overlays of the first n malignant-mass and n benign-mass images by reference."""
    picks = []
    for c in (1, 0):
        picks += [k for k, i in enumerate(order) if data.labels[i, c] and k not in picks][:n // 2]
    notes = []
    for k in picks:
        i = order[k]
        m = data.mammograms[i]
        maps = {"benign_lesion": g_all[k]["fused"][0], "malignant_lesion": g_all[k]["fused"][1]}
        path = PREVIEWS / f"glam_mias_{refs[i]}.png"
        _save_overlay_plain(m.pixels, maps, path)
        notes.append({"image": refs[i], "labels": {c: bool(data.labels[i, j]) for j, c in enumerate(CLASSES)},
                      "score": [round(float(v), 4) for v in g_all[k]["score"]], "overlay": str(path.relative_to(ROOT))})
    result["overlays"] = notes


def _save_overlay_plain(raw: np.ndarray, maps: dict, out_path: Path, rows: int = 300) -> None:
    from PIL import Image

    panels, _ = overlay_panels(raw, maps, rows, alpha=0.7, scale_to_max=False)
    Image.fromarray((panels * 255).astype(np.uint8)).save(out_path, optimize=True)


def _print(result: dict) -> None:
    print(f"{'image AUC (held-out folds)':28s} {'benign':>16s} {'malignant':>16s} {'any mass':>16s}")
    for name, a in result["auc"].items():
        cells = [f"{a[k]['auc']:.3f} [{a[k]['ci95'][0]:.2f},{a[k]['ci95'][1]:.2f}]" for k in ("benign", "malignant", "any_mass")]
        print(f"{name:28s} " + " ".join(f"{c:>16s}" for c in cells))
    print(f"{'Dice on drawn masses':28s} {'Dice@train-thr':>20s} {'soft Dice':>20s}")
    for name, d in result["dice_on_drawn_masses"].items():
        a, b = d["dice_at_training_fold_threshold"], d["soft_dice"]
        print(f"{name:28s} {a['mean']:.3f} [{a['ci95'][0]:.3f},{a['ci95'][1]:.3f}] {b['mean']:.3f} "
              f"[{b['ci95'][0]:.3f},{b['ci95'][1]:.3f}]")
    f = result["froc_glam_regions"]
    print(f"FROC GLAM regions ({f['masses']} masses, {f['images']} images): sensitivity at "
          + ", ".join(f"{k} FP/img {v:.2f}" for k, v in f["sensitivity_at"].items()))


if __name__ == "__main__":
    sys.exit(main())
