"""Does a second look at the U-Net's mass candidates find more masses at 0.5 and 1 false mark per
image? mini-MIAS 5-fold patient-level CV, the node protocol of bench_mias_node (its
``cross_validate``: thresholds per budget chosen on the other folds, held-out marks pooled).

Input: ``mass_rescore_dump.py``'s arrays (each image's out-of-fold U-Net output on its working
grid, plain and up-down-flipped pass). Candidates and hits are computed on the working grid
(0.8 mm; lesion masks and the breast-less-pectoral region mapped there), so the baseline row
differs slightly from bench_mias_node's source-grid figures; every row here uses the same
grid, folds and thresholds rule, so rows are paired.

Rows:
* ``unet`` : today's scores (peak raw output, each fold's manifest Platt calibration);
* ``unet_tta`` : mean of the plain and the up-down-flipped pass (training used up-down flips),
  Platt refitted per held-out fold on the other folds' candidates; left-right flips are not
  label-preserving here (the working grid puts the chest wall at column 0 by design);
* ``rescore_<variant>_x<members>`` : :mod:`dicom_ai.networks.mass_rescore` per held-out fold k, trained
  only on the candidate regions of the other folds' images (each produced by that image's
  out-of-fold U-Net; leak stated in the JSON), scored on fold k; ``features`` or ``patch+features``,
  ``+hybrid``: with the candidates on masses inserted into the other folds' normals as extra
  positives (``--hybrid``); ``[a,b,...]``: a feature subset; ``_unet<w>``: the logit mean with the
  U-Net's own Platt score at weight w (:func:`~dicom_ai.networks.mass_rescore.combine`).

Shared real images (``--real``): marks per image at the fp0.25 threshold chosen on all five folds,
run by ``--ship`` (today's all-folds U-Net) and, for the rescore rows, a stage trained on all 322
images; at each ``--real-spacing`` (bench_mias_node reads them at 0.1 mm; the node's DICOMs of them
are 0.07 mm).

Paired bootstrap over women (2000 draws) of the held-out sensitivity difference at 0.5 and 1
false marks per image (sent marks fixed, women resampled).

    nice -n 10 python benchmarks/bench_mass_rescore.py --dump /work/data/rescore/dump \
        --dunet-folds /work/data/dunet-0.8-folds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image as PILImage

from dicom_ai.imaging.mammogram import mammogram_from_array, orient
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.dunet import DUNetModel, network_grid
from dicom_ai.networks.pipeline import allowed_region
from dicom_ai.networks.mass_rescore import FEATURES, RescoreConfig, candidate_regions, combine, rescore_regions
from dicom_ai.training.dunet_patches import fit_platt
from dicom_ai.training.mass_rescore import concat_examples, image_examples, train_rescorer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mias_node as node  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
LEVEL = 0.1


def load(dump: Path) -> list[dict]:
    out = []
    for p in sorted(dump.glob("mdb*.npz")):
        if p.name.endswith(".tmp.npz"):
            continue
        z = np.load(p)
        out.append({"ref": p.stem, **{k: z[k] for k in z.files}})
    return out


def platt(cal: dict, raw: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(cal["slope"] * raw + cal["intercept"])))


def images_of(data: list[dict]) -> list:
    return [SimpleNamespace(truth={"mass": list(d["masses"]), "calcification_cluster": []}, any=list(d["any"]),
                            fold=int(d["fold"]), normal=bool(d["normal"]), malignant=False) for d in data]


def regions_of(data: list[dict], key: str) -> list[list]:
    return [candidate_regions(d[key], d["allowed"], LEVEL) for d in data]


def hits_of(data, regions) -> list[np.ndarray]:
    out = []
    for d, regs in zip(data, regions):
        h = [bool(d["masses"].shape[0]) and bool(d["masses"][:, int(round(r.centroid[0])), int(round(r.centroid[1]))].any())
             for r in regs]
        out.append(np.asarray(h, dtype=bool))
    return out


def marks_from(regions, scores, floor: float) -> list[dict]:
    out = []
    for regs, s in zip(regions, scores):
        c = np.array([[sc, r.centroid[0], r.centroid[1], len(r.pixels)] for r, sc in zip(regs, s)]).reshape(-1, 4)
        out.append({"dunet": SimpleNamespace(candidates={"mass": c}, thresholds={"mass": floor})})
    return out


def evaluate(images, marks) -> dict:
    res = node.cross_validate(images, marks)
    froc = {str(b): res["froc"][str(b)] for b in BUDGETS}
    return {"sensitivity": [froc[str(b)]["sensitivity"]["mass"] for b in BUDGETS],
            "false_marks_per_image": [froc[str(b)]["false_marks_per_image"] for b in BUDGETS],
            "false_marks_per_normal_image": [froc[str(b)]["false_marks_per_normal_image"] for b in BUDGETS],
            "_sent": res["sent"]}


def per_image(images, sent) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: masses found, masses, false marks of the sent findings."""
    found = np.array([sum(any(node._at(m, f["row"], f["col"]) for f in sent[i]) for m in im.truth["mass"])
                      for i, im in enumerate(images)])
    total = np.array([len(im.truth["mass"]) for im in images])
    false = np.array([sum(not any(node._at(m, f["row"], f["col"]) for m in im.any) for f in sent[i])
                      for i, im in enumerate(images)])
    return found, total, false


def paired_bootstrap(images, women, sent_a, sent_b, n=2000, seed=0) -> dict:
    fa, tot, _ = per_image(images, sent_a)
    fb, _, _ = per_image(images, sent_b)
    ws = sorted(set(women))
    idx_of = {w: [i for i, x in enumerate(women) if x == w] for w in ws}
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        pick = np.concatenate([idx_of[ws[j]] for j in rng.integers(0, len(ws), len(ws))])
        t = tot[pick].sum()
        diffs.append((fb[pick].sum() - fa[pick].sum()) / t if t else 0.0)
    d = (fb.sum() - fa.sum()) / tot.sum()
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"difference": round(float(d), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "p_not_better": round(float(np.mean(np.asarray(diffs) <= 0)), 4)}


def real_views(folder: Path, model: DUNetModel, spacing_mm: float = 0.1) -> list[dict]:
    """The shared real CC images as bench_mias_node reads them (0.1 mm, laterality from the file name),
    with the shipped U-Net's raw output, working-grid image and allowed region."""
    out = []
    for png in sorted(folder.glob("*.png")):
        arr = np.asarray(PILImage.open(png)).astype(np.float32)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        lat = "L" if "_L_" in png.name else "R"
        m = mammogram_from_array(arr, lat, "CC", (spacing_mm, spacing_mm))
        m.faces_left, m.orientation = orient(lat == "R", m.breast_mask)
        geo, image, _ = network_grid(m, model.config)
        with torch.no_grad():
            x = torch.from_numpy(image)[None, None]
            raw = (x - model.network.reconstruct(x))[0, 0].numpy()
        allowed = geo.forward(allowed_region(m).astype(np.float32)) > 0.5
        out.append({"name": png.stem, "out": raw, "image": image, "allowed": allowed,
                    "regions": candidate_regions(raw, allowed, LEVEL)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dump", type=Path, required=True)
    p.add_argument("--dunet-folds", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--variants", default="features,features+hybrid",
                   help="comma-separated: features | patch+features, each optionally +hybrid")
    p.add_argument("--unet-weight", type=float, nargs="+", default=[0.0],
                   help="RescoreConfig.unet_weight values to score (one row each; the networks are shared)")
    p.add_argument("--feature-sets", default="all",
                   help="semicolon-separated feature subsets (comma-separated names of FEATURES) or 'all'")
    p.add_argument("--members", type=int, default=3, help="networks per rescorer (RescoreConfig.members)")
    p.add_argument("--outputs", default="out,out_tta", help="U-Net outputs the stage is tried on")
    p.add_argument("--hybrid", type=Path, default=None,
                   help="mass_rescore_dump.py --hybrid-copies arrays: for a variant named ...+hybrid, their candidates "
                        "on inserted masses join the positives of every rescorer whose held-out fold is not the "
                        "background's")
    p.add_argument("--real", type=Path, default=Path("/work/shared/data/real"),
                   help="shared real CC images: marks per image at the fp0.25 threshold chosen on all 5 folds, run by "
                        "--ship (the all-folds U-Net) and, for the rescore rows, a stage trained on all 322 images")
    p.add_argument("--real-spacing", type=float, nargs="+", default=[0.1, 0.07],
                   help="pixel size assumed for the real PNGs (bench_mias_node: 0.1 mm; the node's own DICOMs of them: 0.07)")
    p.add_argument("--ship", type=Path, default=Path("models/dunet"), help="the shipped (all-folds) U-Net bundle")
    p.add_argument("--out", type=Path, default=RESULTS / "mass_rescore.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    data = load(args.dump)
    images = images_of(data)
    women = [str(d["woman"]) for d in data]
    folds = np.array([im.fold for im in images])
    print(f"{len(data)} images, {sum(len(im.truth['mass']) for im in images)} masses", flush=True)
    cals = {k: json.loads((args.dunet_folds / f"fold{k}" / "manifest.json").read_text())["calibration"] for k in range(5)}
    rows: dict[str, dict] = {}

    # Today: plain pass, each fold's manifest calibration.
    regs = {"out": regions_of(data, "out")}
    rows["unet"] = evaluate(images, marks_from(
        regs["out"], [platt(cals[im.fold], np.array([r.peak for r in rg])) for im, rg in zip(images, regs["out"])], 1e-6))
    # TTA: mean of plain and up-down-flipped pass; Platt refitted per held-out fold on the other folds.
    for d in data:
        d["out_tta"] = 0.5 * (d["out"] + d["out_ud"])
    regs["out_tta"] = regions_of(data, "out_tta")
    hits = hits_of(data, regs["out_tta"])
    peaks = [np.array([r.peak for r in rg]) for rg in regs["out_tta"]]
    tta_cals = {}
    for k in range(5):
        tr = [i for i in range(len(data)) if folds[i] != k]
        tta_cals[k] = fit_platt(np.concatenate([peaks[i] for i in tr]), np.concatenate([hits[i] for i in tr]))
    rows["unet_tta"] = evaluate(images, marks_from(regs["out_tta"], [platt(tta_cals[im.fold], pk)
                                                                     for im, pk in zip(images, peaks)], 1e-6))
    print(f"baseline + tta {time.time() - t0:.0f}s", flush=True)
    ship = DUNetModel.from_bundle(load_bundle(args.ship))
    ship_cal = ship.calibration or (json.loads((args.ship / "manifest.json").read_text())["rescore"]["unet_calibration"])
    # The real views at each assumed pixel size, one list (spacing recorded per view).
    real = [dict(v, spacing=sp) for sp in args.real_spacing for v in real_views(args.real, ship, sp)] \
        if args.real and args.real.is_dir() else []
    all_idx = list(range(len(data)))

    def real_marks(row_marks, real_scores) -> dict:
        """Marks per shared real image at the fp0.25 threshold chosen on all five folds, per assumed pixel size."""
        thr = node.choose_thresholds(node._tables(images, row_marks), all_idx, 0.25)[("dunet", "mass")]
        out = {"threshold_fp0.25": None if thr == node.OFF else round(float(thr), 4)}
        for sp in args.real_spacing:
            per = {v["name"]: int((np.asarray(sc) >= thr).sum()) for v, sc in zip(real, real_scores) if v["spacing"] == sp}
            out[f"at_{sp:g}_mm"] = {"marks": per, "marks_per_image": round(sum(per.values()) / max(len(per), 1), 3)}
        return out

    real_unet = [platt(ship_cal, np.array([r.peak for r in v["regions"]])) for v in real]
    for name, key in (("unet", "out"),):
        m_ = marks_from(regs[key], [platt(cals[im.fold], np.array([r.peak for r in rg]))
                                    for im, rg in zip(images, regs[key])], 1e-6)
        rows[name]["real_fp0.25"] = real_marks(m_, real_unet) if real else None
    for name in ("unet", "unet_tta"):
        print(name, rows[name]["sensitivity"], flush=True)

    # Rescore stage on each output.
    hybrid = load(args.hybrid) if args.hybrid else []
    for d in hybrid:
        d["out_tta"] = 0.5 * (d["out"] + d["out_ud"])
    for key in args.outputs.split(","):
        for variant, fset in [(v, f) for v in args.variants.split(",") for f in args.feature_sets.split(";")]:
            feats_ = FEATURES if fset == "all" else tuple(fset.split(","))
            cfg = RescoreConfig(use_patch="patch" in variant, use_features=True, members=args.members, features=feats_)
            ex = [image_examples(d[key], d["image"].astype(np.float32), d["allowed"], d["masses"], d["any"], cfg)
                  for d in data]
            hx = []
            for d in (hybrid if "hybrid" in variant else []):  # inserted masses: positives only (the background's own regions are in ex)
                e = image_examples(d[key], d["image"].astype(np.float32), d["allowed"], d["masses"], d["any"], cfg)
                pos = e.labels == 1
                hx.append(type(e)(e.windows[pos], e.features[pos], e.labels[pos], e.shifted[:, pos]))
            hfold = np.array([int(d["fold"]) for d in hybrid])[:len(hx)]
            scores: list = [None] * len(data)
            unet_p = [platt(cals[im.fold], np.array([r.peak for r in rg])) for im, rg in zip(images, regs[key])] \
                if key == "out" else [platt(tta_cals[im.fold], np.array([r.peak for r in rg]))
                                      for im, rg in zip(images, regs[key])]
            for k in range(5):
                train = concat_examples([ex[i] for i in range(len(data)) if folds[i] != k]
                                        + [hx[i] for i in range(len(hx)) if hfold[i] != k])
                net = train_rescorer(train, cfg, epochs=args.epochs, seed=k)
                for i in np.flatnonzero(folds == k):
                    d = data[i]
                    scores[i] = rescore_regions(net, regs[key][i], d[key], d["image"].astype(np.float32), d["allowed"])
                print(f"{key} {variant} fold {k}: {len(train.labels)} examples ({int(train.labels.sum())} masses) "
                      f"{time.time() - t0:.0f}s", flush=True)
            real_stage = []
            if real and key == "out":
                net_all = train_rescorer(concat_examples(ex + hx), cfg, epochs=args.epochs, seed=0)
                real_stage = [rescore_regions(net_all, v["regions"], v["out"], v["image"], v["allowed"]) for v in real]
            for w in args.unet_weight:
                name = f"rescore_{variant}" + ("" if fset == "all" else f"[{fset}]") + f"_x{args.members}" + ("_tta" if key == "out_tta" else "") + \
                    (f"_unet{w:g}" if w else "")
                m_ = marks_from(regs[key], [combine(s_, u_, w) for s_, u_ in zip(scores, unet_p)], 1e-6)
                rows[name] = evaluate(images, m_)
                rows[name]["real_fp0.25"] = real_marks(m_, [combine(s_, u_, w) for s_, u_ in
                                                            zip(real_stage, real_unet)]) if real_stage else None
                print(name, "real", rows[name]["real_fp0.25"], flush=True)
                print(name, rows[name]["sensitivity"], flush=True)

    base = rows["unet"]["_sent"]
    for name, row in rows.items():
        row["paired_vs_unet"] = {pt: paired_bootstrap(images, women, base[pt], row["_sent"][pt])
                                 for pt in ("fp0.5", "fp1")} if name != "unet" else None
    result = {
        "benchmark": "bench_mass_rescore",
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "budgets": list(BUDGETS),
        "n_images": len(data), "n_masses": int(sum(len(im.truth["mass"]) for im in images)),
        "leak": "the rescorer of held-out fold k trains on the candidates of the other folds' images, each produced by "
                "that image's own out-of-fold U-Net, which was trained with fold k's images among others; no fold-k "
                "label reaches the rescorer directly (same scheme as the per-fold Platt calibration)",
        "hybrid": str(args.hybrid) if args.hybrid else None, "n_hybrid_images": len(hybrid),
        "epochs": args.epochs, "members": args.members, "real_spacing_mm": args.real_spacing, "seconds": round(time.time() - t0, 1),
        "rows": {n: {k: v for k, v in r.items() if k != "_sent"} for n, r in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    sps = " / ".join(f"{sp:g}" for sp in args.real_spacing)
    lines = ["| row | masses @ " + " / ".join(map(str, BUDGETS)) + " FP/img | FP/normal @0.25 | diff @0.5 [CI] | "
             f"diff @1 [CI] | shared real images: marks/image @0.25 (at {sps} mm) |", "|---|---|---|---|---|---|"]
    for n, r in result["rows"].items():
        pb = r["paired_vs_unet"]
        dd = [f"{pb[pt]['difference']:+.2f} [{pb[pt]['ci95'][0]:+.2f}, {pb[pt]['ci95'][1]:+.2f}]" if pb else "-"
              for pt in ("fp0.5", "fp1")]
        lines.append(f"| {n} | {' / '.join(f'{s:.2f}' for s in r['sensitivity'])} | "
                     f"{r['false_marks_per_normal_image'][1]:.2f} | {dd[0]} | {dd[1]} | "
                     + (" / ".join(str(r['real_fp0.25'][f'at_{sp:g}_mm']['marks_per_image']) for sp in args.real_spacing)
                        if r.get('real_fp0.25') else '-') + " |")
    table = "\n".join(lines)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
