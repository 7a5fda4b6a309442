"""Why the U-Net's held-out mass FROC is flat between 0.25 and 0.5 false marks per image, and
what region scores, region extraction or test-time scales change it (issue 26, masses).

Everything is held out by fold, as in ``bench_mias_node.py``: each mini-MIAS image is run by the
fold bundle that did not see it (``--dunet-folds``/fold<k>); on the 0.8 mm working grid of that
network the raw subtraction output ``x - f(x)`` is kept at the working pixel size and, for the
test-time-scale variants, at each pixel size of ``--scales`` (resampled onto the 0.8 mm grid
through the source grid, :func:`dicom_ai.networks.dunet.multiscale_output`'s resampling).

Candidates (working grid): 8-connected regions of raw output >= 0.1 inside the node's allowed
region (breast less pectoral muscle), i.e. the regions of the bench's candidate level; a
candidate hits a mass when its rounded centroid lies in the mass outline (on the working grid),
is false when it lies on no located lesion. Each variant's region score is Platt-calibrated
per held-out fold k on the other four folds' candidates (overlap with a mass as the label), and
thresholds per false-mark budget are chosen on the other four folds with bench_mias_node's own
``choose_thresholds``; held-out marks are pooled. This working-grid FROC tracks bench_mias_node's
U-Net-alone figures within two masses (it reads marks on the 0.2 mm source grid); the node
figures that count come from bench_mias_node with the exported fold bundles.

Parts of the output (benchmarks/results/dunet_scores.json):

* ``diagnosis``: the shipped recipe's held-out candidate scores (ties, the raw peak's range and
  the top plateau), the thresholds per budget chosen on all five folds and per fold, where the
  masses sit between the 0.25 and 0.5 thresholds, each mass's best candidate (hit by centroid,
  overlapped with the centroid off, none), and the node's regions at the operating threshold
  against the candidate-level table.
* ``variants``: held-out FROC of region scores (peak, top-16 mean, mean, peak + mean), of
  regions split at saddles (watershed, dynamic 0.5), and of test-time scale sets.
* ``nested``: for each held-out fold the scale set chosen on the other four folds (mean
  sensitivity at 0.25 / 0.5 / 1 false marks per image on them), and the held-out FROC of that
  procedure; ``paired``: bootstrap over women of the held-out difference, chosen set - none.
* ``--export DIR --export-scales 0.7``: fold bundles with those test-time scales (weights of
  ``--dunet-folds``) and their per-fold Platt calibration refitted as the shipped recipe fits it
  (bench_dunet_resolution: candidate regions of raw >= 0.1 on the whole working grid of the
  other four folds, overlap with a mass), ``DIR/calibration.json`` fitted on all five folds'
  held-out candidates (what ``models/dunet`` carries), for ``bench_mias_node.py --dunet-folds DIR``.

    nice -n 10 python benchmarks/bench_dunet_scores.py --dunet-folds /work/data/dunet-0.8-folds \\
        --export /work/data/dunet-0.9-folds --export-scales 0.7

The per-image arrays are cached under ``--cache`` (build/dunet_scores by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mias_node as node  # noqa: E402  (the node's threshold rule, one copy)

from dicom_ai.data.datasets import MIAS_FOLDS, MIASDataset, mias_woman  # noqa: E402
from dicom_ai.networks.bundle import load_bundle, save_bundle  # noqa: E402
from dicom_ai.networks.dunet import DUNetModel, working_grid  # noqa: E402
from dicom_ai.networks.microcalc_clusters import components  # noqa: E402
from dicom_ai.networks.pipeline import allowed_region  # noqa: E402
from dicom_ai.training.dunet_patches import candidate_level, candidate_regions, fit_platt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
LEVEL = 0.1  # the raw candidate level of the shipped recipe (its map threshold is candidate_level(cal))
SCALE_SETS = {"none": (), "0.7": (0.7,), "0.9": (0.9,), "0.7+0.9": (0.7, 0.9), "0.6+0.7": (0.6, 0.7), "0.9+1.0": (0.9, 1.0)}


# --------------------------------------------------------------------------- per-image arrays

def image_arrays(args, data, models) -> list[dict]:
    """Per MIAS image: raw outputs on the 0.8 mm grid (``s<mm>`` per pixel size), allowed region,
    mass outlines and every located lesion on that grid, fold and woman (cached per image)."""
    args.cache.mkdir(parents=True, exist_ok=True)
    out, t0 = [], time.time()
    scales = sorted(set(args.export_scales) if args.export_only
                    else {s for v in SCALE_SETS.values() for s in v} | set(args.export_scales))
    for i in range(len(data)):
        ref = Path(data.records[i].path).stem
        path = args.cache / f"{ref}.npz"
        fold = data.fold_of[ref]
        if not path.is_file():
            sample = data[i]
            im = node.Image_(sample, fold)
            model = models[fold]
            geo, image, _ = working_grid(sample.image, model.config.pixel_spacing_mm, model.config.multiple)
            arrays = {}
            with torch.no_grad():
                x = torch.from_numpy(image)[None, None]
                arrays["s0.8"] = model.network(x)[0, 0].numpy()
                for s in scales:
                    g, img_s, _ = working_grid(sample.image, s, model.config.multiple)
                    raw = model.network(torch.from_numpy(img_s)[None, None])[0, 0].numpy()
                    arrays[f"s{s:g}"] = geo.forward(g.inverse(raw))
            fwd = lambda m: geo.forward(np.asarray(m, dtype=np.float32)) > 0.5  # noqa: E731
            masses = [fwd(m) for m in im.truth["mass"]]
            anyl = [fwd(m) for m in im.any]
            empty = np.zeros((0,) + image.shape, bool)
            np.savez_compressed(path, **arrays, allowed=fwd(allowed_region(sample.image)),
                                masses=np.stack(masses) if masses else empty, any=np.stack(anyl) if anyl else empty,
                                normal=im.normal)
            if i % 40 == 0:
                print(f"{i}/{len(data)} images run, {time.time() - t0:.0f} s", flush=True)
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
        d.update(fold=fold, woman=mias_woman(ref), ref=ref)
        out.append(d)
    return out


def raw_of(d: dict, scales: tuple[float, ...]) -> np.ndarray:
    """The averaged raw output of the 0.8 mm pass and ``scales`` (as multiscale_output)."""
    return np.mean([d["s0.8"]] + [d[f"s{s:g}"] for s in scales], axis=0).astype(np.float32)


# --------------------------------------------------------------------------- candidate tables

def split_regions(raw: np.ndarray, allowed: np.ndarray, dynamic: float) -> list:
    """Candidate regions split at saddles: watershed basins of -raw (markers: maxima of at least
    ``dynamic`` prominence), each basin's part of raw >= LEVEL its own region."""
    m = np.where(allowed, raw, -1.0).astype(np.float32)
    ws = sitk.GetArrayFromImage(sitk.MorphologicalWatershed(sitk.GetImageFromArray(-m), level=dynamic,
                                                            markWatershedLine=True, fullyConnected=True))
    fg = m >= LEVEL
    regs = []
    for lab in np.unique(ws[fg]):
        if lab:
            regs += components(np.where(fg & (ws == lab), raw, -np.inf).astype(np.float32), LEVEL)
    return regs


FEATURES = {
    "peak": lambda v: v[0],
    "top16_mean": lambda v: v[:16].mean(),
    "mean": lambda v: v.mean(),
}


def table(arrays: list[dict], scales=(), split: float | None = None) -> dict:
    """Candidates of every image: image, fold, features, hit (global mass id or -1), overlap, false."""
    rows, lesion_image, offset = [], [], 0
    for i, d in enumerate(arrays):
        raw = raw_of(d, scales)
        regs = (split_regions(raw, d["allowed"], split) if split
                else components(np.where(d["allowed"], raw, -np.inf).astype(np.float32), LEVEL))
        for r in regs:
            ri, ci = int(round(r.centroid[0])), int(round(r.centroid[1]))
            hits = [j for j, m in enumerate(d["masses"]) if m[ri, ci]]
            v = np.sort(raw[r.pixels[:, 0], r.pixels[:, 1]])[::-1]
            rows.append((i, d["fold"], {k: float(f(v)) for k, f in FEATURES.items()},
                         offset + hits[0] if hits else -1,
                         bool(any(m[r.pixels[:, 0], r.pixels[:, 1]].any() for m in d["masses"])),
                         not any(m[ri, ci] for m in d["any"]), r.centroid, len(v)))
        lesion_image += [i] * len(d["masses"])
        offset += len(d["masses"])
    col = lambda j: np.array([r[j] for r in rows])  # noqa: E731
    return {"img": col(0).astype(int), "fold": col(1).astype(int), "feat": [r[2] for r in rows],
            "hit": col(3).astype(int), "overlap": col(4).astype(bool), "false": col(5).astype(bool),
            "lesion_image": np.array(lesion_image, int), "n_lesions": offset, "area": col(7)}


def _logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised logistic regression of y on the columns of x: (weights, mean, sd)."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    z = torch.tensor((x - mu) / sd)
    t = torch.tensor(y.astype(np.float64))
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w[:-1] + w[-1], t)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), mu, sd


def calibrated(tab: dict, names: tuple[str, ...]) -> np.ndarray:
    """Per-fold calibrated scores: fold k's candidates scored by the fit on the other folds'."""
    x = np.array([[f[n] for n in names] for f in tab["feat"]], dtype=np.float64)
    out = np.zeros(len(x))
    for k in range(MIAS_FOLDS):
        fit = tab["fold"] != k
        if len(names) == 1:
            cal = fit_platt(x[fit, 0], tab["overlap"][fit])
            z = cal["slope"] * x[tab["fold"] == k, 0] + cal["intercept"]
        else:
            w, mu, sd = _logistic(x[fit], tab["overlap"][fit])
            z = ((x[tab["fold"] == k] - mu) / sd) @ w[:-1] + w[-1]
        out[tab["fold"] == k] = 1.0 / (1.0 + np.exp(-z))
    return out


def map_table(tab: dict, score: np.ndarray):
    """bench_mias_node's _MapTable over these candidates (its threshold rule reads it)."""
    t = node._MapTable.__new__(node._MapTable)
    t.img, t.score, t.false, t.hit = tab["img"], score, tab["false"], tab["hit"]
    t.lesion_image, t.floor = tab["lesion_image"], 0.0
    return t


def held_out(mt, folds: np.ndarray, budget: float, which=None) -> tuple[set, int, dict]:
    """Masses found (global ids) and false marks over held-out folds, thresholds chosen on the
    other folds (``which[k]``: the map table of fold k's chosen variant, else ``mt``)."""
    found, false, thr = set(), 0, {}
    for k in range(MIAS_FOLDS):
        t = which[k] if which else mt
        held, val = np.flatnonzero(folds == k), np.flatnonzero(folds != k)
        thr[k] = node.choose_thresholds({("dunet", "mass"): t}, val, budget)[("dunet", "mass")]
        sel = np.isin(t.img, held) & (t.score >= thr[k])
        found |= set(t.hit[sel & (t.hit >= 0)].tolist())
        false += int((sel & t.false).sum())
    return found, false, thr


def froc(mt, folds, n_lesions: int, n_images: int, which=None) -> dict:
    out = {}
    for b in BUDGETS:
        found, false, _ = held_out(mt, folds, b, which)
        out[str(b)] = {"sensitivity": round(len(found) / n_lesions, 4), "false_marks_per_image": round(false / n_images, 4)}
    return out


def _line(f: dict) -> str:
    return " / ".join(f"{f[str(b)]['sensitivity']:.2f}" for b in BUDGETS)


# --------------------------------------------------------------------------- diagnosis

def diagnosis(arrays, tab, mt, cals) -> dict:
    folds = np.array([d["fold"] for d in arrays])
    n_img = len(arrays)
    every = np.arange(n_img)
    s = mt.score
    peak = np.array([f["peak"] for f in tab["feat"]])
    uniq, counts = np.unique(np.round(s, 6), return_counts=True)
    top = s >= s.max() - 1e-6
    out: dict = {
        "candidates": int(len(s)), "images": n_img, "masses": tab["n_lesions"],
        "distinct_scores_6dp": int(len(uniq)), "largest_tie": int(counts.max()),
        "candidates_on_top_score": int(top.sum()), "masses_on_top_score": int(((mt.hit >= 0) & top).sum()),
        "raw_peak_quantiles_0_50_90_99_100": [round(float(v), 3) for v in np.quantile(peak, [0, .5, .9, .99, 1])],
        "score_quantiles_0_50_90_99_100": [round(float(v), 4) for v in np.quantile(s, [0, .5, .9, .99, 1])],
    }
    # Thresholds on all five folds (the shipped rule for the U-Net alone) and per held-out fold.
    out["thresholds_all_folds"] = {}
    for b in BUDGETS:
        t = node.choose_thresholds({("dunet", "mass"): mt}, every, b)[("dunet", "mass")]
        fp, sens = mt.stats(every, t)
        out["thresholds_all_folds"][str(b)] = {"threshold": round(t, 4), "false_marks_per_image": round(fp, 3),
                                               "sensitivity": round(sens, 3)}
    out["thresholds_per_fold"] = {str(b): {str(k): round(v, 4) for k, v in held_out(mt, folds, b)[2].items()}
                                  for b in (0.25, 0.5, 1.0)}
    t25, t50 = (out["thresholds_all_folds"][b]["threshold"] for b in ("0.25", "0.5"))
    band = (s < t25) & (s >= t50)
    out["between_fp0.25_and_fp0.5_all_folds"] = {
        "score_band": [t50, t25], "candidates": int(band.sum()), "false": int((band & mt.false).sum()),
        "masses_first_found_there": len(set(mt.hit[band & (mt.hit >= 0)].tolist())
                                       - set(mt.hit[(s >= t25) & (mt.hit >= 0)].tolist()))}
    # Each mass's best candidate (centroid in it; else overlapping with the centroid off; else none).
    cats = {"hit_by_centroid": 0, "overlapped_centroid_off_peak_in_mass": 0,
            "overlapped_centroid_off_peak_elsewhere": 0, "no_candidate": 0, "outside_allowed": 0}
    for d in arrays:
        raw, al = d["s0.8"], d["allowed"]
        regs = components(np.where(al, raw, -np.inf).astype(np.float32), LEVEL)
        lab = np.zeros(raw.shape, int)
        for j, r in enumerate(regs):
            lab[r.pixels[:, 0], r.pixels[:, 1]] = j + 1
        for m in d["masses"]:
            inside = m & al
            if not inside.any():
                cats["outside_allowed"] += 1
                continue
            if any(m[int(round(r.centroid[0])), int(round(r.centroid[1]))] for r in regs):
                cats["hit_by_centroid"] += 1
                continue
            ov = set(lab[inside].ravel().tolist()) - {0}
            if not ov:
                cats["no_candidate"] += 1
                continue
            r = regs[max(ov, key=lambda j: regs[j - 1].peak) - 1]
            cats["overlapped_centroid_off_peak_in_mass" if r.peak <= raw[inside].max() + 1e-6
                 else "overlapped_centroid_off_peak_elsewhere"] += 1
    out["masses_by_best_candidate"] = cats
    # The node's regions at the operating threshold (components of raw >= the threshold's raw
    # level) against the candidate-level table the bench scores.
    node_rows = {}
    for b in BUDGETS:
        found_t, false_t = set(), 0
        found_c, false_c, thr = held_out(mt, folds, b)
        for k in range(MIAS_FOLDS):
            cal = cals[k]
            t = min(max(thr[k], 1e-9), 1 - 1e-9)
            level = max((np.log(t / (1 - t)) - cal["intercept"]) / cal["slope"], LEVEL)
            for i in np.flatnonzero(folds == k):
                d = arrays[i]
                for r in components(np.where(d["allowed"], d["s0.8"], -np.inf).astype(np.float32), level):
                    ri, ci = int(round(r.centroid[0])), int(round(r.centroid[1]))
                    found_t |= {(int(i), j) for j, m in enumerate(d["masses"]) if m[ri, ci]}
                    false_t += not any(m[ri, ci] for m in d["any"])
        node_rows[str(b)] = {"candidate_table": {"sensitivity": round(len(found_c) / tab["n_lesions"], 4),
                                                 "false_marks_per_image": round(false_c / n_img, 4)},
                             "regions_at_threshold": {"sensitivity": round(len(found_t) / tab["n_lesions"], 4),
                                                      "false_marks_per_image": round(false_t / n_img, 4)}}
    out["node_regions_vs_candidate_table"] = node_rows
    return out


# --------------------------------------------------------------------------- paired bootstrap

def paired(arrays, mt_a, mt_b, which_b, n: int = 2000, seed: int = 0) -> dict:
    """Bootstrap over women of held-out sensitivity and false marks per image, b - a."""
    folds = np.array([d["fold"] for d in arrays])
    women = np.array([d["woman"] for d in arrays])
    uw = np.unique(women)
    lesion_woman = women[mt_a.lesion_image]
    rng = np.random.default_rng(seed)
    out = {}
    for b in BUDGETS:
        fa, xa, thr_a = held_out(mt_a, folds, b)
        fb, xb, thr_b = held_out(mt_b, folds, b, which_b)
        hit_a = np.isin(np.arange(len(mt_a.lesion_image)), list(fa)).astype(float)
        hit_b = np.isin(np.arange(len(mt_a.lesion_image)), list(fb)).astype(float)

        def false_per_image(mt, thr, which=None):
            per = np.zeros(len(arrays))
            for k in range(MIAS_FOLDS):
                t = which[k] if which else mt
                sel = (folds[t.img] == k) & (t.score >= thr[k]) & t.false
                np.add.at(per, t.img[sel], 1)
            return per

        pa, pb = false_per_image(mt_a, thr_a), false_per_image(mt_b, thr_b, which_b)
        ds, dfp = [], []
        for _ in range(n):
            pick = rng.choice(uw, len(uw))
            cnt = np.bincount(np.searchsorted(uw, pick), minlength=len(uw))
            wl = cnt[np.searchsorted(uw, lesion_woman)]
            wi = cnt[np.searchsorted(uw, women)]
            if wl.sum():
                ds.append(((hit_b - hit_a) * wl).sum() / wl.sum())
            dfp.append(((pb - pa) * wi).sum() / wi.sum())
        out[str(b)] = {"sensitivity_difference": round(float((hit_b.sum() - hit_a.sum()) / len(hit_a)), 4),
                       "ci95": [round(float(np.quantile(ds, q)), 4) for q in (0.025, 0.975)],
                       "masses_gained": sorted(int(v) for v in fb - fa), "masses_lost": sorted(int(v) for v in fa - fb),
                       "false_marks_per_image_difference": round(float((pb.sum() - pa.sum()) / len(arrays)), 4),
                       "false_ci95": [round(float(np.quantile(dfp, q)), 4) for q in (0.025, 0.975)]}
    return out


# --------------------------------------------------------------------------- export

def recipe_candidates(d: dict, scales) -> list[tuple[float, bool]]:
    """(peak raw, overlaps a mass) of the recipe's calibration candidates: regions of raw >= 0.1
    on the whole working grid (bench_dunet_resolution.evaluate)."""
    raw = raw_of(d, scales)
    target = d["masses"].any(axis=0) if len(d["masses"]) else np.zeros(raw.shape, bool)
    return [(peak, bool(target[region].any())) for peak, region in candidate_regions(raw, LEVEL)]


def _cal_input(scales) -> str:
    if not scales:  # one pass: the shipped recipe's wording
        return "peak of the unclipped subtraction output x - f(x) over a candidate region"
    return ("peak of the unclipped subtraction output x - f(x), averaged over the working pixel size and the "
            f"test-time scales {list(scales)} mm, over a candidate region")


def export(args, arrays) -> dict:
    scales = tuple(args.export_scales)
    cands = [recipe_candidates(d, scales) for d in arrays]
    folds = np.array([d["fold"] for d in arrays])
    info: dict = {"scales": list(scales), "folder": str(args.export), "per_fold": {}}
    args.export.mkdir(parents=True, exist_ok=True)
    for k in range(MIAS_FOLDS):
        pool = [c for i in np.flatnonzero(folds != k) for c in cands[i]]
        cal = fit_platt([p for p, _ in pool], [h for _, h in pool])
        cal["input"] = _cal_input(scales)
        cal["fitted_on"] += (f"; validation folds only: the candidate regions of the other four folds (not fold {k}), "
                             "each scored by its own out-of-fold network (benchmarks/bench_dunet_scores.py)")
        src = args.dunet_folds / f"fold{k}"
        b = load_bundle(str(src))
        manifest = json.loads((src / "manifest.json").read_text())
        if scales:
            manifest["architecture"]["test_time_scales_mm"] = list(scales)
        manifest.update(version=f"{args.export_version}-cv-fold{k}", calibration=cal,
                        thresholds={"mass": round(candidate_level(cal), 6)})
        save_bundle(args.export / f"fold{k}", manifest, b.state_dict)
        info["per_fold"][str(k)] = {"slope": cal["slope"], "intercept": cal["intercept"],
                                    "threshold": manifest["thresholds"]["mass"]}
    pooled = [c for cs in cands for c in cs]
    cal = fit_platt([p for p, _ in pooled], [h for _, h in pooled])
    cal["input"] = _cal_input(scales)
    cal["fitted_on"] = (f"{len(pooled)} candidate regions ({sum(h for _, h in pooled)} on a mass) of all "
                        f"{len(arrays)} mini-MIAS images, each scored by the fold network that did not see it "
                        "(pooled held-out candidates of the 5-fold CV, benchmarks/bench_dunet_scores.py --export); "
                        "applied to the all-folds weights trained with the same recipe")
    (args.export / "calibration.json").write_text(json.dumps(cal, indent=1) + "\n")
    info["calibration_all_folds"] = cal
    print(f"exported fold bundles and calibration.json to {args.export}")
    return info


def export_only(args, arrays, folds: np.ndarray, t0: float) -> int:
    """``--export-only``: the exported scales' held-out working-grid FROC (peak, per-fold Platt on
    the other folds) and the fold bundles; written to ``--out``."""
    scales = tuple(args.export_scales)
    tab = table(arrays, scales)
    f = froc(map_table(tab, calibrated(tab, ("peak",))), folds, tab["n_lesions"], len(arrays))
    result = {"benchmark": "U-Net fold bundles exported with a refitted per-fold Platt calibration (working grid)",
              "fold_bundles": str(args.dunet_folds), "scales": list(scales), "budgets": list(BUDGETS),
              "held_out_working_grid_froc": f, "export": export(args, arrays), "seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"held out (working grid), masses @ {' / '.join(f'{b:g}' for b in BUDGETS)} FP/img: {_line(f)}")
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/work/data/mias"))
    p.add_argument("--dunet-folds", type=Path, default=Path("/work/data/dunet-0.8-folds"))
    p.add_argument("--cache", type=Path, default=Path("build") / "dunet_scores")
    p.add_argument("--export", type=Path, default=None, help="write fold bundles with --export-scales here")
    p.add_argument("--export-scales", type=float, nargs="*", default=[0.7])
    p.add_argument("--export-version", default="0.3.1")
    p.add_argument("--export-only", action="store_true",
                   help="with --export: run only the passes --export-scales needs, skip the diagnosis and variants "
                        "(held-out working-grid FROC of the exported scales only); for a new set of fold networks")
    p.add_argument("--out", type=Path, default=RESULTS / "dunet_scores.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    data = MIASDataset(args.root)
    models = {k: DUNetModel.from_bundle(load_bundle(str(args.dunet_folds / f"fold{k}"))) for k in range(MIAS_FOLDS)}
    if args.export_only and args.export is None:
        raise SystemExit("--export-only needs --export DIR")
    arrays = image_arrays(args, data, models)
    folds = np.array([d["fold"] for d in arrays])
    n_img = len(arrays)
    if args.export_only:
        return export_only(args, arrays, folds, t0)
    result: dict = {"benchmark": "U-Net region scores and candidates, mini-MIAS 5-fold CV (issue 26, masses)",
                    "protocol": __doc__.split("\n\n")[1].strip() + " " + __doc__.split("\n\n")[2].strip(),
                    "fold_bundles": str(args.dunet_folds), "budgets": list(BUDGETS)}
    base = table(arrays)
    n_les = base["n_lesions"]
    base_score = calibrated(base, ("peak",))
    mt0 = map_table(base, base_score)
    cals = {}
    x = np.array([f["peak"] for f in base["feat"]])
    for k in range(MIAS_FOLDS):
        cals[k] = fit_platt(x[base["fold"] != k], base["overlap"][base["fold"] != k])
    result["diagnosis"] = diagnosis(arrays, base, mt0, cals)
    variants: dict = {}
    for names in (("peak",), ("top16_mean",), ("mean",), ("peak", "mean")):
        variants[f"score {'+'.join(names)}"] = froc(map_table(base, calibrated(base, names)), folds, n_les, n_img)
    split = table(arrays, split=0.5)
    variants["regions split at saddles (dynamic 0.5), score peak"] = froc(
        map_table(split, calibrated(split, ("peak",))), folds, n_les, n_img)
    scale_tables = {}
    for name, scales in SCALE_SETS.items():
        tab = table(arrays, scales) if scales else base
        scale_tables[name] = map_table(tab, calibrated(tab, ("peak",)) if scales else base_score)
        variants[f"test-time scales {name}, score peak"] = froc(scale_tables[name], folds, n_les, n_img)
    result["variants"] = variants
    # Nested: each held-out fold gets the scale set that does best on the other four folds.
    def on_validation(name, val):
        t = scale_tables[name]
        return float(np.mean([t.stats(val, node.choose_thresholds({("dunet", "mass"): t}, val, b)[("dunet", "mass")])[1]
                              for b in (0.25, 0.5, 1.0)]))

    chosen = {k: max(SCALE_SETS, key=lambda n: on_validation(n, np.flatnonzero(folds != k))) for k in range(MIAS_FOLDS)}
    which = {k: scale_tables[chosen[k]] for k in range(MIAS_FOLDS)}
    result["nested"] = {"chosen_per_fold": {str(k): v for k, v in chosen.items()},
                        "chosen_on_all_folds": max(SCALE_SETS, key=lambda n: on_validation(n, np.arange(n_img))),
                        "rule": "the scale set with the highest mean sensitivity at 0.25 / 0.5 / 1 false marks per image "
                                "on the other four folds (thresholds chosen on those folds)",
                        "froc": froc(None, folds, n_les, n_img, which)}
    result["paired_nested_minus_none"] = paired(arrays, mt0, None, which)
    if args.export is not None:
        result["export"] = export(args, arrays)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    dg = result["diagnosis"]
    print(f"candidates {dg['candidates']}, distinct scores {dg['distinct_scores_6dp']}, largest tie {dg['largest_tie']}, "
          f"on the top score {dg['candidates_on_top_score']} ({dg['masses_on_top_score']} masses); raw peak quantiles "
          f"{dg['raw_peak_quantiles_0_50_90_99_100']}")
    print("thresholds (all folds):", {b: v["threshold"] for b, v in dg["thresholds_all_folds"].items()})
    print("between fp0.25 and fp0.5:", dg["between_fp0.25_and_fp0.5_all_folds"])
    print("masses by best candidate:", dg["masses_by_best_candidate"])
    print("| variant (held out, working grid) | masses @ " + " / ".join(f"{b:g}" for b in BUDGETS) + " FP/img |")
    print("|---|---|")
    for name, f in variants.items():
        print(f"| {name} | {_line(f)} |")
    print(f"| nested scale choice {result['nested']['chosen_per_fold']} | {_line(result['nested']['froc'])} |")
    for b, v in result["paired_nested_minus_none"].items():
        print(f"paired @ {b}: {v['sensitivity_difference']:+.3f} {v['ci95']}, false/img {v['false_marks_per_image_difference']:+.3f}")
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
