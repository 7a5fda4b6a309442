"""Cluster definition and cluster-level false-positive reduction for microcalc, measured.

Works on the working-grid calcification maps that benchmarks/microcalc_dump.py wrote for one
bundle's networks (default: microcalc 0.2.0), so every variant of the cluster stage is scored
on the same network outputs in one run. Every candidate cluster is scored exactly as the node
scores it: on the node's working image and grid (benchmarks/microcalc_exact.py; checked
against the node's path in results/microcalc_exact_check.json). Before microcalc 0.4.0 the
features were computed on the 2 mm image windows saved with the dumps, which on film made
the contrast features and the scores too low (``--windows`` still reads such dumps):

* ``baseline``: the 0.2.0 cluster stage (components >= 3 px at 0.5, 5 mm single linkage,
  >= 3, score = mean of the top three probabilities);
* ``rule``: BI-RADS-sized calcifications (equivalent diameter ``--diameter`` mm), ``--min-count``;
* ``model``: the rule's candidates scored by the logistic cluster model
  (dicom_ai.training.microcalc_clusters.fit_logistic).

Data split (patient level; nothing of the test side is used for any fit or choice):

* **fit / validation side (A)**: the backgrounds the 0.2.0 networks were trained on: CBIS-DDSM
  woman of the training folds (4 views, 50 um) and the shared FFDM exam 2 (2_L, 2_R, 70 um): those images as they
  are, with clusters inserted (seed 0) at native resolution and degraded to 0.2 mm / 8 bit, and
  crops around many more inserted clusters (seeds 100, 200; positives only, no false rates).
  Hyper-parameters (threshold, size range, count, L2) and the sharp-class calibration are
  chosen by leave-one-background-out inside A (each of the 6 background images, with every
  hybrid made from it, scored by a model fitted on the other 5; leave-one-woman-out, 2 folds
  of one woman each, leaves models fitted on a single scanner type).
* **held-out sharp (B)**: the held-out-fold CBIS-DDSM woman (4 views), FFDM exam 1 (1_L; 1_R has a benign
  finding without outline, reported apart), clusters inserted with seed 777 (the bench's), and
  crops around more inserted clusters (seed 900; sensitivity only).
* **mini-MIAS** (never fitted on; the dumped images: every image with a CALC row and a
  fixed random sample of the others): cluster FROC and image AUC, real clusters. Its false
  rate sets the named points' thresholds (``fpX``: half of the node's budget X, 5-fold CV
  figures on the patient folds) and the film side of the sharp calibration.
* ``--write-bundle``: the source bundle's weights with the chosen stage (microcalc 0.3.0).
* ``--write-fold-bundles DIR``: five variants ``DIR/fold0..fold4`` of that bundle for
  bench_mias_node.py ``--microcalc-folds``: the same networks and the same cluster model (fitted
  on side A, no MIAS image), but every part that depends on mini-MIAS (the named points'
  cluster thresholds and the film side of the sharp calibration) chosen with mini-MIAS fold k
  (the patient folds of ``MIASDataset.fold_of``, the U-Net fold bundles' folds) held out.

Writes benchmarks/results/microcalc_clusters.json and prints a short table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from microcalc_candidates import candidates, load_all  # noqa: E402

from dicom_ai.data import metrics as M  # noqa: E402
from dicom_ai.data.datasets import MIASDataset  # noqa: E402
from dicom_ai.networks.microcalc_clusters import FEATURES, ClusterConfig, calibrated, cluster_score  # noqa: E402
from dicom_ai.training.microcalc_clusters import fit_logistic, spacing_calibration, write_cluster_bundle  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
MIN_THRESHOLD = 0.5


def side(d) -> str:
    """'A' (fit/validation), 'B' (held-out sharp), 'mias', with a sub-group."""
    g = d.group
    if g == "mias":
        return "mias"
    if g.startswith("real-ffdm"):
        return "A" if d.key.split("/")[-1].startswith("2_") else "B"
    if g.startswith("cbis-fold"):
        return "B" if g.endswith("fold0") else "A"
    if g.startswith(("hyb-train", "pos-train")):
        return "A"
    if g.startswith(("hyb-test", "pos-test")):
        return "B"
    raise ValueError(g)


def background(d) -> str:
    """The real background image of a dump (HybridDataset: background = index % backgrounds;
    CBIS-DDSM cases 0-3 = the held-out-fold woman, 4-7 = the training-fold woman; real-png-normals 0 = 1_L, 1 = 2_L, 2 = 2_R)."""
    name = d.key.split("/")[-1]
    if d.key.startswith("real/"):
        return "ffdm-" + {"1_L_CC": "0", "1_R_CC": "1R", "2_L_CC": "1", "2_R_CC": "2"}[name.replace(".npz", "")]
    if d.key.startswith("cbis/"):
        return f"cbis-{int(name)}"
    if d.group == "mias":
        return name
    short, i = name.split("-")[:2]
    return f"{short}-{int(i) % (8 if short == 'cbis' else 3)}"


def sharp(d) -> bool:
    return not d.key.endswith("0.2mm") and d.group != "mias"


def froc(items, thresholds=None) -> dict:
    """items: list of (scores, hits, n_lesions). Lesion sensitivity at false clusters per image."""
    n_img = sum(1 for it in items if it[3])  # crops around inserted clusters hold no false-rate information
    n_les = sum(it[2] for it in items)
    allsc = np.concatenate([s for s, _, _, _ in items]) if items else np.zeros(0)
    grid = np.unique(np.concatenate([allsc, [np.inf]]))[::-1]
    fp = []
    sens = []
    for t in grid:
        f = sum(int(((s >= t) & (h == -1)).sum()) for s, h, _, _ in items)
        tp = sum(len(set(h[(s >= t) & (h >= 0)].tolist())) for s, h, _, _ in items)
        fp.append(f / max(n_img, 1))
        sens.append(tp / max(n_les, 1))
    fp, sens = np.array(fp), np.array(sens)
    out = {"n_images": n_img, "n_lesions": n_les,
           "sensitivity_at": {str(r): round(float(sens[fp <= r + 1e-12].max(initial=0.0)), 4) for r in RATES}}
    if thresholds is not None:
        out["at"] = {}
        for name, t in thresholds.items():
            f = sum(int(((s >= t) & (h == -1)).sum()) for s, h, _, _ in items) / max(n_img, 1)
            tp = sum(len(set(h[(s >= t) & (h >= 0)].tolist())) for s, h, _, _ in items)
            out["at"][name] = {"threshold": round(float(t), 4), "false_clusters_per_image": round(f, 3),
                               "sensitivity": round(tp / max(n_les, 1), 4) if n_les else None}
    return out


def auc(pairs, positive) -> dict | None:
    """Image AUC with bootstrap 95 % CI; pairs (dump, (scores, hits, n)); image score = its best
    candidate's score (0 without one); ``positive(dump)`` True/False, None = left out."""
    y, sc = [], []
    for d, (s, _, _, _) in pairs:
        v = positive(d)
        if v is not None:
            y.append(bool(v))
            sc.append(float(s.max()) if len(s) else 0.0)
    y = np.array(y)
    if len(y) < 3 or y.all() or not y.any():
        return None
    iv = M.bootstrap_ci(M.roc_auc, np.array(sc), y, n=2000)
    return {"value": round(iv.value, 4), "ci95": [round(iv.low, 4), round(iv.high, 4)],
            "positives": int(y.sum()), "negatives": int((~y).sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dump", type=Path, default=Path("/work/data/microcalc-real/dump-exact"),
                   help="exact dumps (benchmarks/microcalc_exact.py): the node's working image and grid")
    p.add_argument("--windows", action="store_true",
                   help="accept dumps without the exact working image (scores from the 2 mm windows; not the node's)")
    p.add_argument("--out", type=Path, default=RESULTS / "microcalc_clusters.json")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--diameters", type=float, nargs="+", default=[0.0, 0.1, 0.15])
    p.add_argument("--counts", type=int, nargs="+", default=[3, 4, 5])
    p.add_argument("--l2", type=float, nargs="+", default=[0.3, 3.0, 30.0])
    p.add_argument("--max-diameter", type=float, default=1.0)
    p.add_argument("--mias", default="/work/data/mias", help="mini-MIAS folder (for its fixed patient folds)")
    p.add_argument("--source-bundle", default="/work/data/microcalc-real/bundle",
                   help="the bundle whose networks were dumped (its weights go into --write-bundle)")
    p.add_argument("--write-bundle", type=Path, default=None,
                   help="write the source bundle with the chosen cluster stage and operating points here")
    p.add_argument("--write-fold-bundles", type=Path, default=None,
                   help="write fold0..fold4 variants here: MIAS-dependent choices without that mini-MIAS fold")
    p.add_argument("--version", default="0.4.0")
    p.add_argument("--choose-on-mias", action="store_true",
                   help="choose the cluster definition and model (one row of the search) on mini-MIAS: the row "
                        "with the highest mean sensitivity at 0.125 / 0.25 / 0.5 false clusters per image (the "
                        "cluster map's half of the node's fp0.25 / fp0.5 / fp1 budgets) on the mini-MIAS images "
                        "used for the choice, ties by the fit-side objective; each fold bundle chooses without its "
                        "held-out fold (nested), the --write-bundle one on all folds. Default: the fit-side "
                        "(leave-one-background-out) choice, no mini-MIAS image")
    p.add_argument("--mias-choice-rows", choices=["model", "all"], default="model",
                   help="with --choose-on-mias: the rows it may pick: 'model' (default) only rows with the cluster "
                        "model; rows without it (score = mean of the top three calcification probabilities) have no "
                        "operating range on sharp images (fit-side objective 0.67-0.68 vs 1.07-1.19 with the model; "
                        "picked on mini-MIAS they sent 1.2 false clusters per held-out sharp image at fp0.5)")
    args = p.parse_args(argv)
    t0 = time.time()
    dumps = load_all(args.dump)
    windowed = [d.key for d in dumps if d.img_idx is None and d.shape != (0, 0)]
    if windowed and not args.windows:
        raise SystemExit(f"{len(windowed)} dumps (e.g. {windowed[0]}) hold only 2 mm image windows, not the node's "
                         "working image: run benchmarks/microcalc_exact.py and pass its --out as --dump (or --windows)")
    print(f"{len(dumps)} dumped images: " + ", ".join(f"{k} {sum(side(d) == k for d in dumps)}" for k in ("A", "B", "mias")))
    cache: dict = {}

    def cand(cfg: ClusterConfig):
        key = (cfg.threshold, cfg.min_diameter_mm, cfg.max_diameter_mm, cfg.min_count, cfg.link_mm)
        if key not in cache:
            cache[key] = [candidates(d, ClusterConfig(threshold=cfg.threshold, min_diameter_mm=cfg.min_diameter_mm,
                                                      max_diameter_mm=cfg.max_diameter_mm, min_count=cfg.min_count,
                                                      link_mm=cfg.link_mm)) for d in dumps]
        return cache[key]

    def scored(cfg: ClusterConfig, idx):
        rows = cand(cfg)
        out = []
        for i in idx:
            f, s, h = rows[i]
            if cfg.weights and len(f):
                s = np.array([cluster_score(x, cfg) for x in f])
            full = not dumps[i].group.startswith("pos-")
            out.append((s, h if full else np.where(h < 0, -2, h), len(dumps[i].lesions), full))
        return out

    def fit(cfg: ClusterConfig, idx, l2: float) -> ClusterConfig | None:
        rows = cand(cfg)
        x = [rows[i][0] for i in idx if len(rows[i][0])]
        y = [rows[i][2] >= 0 for i in idx if len(rows[i][0])]
        if not x:
            return None
        x, y = np.vstack(x), np.concatenate(y)
        if y.min() == y.max():
            return None
        return ClusterConfig(**{**cfg.to_dict(), **fit_logistic(x, y, l2)})

    A = [i for i, d in enumerate(dumps) if side(d) == "A"]
    B = [i for i, d in enumerate(dumps) if side(d) == "B"]
    mias = [i for i, d in enumerate(dumps) if side(d) == "mias"]
    groups_A = sorted({background(dumps[i]) for i in A})
    print("A backgrounds:", groups_A, "B backgrounds:", sorted({background(dumps[i]) for i in B}))

    def lowo_scores(cfg, l2):
        """Leave-one-background-out scores inside A: (items, sharp flags) with each background
        image (as it is, and every hybrid made from it) scored by a model fitted on the others."""
        items, flags = [], []
        for g in groups_A:
            train = [i for i in A if background(dumps[i]) != g]
            test = [i for i in A if background(dumps[i]) == g]
            m = fit(cfg, train, l2) if l2 is not None else cfg
            if m is None:
                return None, None
            items += scored(m, test)
            flags += [sharp(dumps[i]) for i in test]
        return items, flags

    def objective(items, flags):
        """Validation: mean sensitivity on inserted clusters (sharp and 0.2 mm) at <= 0.25 and
        0.5 false clusters per sharp image, false clusters counted on the sharp images."""
        sh = [it for it, f in zip(items, flags) if f]
        fi = [it for it, f in zip(items, flags) if not f]
        r_sh, r_fi = froc(sh), froc(fi)
        return 0.5 * (r_sh["sensitivity_at"]["0.25"] + r_sh["sensitivity_at"]["0.5"]) + \
            0.5 * (r_fi["sensitivity_at"]["0.25"] + r_fi["sensitivity_at"]["0.5"]), r_sh, r_fi

    baseline = ClusterConfig(threshold=0.5, min_diameter_mm=2 * np.sqrt(3 / np.pi) * 0.05 - 1e-6, max_diameter_mm=1e9)
    search = []
    for t, dmin, n in itertools.product(args.thresholds, args.diameters, args.counts):
        cfg = ClusterConfig(threshold=t, min_diameter_mm=dmin, max_diameter_mm=args.max_diameter, min_count=n)
        for l2 in [None] + list(args.l2):
            items, flags = lowo_scores(cfg, l2)
            if items is None:
                continue
            val, r_sh, r_fi = objective(items, flags)
            search.append({"threshold": t, "min_diameter_mm": dmin, "min_count": n, "l2": l2, "objective": round(val, 4),
                           "sharp_froc": r_sh["sensitivity_at"], "film_froc": r_fi["sensitivity_at"]})
            print(f"t {t} d {dmin} n {n} l2 {l2}: {val:.3f} sharp {r_sh['sensitivity_at']} 0.2mm {r_fi['sensitivity_at']}",
                  flush=True)
    best = max(search, key=lambda r: r["objective"])
    best_rule = max((r for r in search if r["l2"] is None), key=lambda r: r["objective"])
    print("best", best, "\nbest rule", best_rule)
    result = {"benchmark": "microcalc cluster stage on the dumped 0.2.0 network maps (issue 26 item 3)",
              "dump": str(args.dump),
              "scoring": ("2 mm windows saved with the dumps (not the node's working image)" if windowed else
                          "the node's working image and grid (benchmarks/microcalc_exact.py)"),
              "images": {k: sum(side(d) == k for d in dumps) for k in ("A", "B", "mias")}, "search": search,
              "chosen": best, "chosen_rule": best_rule, "features": list(FEATURES)}
    variants = {"baseline": baseline}
    rule = ClusterConfig(threshold=best_rule["threshold"], min_diameter_mm=best_rule["min_diameter_mm"],
                         max_diameter_mm=args.max_diameter, min_count=best_rule["min_count"])
    variants["rule"] = rule
    cfg = ClusterConfig(threshold=best["threshold"], min_diameter_mm=best["min_diameter_mm"],
                        max_diameter_mm=args.max_diameter, min_count=best["min_count"])
    model = fit(cfg, A, best["l2"]) if best["l2"] is not None else cfg
    variants["model"] = model
    # Per pixel-size class calibration, from leave-one-woman-out scores on A.
    items, flags = lowo_scores(cfg, best["l2"])
    false_sh = np.concatenate([s[h == -1] for (s, h, _, _), f in zip(items, flags) if f])
    false_fi = np.concatenate([s[h == -1] for (s, h, _, _), f in zip(items, flags) if not f])
    n_sh = sum(1 for it, f in zip(items, flags) if f and it[3])
    n_fi = sum(1 for it, f in zip(items, flags) if not f and it[3])
    result["validation_false_rates"] = {"sharp_images": n_sh, "film_images": n_fi,
                                        "sharp_false": int(len(false_sh)), "film_false": int(len(false_fi))}
    result["model"] = model.to_dict()
    for name, v in variants.items():
        res = {}
        # thresholds reaching each validation false rate on sharp A images (leave-one-woman-out for the model)
        if name == "model":
            sh_scores = false_sh
        else:
            sh_scores = np.concatenate([s[h == -1] for (s, h, _, _), i in zip(scored(v, A), A) if sharp(dumps[i])])
        thr = {}
        for r in (0.125, 0.25, 0.5):
            s = np.sort(sh_scores)[::-1]
            k = int(np.floor(r * n_sh))
            thr[f"sharp_val_fp{r}"] = float(s[k]) + 1e-6 if k < len(s) else 0.0
        res["thresholds"] = thr
        res["B_sharp_hybrids"] = froc(scored(v, [i for i in B if sharp(dumps[i]) and dumps[i].group.startswith(("hyb", "pos"))]), thr)
        res["B_sharp_plain"] = froc(scored(v, [i for i in B if sharp(dumps[i]) and not dumps[i].group.startswith(("hyb", "pos"))
                                               and "1_R" not in dumps[i].key]), thr)
        res["B_sharp_all"] = froc(scored(v, [i for i in B if sharp(dumps[i]) and "1_R" not in dumps[i].key]), thr)
        res["B_0.2mm_hybrids"] = froc(scored(v, [i for i in B if not sharp(dumps[i])]), thr)
        res["mias"] = froc(scored(v, mias), thr)
        mi = scored(v, mias)
        res["mias"]["auc_cluster_vs_normal"] = auc(list(zip([dumps[i] for i in mias], mi)),
                                                   lambda d: True if d.lesions else (False if not d.labels else None))
        res["shared_images"] = {dumps[i].key: {"candidates": int(len(s)), "scores": [round(float(x), 3) for x in sorted(s)[::-1][:8]]}
                                for i, (s, _, _, _) in zip([i for i in range(len(dumps)) if dumps[i].group == "real-ffdm"],
                                                        scored(v, [i for i in range(len(dumps)) if dumps[i].group == "real-ffdm"]))}
        result[name] = res
        print(f"\n{name}: thresholds {({k: round(t, 3) for k, t in thr.items()})}")
        for key in ("mias", "B_sharp_all", "B_sharp_hybrids", "B_sharp_plain", "B_0.2mm_hybrids"):
            r = res[key]
            print(f"  {key:16s} n_img {r['n_images']:3d} les {r['n_lesions']:2d} FROC {r['sensitivity_at']} "
                  + " ".join(f"{k}: {a['sensitivity']}/{a['false_clusters_per_image']}" for k, a in r["at"].items()))
        print("  MIAS AUC", res["mias"]["auc_cluster_vs_normal"])
        print("  shared", {k: v2["candidates"] for k, v2 in res["shared_images"].items()})
    # ---- the shipped form: calibration per pixel-size class, operating points by CV on MIAS
    fold_of = MIASDataset(args.mias).fold_of
    mias_fold = [fold_of[dumps[i].key.split("/")[-1]] for i in mias]

    def build(row: dict):
        """A search row's model fitted on all of side A, its leave-one-background-out false
        scores on sharp side-A images (for the sharp calibration) and its mini-MIAS items."""
        c = ClusterConfig(threshold=row["threshold"], min_diameter_mm=row["min_diameter_mm"],
                          max_diameter_mm=args.max_diameter, min_count=row["min_count"])
        m = fit(c, A, row["l2"]) if row["l2"] is not None else c
        it, fl = lowo_scores(c, row["l2"])
        fsh = np.concatenate([s_[h == -1] for (s_, h, _, _), f in zip(it, fl) if f])
        nsh = sum(1 for x, f in zip(it, fl) if f and x[3])
        return m, fsh, nsh, scored(m, mias)

    built: dict[int, tuple] = {}

    def mias_choice(folds: set[int]) -> int:
        """Index into ``search`` of the row --choose-on-mias picks on the mini-MIAS images of ``folds``."""
        best_j, best_key = -1, None
        for j, row in enumerate(search):
            if args.mias_choice_rows == "model" and row["l2"] is None:
                continue
            if j not in built:
                built[j] = build(row)
            items = [it for it, f in zip(built[j][3], mias_fold) if f in folds]
            sens = froc(items)["sensitivity_at"]
            key = (round(float(np.mean([sens["0.125"], sens["0.25"], sens["0.5"]])), 6), row["objective"])
            if best_key is None or key > best_key:
                best_j, best_key = j, key
        return best_j

    all_folds = set(mias_fold)
    if args.choose_on_mias:
        j = mias_choice(all_folds)
        model, false_sh, n_sh, _ = built[j]
        result["mias_choice"] = {"all_folds": search[j], "rule": "highest mean mini-MIAS sensitivity at 0.125/0.25/0.5 "
                                 "false clusters per image, ties by the fit-side objective", "rows": args.mias_choice_rows,
                                 "per_fold": {}}
        result["chosen_fit_side"], result["chosen"], result["chosen_on_mias"] = best, search[j], True
        print("chosen on mini-MIAS (all folds):", search[j])
    mias_items = scored(model, mias)
    mias_false = np.concatenate([s[h == -1] for s, h, _, _ in mias_items])
    cal = spacing_calibration((mias_false, len(mias)), (false_sh, n_sh))
    final = ClusterConfig(**{**model.to_dict(), "sharp_calibration": cal})
    result["final"] = {"clusters": final.to_dict(), "points": {}}

    def final_scored(idx, stage: ClusterConfig = final):
        out = []
        for (s, h, n, full), i in zip(scored(ClusterConfig(**{**stage.to_dict(), "sharp_calibration": {}}), idx), idx):
            spacing = min(dumps[i].source_spacing)
            out.append((np.array([calibrated(v, spacing, stage) for v in s]), h, n, full))
        return out

    def rate_threshold(items, rate):
        fs = np.sort(np.concatenate([s[h == -1] for s, h, _, _ in items]))[::-1]
        k = int(np.floor(rate * sum(it[3] for it in items) + 1e-9))  # k false candidates allowed
        # Never below 0.5 (a cluster the model finds less likely than not, classes balanced):
        # where the rate is out of reach the threshold would otherwise fall to 0 and send
        # every candidate, which on sharp images is many.
        return max(float(fs[k]) + 1e-6 if k < len(fs) else 0.0, MIN_THRESHOLD)

    print("\nfinal (cluster model + sharp calibration); points: MIAS rate = half the node budget")
    b_sets = {"B_sharp_all": [i for i in B if sharp(dumps[i]) and "1_R" not in dumps[i].key],
              "B_sharp_hybrids": [i for i in B if sharp(dumps[i]) and dumps[i].group.startswith(("hyb", "pos"))],
              "B_0.2mm_hybrids": [i for i in B if not sharp(dumps[i])],
              "shared_1_R_CC": [i for i in B if "1_R" in dumps[i].key],
              "A_sharp_plain (training backgrounds)": [i for i in A if sharp(dumps[i]) and not dumps[i].group.startswith(("hyb", "pos"))]}
    for name, rate in (("fp0.25", 0.125), ("fp0.5", 0.25), ("fp1", 0.5), ("fp2", 1.0)):
        # 5-fold CV on MIAS: threshold from the other folds, scored on the held-out one
        hits = les = fp = 0
        for k in sorted(set(mias_fold)):
            train = [it for it, f in zip(mias_items, mias_fold) if f != k]
            test = [it for it, f in zip(mias_items, mias_fold) if f == k]
            t = rate_threshold(train, rate)
            hits += sum(len(set(h[(s >= t) & (h >= 0)].tolist())) for s, h, _, _ in test)
            les += sum(n for _, _, n, _ in test)
            fp += sum(int(((s >= t) & (h == -1)).sum()) for s, h, _, _ in test)
        t_all = rate_threshold(mias_items, rate)
        point = {"threshold": round(t_all, 4), "mias_rate_target": rate,
                 "mias_cv": {"sensitivity": round(hits / max(les, 1), 4), "false_clusters_per_image": round(fp / len(mias), 4),
                             "clusters": les, "images": len(mias)}}
        for key, idx in b_sets.items():
            point[key] = froc(final_scored(idx), {"t": t_all})["at"]["t"] | {"images": len(idx)}
        result["final"]["points"][name] = point
        print(f"  {name}: t {t_all:.3f} MIAS CV sens {point['mias_cv']['sensitivity']} FP {point['mias_cv']['false_clusters_per_image']} | "
              + " | ".join(f"{k}: {v['sensitivity']}/{v['false_clusters_per_image']}" for k, v in point.items() if k.startswith(("B_", "A_", "shared"))))
    result["final"]["mias_froc"] = froc(mias_items)
    result["final"]["B_sharp_froc"] = froc(final_scored(b_sets["B_sharp_hybrids"]))
    if args.write_bundle:
        write_cluster_bundle(args.source_bundle, args.write_bundle, final, args.version, result)
        print(f"wrote bundle {args.write_bundle}")
    if args.write_fold_bundles:
        result["fold_bundles"] = {}
        for k in sorted(set(mias_fold)):
            # Everything mini-MIAS decides, decided without fold k: the film side of the sharp
            # calibration and each point's threshold (the cluster model saw no MIAS image), and
            # with --choose-on-mias the search row.
            model_k, false_sh_k, n_sh_k, items_k = model, false_sh, n_sh, mias_items
            if args.choose_on_mias:
                j = mias_choice(all_folds - {k})
                model_k, false_sh_k, n_sh_k, items_k = built[j]
                result["mias_choice"]["per_fold"][str(k)] = search[j]
                print(f"fold {k}: chosen on the other folds: {search[j]}", flush=True)
            train = [it for it, f in zip(items_k, mias_fold) if f != k]
            test = [it for it, f in zip(items_k, mias_fold) if f == k]
            false_k = np.concatenate([s[h == -1] for s, h, _, _ in train])
            stage = ClusterConfig(**{**model_k.to_dict(),
                                     "sharp_calibration": spacing_calibration((false_k, len(train)), (false_sh_k, n_sh_k))})
            points = {}
            for name, rate in (("fp0.25", 0.125), ("fp0.5", 0.25), ("fp1", 0.5), ("fp2", 1.0)):
                t = rate_threshold(train, rate)
                point = {"threshold": round(t, 4), "mias_rate_target": rate,
                         "mias_cv": {"sensitivity": round(sum(len(set(h[(s >= t) & (h >= 0)].tolist())) for s, h, _, _ in test)
                                                          / max(sum(n for _, _, n, _ in test), 1), 4),
                                     "false_clusters_per_image": round(sum(int(((s >= t) & (h == -1)).sum())
                                                                           for s, h, _, _ in test) / len(test), 4),
                                     "clusters": sum(n for _, _, n, _ in test), "images": len(test),
                                     "note": f"mini-MIAS fold {k} only (held out of this bundle's choices)"}}
                for key, idx in b_sets.items():
                    point[key] = froc(final_scored(idx, stage), {"t": t})["at"]["t"] | {"images": len(idx)}
                points[name] = point
            evaluation = {"chosen": result["mias_choice"]["per_fold"][str(k)] if args.choose_on_mias else best,
                          "chosen_on_mias": args.choose_on_mias, "scoring": result["scoring"], "final": {"points": points, "mias_froc": froc(train),
                                                    "B_sharp_froc": froc(final_scored(b_sets["B_sharp_hybrids"], stage))}}
            out = args.write_fold_bundles / f"fold{k}"
            write_cluster_bundle(args.source_bundle, out, stage, f"{args.version}-fold{k}", evaluation, mias_held_out=k)
            result["fold_bundles"][str(k)] = {"path": str(out), "thresholds": {n: p["threshold"] for n, p in points.items()},
                                              "held_out_fold": {n: p["mias_cv"] for n, p in points.items()},
                                              "sharp_calibration": stage.sharp_calibration}
            print(f"wrote fold bundle {out}: thresholds {result['fold_bundles'][str(k)]['thresholds']}", flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
