"""Baseline: today's phantom-only bundles on real mammograms (mini-MIAS), lesion level.

The shipped bundles (models/glam, models/dunet, models/microcalc) were trained on synthetic
phantoms only and never saw MIAS, so all 322 MIAS images are held-out data. They are scored
on the fixed patient-level, stratified 5-fold split of :func:`dicom_ai.data.datasets.mias_folds`
(each fold reported as a held-out fold, plus all folds pooled) so that part 2 of issue 14
(training on MIAS folds) can be compared fold by fold against the same numbers.

Figures (conventions in :mod:`dicom_ai.data.metrics` and
:func:`dicom_ai.data.evaluate.evaluate_lesions`): FROC sensitivity at 0.125 ... 4 false marks
per image for masses (CIRC/SPIC/MISC), calcification clusters (CALC) and all lesions, per
model and for the union of marks; sensitivity and false marks per image at each bundle's
shipped threshold (what the node sends); image/breast/woman ROC AUC with bootstrap 95 % CI
(abnormal vs normal, malignant vs the rest); Dice of the mass maps on the drawn mass masks;
operating-point marks outside the breast mask and false marks per normal image.

The data is not in the repository (licence: research use only): fetch it as described in
``dicom_ai.data.datasets`` (MIAS layout) and point ``--root`` at it. Model marks are cached
under ``--cache`` (outside the repository), so a rerun only scores.

    nice -n 10 python benchmarks/bench_mias_baseline.py --root /work/data/mias --cache /work/data/mias_cache

Writes benchmarks/results/mias_baseline.json and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from dicom_ai.data.datasets import MIAS_FOLDS, MIAS_SPACING_MM, MIASDataset
from dicom_ai.data.evaluate import UNION, evaluate_lesions, predict_marks
from dicom_ai.data.metrics import LESION_FROC_RATES
from dicom_ai.networks import Pipeline

RESULTS = Path(__file__).resolve().parent / "results" / "mias_baseline.json"
BUNDLES = ("glam", "dunet", "microcalc")


def _row(name: str, s: dict) -> str:
    def f(v):
        return "  n/a" if v is None else f"{v:5.2f}"

    froc = s["froc"][name]
    mass = froc.get("mass", {}).get("sensitivity_at", {})
    calc = froc.get("calcification_cluster", {}).get("sensitivity_at", {})
    auc = s["auc"][name]["abnormal (image)"]
    mal = s["auc"][name]["malignant (image)"]
    rob = s["robustness"][name]
    return (f"{name:10s} " + " ".join(f(mass.get(str(r))) for r in LESION_FROC_RATES) + " | "
            + " ".join(f(calc.get(str(r))) for r in (0.5, 1.0, 4.0)) + " | "
            + f"{f(auc['value'])} [{f(auc['ci95'][0])},{f(auc['ci95'][1])}] {f(mal['value'])} | "
            + f"{f(s['mass_dice'].get(name, {}).get('mean'))} | {f(rob['false_marks_per_normal_image'])} | "
            + f"{rob['marks_outside_breast']:5d}/{rob['marks_sent']}")


def _table(title: str, s: dict) -> None:
    print(f"\n{title}: {s['n_images']} images ({s['n_normal_images']} normal), lesions {s['n_lesions']}")
    print("model      mass FROC @ " + " ".join(f"{r:5g}" for r in LESION_FROC_RATES)
          + " | calc @ 0.5/1/4     | AUC abn [95% CI]  mal  | Dice  | FP/nrm | outside/sent")
    for name in s["froc"]:
        print(_row(name, s))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("DICOM_AI_MIAS", "/work/data/mias")),
                   help="mini-MIAS folder (mdbNNN.pgm, Info.txt, masks/); default $DICOM_AI_MIAS or /work/data/mias")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("DICOM_AI_MIAS_CACHE", "/work/data/mias_cache")),
                   help="mark cache outside the repository (default $DICOM_AI_MIAS_CACHE or /work/data/mias_cache)")
    p.add_argument("--bundle", action="append", help=f"bundles to run (default {', '.join(BUNDLES)})")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundles = args.bundle or list(BUNDLES)
    data = MIASDataset(args.root)
    pipeline = Pipeline.from_bundles(bundles, device="cpu")
    t0 = time.time()
    # One pass fills the cache (models run once per image), then each fold is scored from it.
    for _ in predict_marks((data[i] for i in range(len(data))), pipeline, cache=args.cache):
        pass
    inference_s = time.time() - t0
    per_fold = {}
    for k in range(MIAS_FOLDS):
        fold = MIASDataset(args.root, folds=[k])
        ev = evaluate_lesions(predict_marks(fold, pipeline, cache=args.cache), bootstrap=args.bootstrap,
                              total=len(fold), progress=False)
        per_fold[str(k)] = {"references": [r.extra["reference"] for r in fold.records], **ev.summary()}
    pooled = evaluate_lesions(predict_marks(data, pipeline, cache=args.cache), bootstrap=args.bootstrap,
                              total=len(data), progress=False).summary()
    result = {
        "benchmark": "phantom-only shipped bundles on mini-MIAS (issue 14 part 1 baseline)",
        "data": {
            "name": "mini-MIAS (Mammographic Image Analysis Society MiniMammographic Database)",
            "source": "github:theidentity/MammogramVisualization data/pgm (images, Info.txt, Licence.txt); "
                      "drawn mass masks github:kallebefelipe/mammography-segmentation data/imagens",
            "images": len(data), "women": len({r.study for r in data.records}),
            "pixel_spacing_mm": list(MIAS_SPACING_MM), "view": "MLO, digitised film, 8-bit",
            "licence": data.licence,
            "held_out": "all images: the bundles were trained on phantoms only and never saw MIAS",
            "split": "dicom_ai.data.datasets.mias_folds: 5 folds, patient level (a woman's two images in one "
                     "fold), stratified by woman (malignant mass, benign mass, malignant calc, benign calc, "
                     "other abnormal, normal), dealt round-robin by woman number; no random numbers",
            "subset": None,
        },
        "models": [{"name": i.name, "version": i.version} for i in pipeline.identities],
        "protocol": {
            "marks": "connected regions (8-connected) of each probability map; FROC sweeps the region peak over "
                     "regions at p >= 0.1; the operating point uses each bundle's own threshold (0.5), as the node",
            "hit": "mark centroid (rounded) inside the lesion: the drawn mask for 58 masses, else the Info.txt circle",
            "per_type": "mass = malignant_lesion + benign_lesion maps vs CIRC/SPIC/MISC; calcification_cluster = "
                        "calcification_cluster map vs CALC; all = every map vs every located lesion (incl. ARCH, "
                        "ASYM). In per-type curves marks on lesions of other types are ignored",
            "union": "every model's marks together (what the node sends in SEG/SR)",
            "auc": "image score = highest map probability (abnormal) / model malignant score, else malignant map "
                   "peak (malignant); breast = image on MIAS (one MLO per breast); woman = mean over her 2 images",
            "dice": "per image, mass maps at threshold vs drawn masks (whole image)",
            "outside_breast": "operating-point marks whose centroid lies outside dicom_ai.imaging.breast_mask "
                              "(the node's threshold mask; not an independent reference)",
            "froc_rates": list(LESION_FROC_RATES),
            "bootstrap": args.bootstrap,
        },
        "pooled": pooled,
        "per_fold": per_fold,
        "timing": {"inference_s_this_run": round(inference_s, 1), "cpu": platform.processor() or platform.machine(),
                   "torch_threads": args.threads, "note": "0 s when every mark came from the cache"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    _table("pooled (all 5 folds)", pooled)
    for k, s in per_fold.items():
        _table(f"fold {k}", s)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
