"""GLAM's image score as a re-scorer of the U-Net's mass candidates (mini-MIAS 5-fold CV, node protocol).

GLAM fine-tuned on hybrid images has an image-level signal on held-out mini-MIAS (abnormal vs
normal 0.65, results/glam_hybrid_curriculum_folds01234.json) but its maps do not point at the
mass (its marks cost the node mass sensitivity, results/mias_node_glam_hybrid.md). This bench
asks whether the image score helps in another way: each U-Net candidate region's score ``s``
(calibrated probability) is replaced by ``s * g ** a``, ``g`` = GLAM's global image score of
the same image (max of its benign / malignant channels), so candidates on images GLAM calls
normal drop below the operating thresholds.

Protocol: everything of :mod:`bench_mias_node` (same cached marks: U-Net fold bundles
``--dunet-folds``, GLAM fold bundles ``--glam-folds``, each image scored by the bundles that did
not see its fold; operating thresholds per budget chosen on the other four folds; sensitivity
and false marks pooled over the held-out folds). Configs:

* ``a = 0``: the U-Net alone (the shipped configuration; microcalc 0.1.0 is off at every point
  because it finds no cluster, so it is left out here);
* ``a = 1``: the pre-declared combination (product of the two probabilities);
* ``a = 0.5`` and ``a = 2``: sensitivity of the result to the exponent (looked at, not chosen);
* ``a chosen on validation``: for each held-out fold and budget, ``a`` in {0, 0.5, 1, 2} with the
  highest mass sensitivity on the other four folds (thresholds chosen there too), ties to the
  smaller ``a``; the honest version of picking an exponent.

Image-level AUC (abnormal vs normal, mass vs normal) of: the U-Net's highest candidate score,
GLAM's ``g``, and their product, with 95 % bootstrap intervals (images) and the paired
bootstrap interval of the difference to the U-Net alone.

    PYTHONPATH=. nice -n 10 python benchmarks/bench_glam_rescore.py \\
        --dunet-folds /work/data/dunet-0.8-folds --glam-folds /work/data/glam-hybrid-folds/D

Writes benchmarks/results/glam_hybrid_rescore.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_mias_node as node  # noqa: E402
from dicom_ai.data.datasets import MIAS_FOLDS, MIASDataset  # noqa: E402
from dicom_ai.data.metrics import LESION_FROC_RATES, bootstrap_ci, roc_auc  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
EXPONENTS = (0.0, 0.5, 1.0, 2.0)


def rescored(unet, glam, a: float):
    """U-Net ModelMarks per image with every mass candidate's score times GLAM's image score ** a."""
    out = []
    for u, g in zip(unet, glam):
        w = max(g.scores.values()) ** a
        out.append(replace(u, candidates={k: np.column_stack([v[:, :1] * w, v[:, 1:]]) if len(v) else v
                                          for k, v in u.candidates.items()},
                           thresholds={k: t * w for k, t in u.thresholds.items()}))
    return out


def chosen_on_validation(images, per_a: dict[float, list]) -> dict:
    """Held-out FROC when ``a`` is chosen per held-out fold and budget on the other folds."""
    tables = {a: node._tables(images, [{"dunet": m} for m in marks]) for a, marks in per_a.items()}
    folds = [[i for i, im in enumerate(images) if im.fold == k] for k in range(MIAS_FOLDS)]
    out = {}
    for budget in sorted(set(LESION_FROC_RATES) | set(node.POINTS.values())):
        sent, picks = {}, []
        for k, held in enumerate(folds):
            val = [i for f, ids in enumerate(folds) if f != k for i in ids]
            best = None
            for a in EXPONENTS:
                thr = node.choose_thresholds(tables[a], val, budget)
                sens = node.score_sent(images, {i: node.sent_marks({"dunet": per_a[a][i]}, thr) for i in val},
                                       val)["sensitivity"]["mass"]
                if best is None or sens > best[0]:
                    best = (sens, a, thr)
            picks.append(best[1])
            for i in held:
                sent[i] = node.sent_marks({"dunet": per_a[best[1]][i]}, best[2])
        out[str(budget)] = dict(node.score_sent(images, sent, range(len(images))), exponent_per_fold=picks)
    return out


def _auc(score, y) -> dict:
    iv = bootstrap_ci(roc_auc, score, y, n=2000, seed=0)
    return {"auc": round(iv.value, 4), "ci95": [round(iv.low, 4), round(iv.high, 4)]}


def _paired_delta(a, b, y, n: int = 2000, seed: int = 0) -> list[float]:
    """95 % paired bootstrap interval of AUC(b) - AUC(a) (images resampled together)."""
    rng = np.random.default_rng(seed)
    d = []
    while len(d) < n:
        pick = rng.integers(0, len(y), len(y))
        if y[pick].all() or not y[pick].any():
            continue
        d.append(roc_auc(b[pick], y[pick]) - roc_auc(a[pick], y[pick]))
    return [round(float(np.percentile(d, 2.5)), 4), round(float(np.percentile(d, 97.5)), 4)]


def image_aucs(images, unet, glam) -> dict:
    s = np.array([max([float(v[:, 0].max()) for v in u.candidates.values() if len(v)], default=0.0) for u in unet])
    g = np.array([max(m.scores.values()) for m in glam])
    abnormal = np.array([not im.normal for im in images])
    mass = np.array([bool(im.truth["mass"]) for im in images])
    out = {}
    for task, y, keep in (("abnormal_vs_normal", abnormal, np.ones(len(images), bool)),
                          ("mass_vs_normal", mass, mass | ~abnormal)):
        yy = y[keep]
        scores = {"unet_max_candidate": s[keep], "glam_image_score": g[keep], "product": (s * g)[keep]}
        out[task] = {name: _auc(v, yy) for name, v in scores.items()}
        out[task]["positives"], out[task]["negatives"] = int(yy.sum()), int((~yy).sum())
        for name in ("glam_image_score", "product"):
            out[task][name]["delta_vs_unet_ci95"] = _paired_delta(scores["unet_max_candidate"], scores[name], yy)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/work/data/mias"))
    p.add_argument("--cache", type=Path, default=Path("/work/data/mias_cache"))
    p.add_argument("--dunet-folds", type=Path, required=True)
    p.add_argument("--glam-folds", type=Path, required=True)
    p.add_argument("--out", type=Path, default=RESULTS / "glam_hybrid_rescore.json")
    args = p.parse_args(argv)
    t0 = time.time()
    data = MIASDataset(args.root)
    samples = [data[i] for i in range(len(data))]
    images = [node.Image_(s, data.fold_of[s.source.rsplit("/", 1)[-1].split(".")[0]]) for s in samples]
    marks = {}
    for name, folder in (("dunet", args.dunet_folds), ("glam", args.glam_folds)):
        src = {"kind": node.FOLDS, "path": folder, "ship": None, "reason": ""}
        marks[name] = node.marks_of(args, samples, images, name, src)
    per_a = {a: rescored(marks["dunet"], marks["glam"], a) for a in EXPONENTS}
    configs = {}
    for a, mk in per_a.items():
        cv = node.cross_validate(images, [{"dunet": m} for m in mk])
        cv.pop("sent", None)
        configs[f"a={a:g}"] = {"froc": cv["froc"]}
    configs["a chosen on validation"] = {"froc": chosen_on_validation(images, per_a)}
    result = {"benchmark": "GLAM image score x U-Net candidate score, node protocol, mini-MIAS 5-fold CV",
              "protocol": __doc__.split("Protocol:")[1].split("    PYTHONPATH")[0].strip(),
              "data": {"images": len(images), "normal": int(sum(im.normal for im in images)),
                       "masses": int(sum(len(im.truth["mass"]) for im in images)), "licence": data.licence},
              "bundles": {"dunet": str(args.dunet_folds), "glam": str(args.glam_folds)},
              "configs": configs, "image_auc": image_aucs(images, marks["dunet"], marks["glam"]),
              "seconds": round(time.time() - t0, 1)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = _table(result)
    args.out.with_suffix(".md").write_text(table)
    print(table, end="")
    return 0


def _table(result: dict) -> str:
    budgets = ("0.125", "0.25", "0.5", "1.0", "2.0", "4.0")
    lines = ["# GLAM image score as a re-scorer of U-Net mass candidates (mini-MIAS 5-fold CV, node protocol)", "",
             "| U-Net score x GLAM image score ** a | mass sens @ 0.125 / 0.25 / 0.5 / 1 / 2 / 4 FP/img | "
             "FP per normal image @ 0.25 / 0.5 |", "|---|---|---|"]
    for name, c in result["configs"].items():
        fr = c["froc"]
        sens = " / ".join(f"{fr[b]['sensitivity']['mass']:.2f}" for b in budgets)
        lines.append(f"| {name} | {sens} | "
                     f"{fr['0.25']['false_marks_per_normal_image']:.2f} / {fr['0.5']['false_marks_per_normal_image']:.2f} |")
    chosen = result["configs"]["a chosen on validation"]["froc"]
    lines += ["", "Exponent chosen per held-out fold (validation): "
              + "; ".join(f"{b} FP/img {chosen[b]['exponent_per_fold']}" for b in budgets), "",
              "| image AUC [95 % CI] | U-Net max candidate | GLAM image score (delta) | product (delta) |",
              "|---|---|---|---|"]
    for task, v in result["image_auc"].items():
        def cell(x):
            d = f" ({x['delta_vs_unet_ci95'][0]:+.2f}, {x['delta_vs_unet_ci95'][1]:+.2f})" if "delta_vs_unet_ci95" in x else ""
            return f"{x['auc']:.3f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}]{d}"
        lines.append(f"| {task} ({v['positives']} / {v['negatives']}) | {cell(v['unet_max_candidate'])} | "
                     f"{cell(v['glam_image_score'])} | {cell(v['product'])} |")
    lines += ["", "Delta: 95 % paired bootstrap interval of the AUC difference to the U-Net alone."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
