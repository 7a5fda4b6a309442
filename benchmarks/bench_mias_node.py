"""What the node sends on real mammograms (mini-MIAS 5-fold CV): marks after breast filtering,
merging and operating points chosen on validation folds (issue 14 part 2).

Protocol (everything held out is held out by fold):

* Which marks are scored (:func:`model_sources`): a model with fold bundles (``--dunet-folds``,
  ``--glam-folds``, ``--microcalc-folds``: fold0..fold4, each trained without its fold) is
  scored by them, each image by the bundle that did not see it; a bundle that saw no mini-MIAS
  image (the shipped one, or ``--microcalc-bundle``) on every image; a shipped bundle trained or
  fine-tuned on mini-MIAS without fold bundles is NOT scored (it would be tested on its own
  training images): it is kept off, with the reason in the JSON and the table, and
  ``--write-manifests`` switches it off at every named point. Bundles are run at their plain
  manifest thresholds (their candidate level), whatever point their manifest makes default.
* Marks: each bundle's marks of :func:`dicom_ai.data.evaluate.predict_marks` (maps restricted to
  the breast mask less the pectoral muscle, as :class:`dicom_ai.networks.Pipeline` does), i.e.
  connected regions of each map at p >= 0.1 (or at the bundle's threshold where lower: a
  calibrated map) scored by their peak; a map at threshold t sends the regions whose peak is
  >= t, and no threshold is chosen below that candidate level.
* Operating points (:func:`choose_thresholds`): for a node-level budget R false marks per image,
  on the validation images each map alone is checked at budget R; a map that finds under 5 % of
  its lesion type there is switched off (threshold above its highest score). Each map on gets
  a share of R and sends at the lowest threshold whose validation false marks per image stay
  within its share. ``--split equal`` (default): the maps join one by one (most lesions found
  alone first) only if the validation lesions found together, sharing R equally, rise with
  them, and share R equally. ``--split validation`` (measured in issue 26j and not kept: held
  out it lost masses and let GLAM's maps on): the shares (eighths of R, every split among the
  remaining maps) that find the most validation lesions together (ties: fewer maps on, then
  fewer validation false marks). For
  held-out fold k the thresholds are chosen on the other four folds; the shipped thresholds
  are chosen on all five folds.
* Merging: marks of different models on one image whose centroids lie within the larger
  mark's equivalent radius (sqrt(area / pi)) and that are of one kind (lesion: malignant or
  benign map; calcification cluster) are one finding, as in the SR.
* Hits: a mark is true when its centroid (rounded) lies in a lesion (drawn mass outline, else
  the Info.txt circle); a mark on any located lesion is not false.
* Node FROC: sensitivity per type and false marks per image pooled over the five held-out
  folds at each budget R in 0.125 ... 4 (thresholds re-chosen per fold and per R).
* Marks outside the breast: (a) by construction, against the node's mask; (b) an independent
  intensity check: the 9x9 median of the image at each sent mark's centroid must lie above the
  image's triangle background level (no morphology, no component selection); (c) by eye, the
  PNG previews of the four shared images and the worst MIAS cases in benchmarks/results/.

* Default point (:func:`choose_default`): the loosest named point whose validation false marks
  per normal image (shipped thresholds, chosen on all five folds, scored on those images) stay
  within ``--max-normal-fp`` (0.5) with every map that has signal on; held-out figures play no
  part in the choice.

    nice -n 10 python benchmarks/bench_mias_node.py --root /work/data/mias --cache /work/data/mias_cache \
        --dunet-folds /work/data/dunet-0.8-folds --write-manifests

Writes benchmarks/results/mias_node.json, mias_node.md and PNG previews; with
``--write-manifests`` also the shipped bundles' ``operating_points``. ``--cache`` keeps each
bundle's marks (keyed by its weights digest, calibration and thresholds), so a rerun only
computes the models that changed.
"""

from __future__ import annotations

import argparse
import json
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from microcalc_dump import output_from_dump  # noqa: E402

from dicom_ai.data.datasets import MIAS_FOLDS, MIASDataset, mias_woman  # noqa: E402
from dicom_ai.data.evaluate import FROC_CANDIDATE_THRESHOLD, UNION, ModelMarks, _output_prediction, evaluate_lesions, lesions_of, predict_marks  # noqa: E402
from dicom_ai.data.metrics import LESION_FROC_RATES, bootstrap_ci, roc_auc  # noqa: E402
from dicom_ai.imaging.mask import MASK_VERSION  # noqa: E402
from dicom_ai.imaging.mammogram import mammogram_from_array, orient  # noqa: E402
from dicom_ai.networks import Pipeline  # noqa: E402
from dicom_ai.networks.bundle import MODELS_DIR, load_bundle  # noqa: E402
from dicom_ai.networks.pipeline import allowed_region, restrict_to_breast  # noqa: E402
from dicom_ai.networks.registry import model_from_bundle  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUNDLES = ("glam", "dunet", "microcalc")
#: Node-level budgets (false marks per image) of the named operating points.
POINTS = {"fp0.25": 0.25, "fp0.5": 0.5, "fp1": 1.0, "fp2": 2.0}
TYPE_OF = {"malignant_lesion": "mass", "benign_lesion": "mass", "mass": "mass",
           "calcification_cluster": "calcification_cluster", "calcification": "calcification_cluster"}
MERGE_KIND = {"malignant_lesion": "lesion", "benign_lesion": "lesion", "mass": "lesion", "calcification_cluster": "cluster"}
OFF = float("inf")  # switched off: the map is not sent (manifest "off": true)
MIN_USEFUL = 0.05
#: Today's node figures before issue 26 (benchmarks/results/mias_node.json of commit c8dc25b: U-Net
#: 0.2.0 128x96 fold models, GLAM fine-tuned per fold (glam-mias), phantom microcalc; default fp1).
TODAY = {"config": "dunet 0.2.0 128x96 CV folds + GLAM MIAS folds + phantom microcalc 0.1.0, mias_node.json of c8dc25b",
         "mass": [0.0, 0.0, 0.0, 0.4138, 0.5345, 0.5517], "calcification_cluster": [0.0] * 6,
         "default": "fp1", "fp_normal_default": 1.1594, "fp_all_default": 1.0683, "auc": [0.5532, 0.4967, 0.605],
         "share": [0.0, 1.0, 0.0], "outside": "0 / 0 of 379", "real_marks_per_image_default": 1.75}


class Image_:
    """One image's data for scoring: lesions per type, all lesion masks, fold, normal flag."""

    def __init__(self, sample, fold: int):
        lesions = [l for l in lesions_of(sample) if l.mask is not None]
        self.truth = {t: [l.mask for l in lesions if l.kind == t] for t in ("mass", "calcification_cluster")}
        self.any = [l.mask for l in lesions]
        self.fold = fold
        self.normal = not (sample.lesions or sample.labels.get("benign") or sample.labels.get("malignant"))
        self.malignant = bool(sample.labels.get("malignant"))
        self.reference = sample.source.rsplit("/", 1)[-1].split(".")[0]


def _at(mask: np.ndarray, r: float, c: float) -> bool:
    ri, ci = int(round(r)), int(round(c))
    return 0 <= ri < mask.shape[0] and 0 <= ci < mask.shape[1] and bool(mask[ri, ci])


def _cands(marks: dict[str, ModelMarks]) -> list[tuple[str, str, np.ndarray]]:
    """(model, map, (n, 4) candidates) of one image."""
    return [(m, k, mm.candidates[k]) for m, mm in marks.items() for k in mm.candidates if k in TYPE_OF]


class _MapTable:
    """One map's candidates over all images, precomputed for threshold sweeps: per candidate
    its image, score, whether it is false (on no located lesion) and the lesion of the map's
    type it hits (global id, -1 for none)."""

    def __init__(self, images, marks, model: str, key: str):
        typ = TYPE_OF[key]
        img, score, false, hit = [], [], [], []
        self.lesion_image = []
        offset = 0
        for i, im in enumerate(images):
            c = marks[i][model].candidates.get(key, np.zeros((0, 4))) if model in marks[i] else np.zeros((0, 4))
            for s_, r, cc, _ in c:
                inside = [j for j, m in enumerate(im.truth[typ]) if _at(m, r, cc)]
                img.append(i)
                score.append(s_)
                hit.append(offset + inside[0] if inside else -1)
                false.append(not inside and not any(_at(m, r, cc) for m in im.any))
            self.lesion_image += [i] * len(im.truth[typ])
            offset += len(im.truth[typ])
        # The lowest threshold the map's candidates support: FROC_CANDIDATE_THRESHOLD, or the
        # bundle's own threshold where lower (a calibrated map whose probabilities are small).
        levels = [marks[i][model].thresholds[key] for i in range(len(images))
                  if model in marks[i] and key in marks[i][model].thresholds]
        self.floor = min([FROC_CANDIDATE_THRESHOLD] + levels)
        self.img, self.score = np.array(img, dtype=int), np.array(score, dtype=float)
        self.false, self.hit = np.array(false, dtype=bool), np.array(hit, dtype=int)
        self.lesion_image = np.array(self.lesion_image, dtype=int)

    def stats(self, idx, t: float) -> tuple[float, float]:
        """(false marks per image, sensitivity) over images ``idx`` at threshold ``t``."""
        sel = np.isin(self.img, idx) & (self.score >= t)
        fp = int((sel & self.false).sum()) / max(len(idx), 1)
        n_les = int(np.isin(self.lesion_image, idx).sum())
        found = len(set(self.hit[sel & (self.hit >= 0)].tolist()))
        return fp, (found / n_les if n_les else 0.0)


def _tables(images, marks) -> dict:
    maps = sorted({(m, k) for i in range(len(images)) for m, k, _ in _cands(marks[i])})
    return {mk: _MapTable(images, marks, *mk) for mk in maps}


#: The budget split of ``--split validation`` is chosen in steps of 1/SHARE_STEPS of the budget.
SHARE_STEPS = 8


def _compositions(total: int, parts: int):
    """Every way to write ``total`` as an ordered sum of ``parts`` non-negative integers."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first,) + rest


def choose_thresholds(tables: dict, idx, budget: float, split: str = "equal") -> dict[tuple[str, str], float]:
    """Per (model, map) threshold for a node budget of ``budget`` false marks per image (module
    doc); ``split``: ``validation`` (shares chosen on the validation images) or ``equal``."""
    idx = np.asarray(list(idx), dtype=int)

    def lowest(tab, share):
        sel = np.isin(tab.img, idx)
        order = np.argsort(-tab.score[sel])
        scores, false = tab.score[sel][order], tab.false[sel][order]
        # Sweeping down the scores: false marks per image after including each candidate
        # (ties included together, since a threshold cannot split them).
        cum = np.cumsum(false) / max(len(idx), 1)
        best = OFF
        for j in range(len(scores)):
            if j + 1 < len(scores) and scores[j + 1] == scores[j]:
                continue
            if cum[j] <= share:
                best = float(scores[j])
            else:
                break
        return best if best == OFF else max(best, tab.floor)

    def found(maps) -> int:
        """Validation lesions the maps find together when they share the budget equally."""
        hits = set()
        for mk in maps:
            tab = tables[mk]
            sel = np.isin(tab.img, idx) & (tab.score >= lowest(tab, budget / len(maps))) & (tab.hit >= 0)
            hits |= {(TYPE_OF[mk[1]], h) for h in tab.hit[sel].tolist()}
        return len(hits)

    candidates = [mk for mk, tab in tables.items() if tab.stats(idx, lowest(tab, budget))[1] >= MIN_USEFUL]
    if split == "validation":
        return _split_on_validation(tables, idx, budget, candidates, lowest)
    # A map joins only if it adds validation lesions once it takes its share of the budget: a map
    # that finds a few lesions alone but mostly marks normal tissue (GLAM's maps on MIAS) would
    # otherwise take budget from one that localises.
    useful: list = []
    for mk in sorted(candidates, key=lambda m: -found([m])):
        if found(useful + [mk]) > found(useful):
            useful.append(mk)
    out = {mk: OFF for mk in tables}
    for mk in useful:
        out[mk] = lowest(tables[mk], budget / len(useful))
    return out


def _split_on_validation(tables: dict, idx: np.ndarray, budget: float, candidates: list, lowest) -> dict:
    """Thresholds of the budget split (eighths of ``budget`` per map in ``candidates``) that finds
    the most validation lesions together; ties: fewer maps on, then fewer validation false marks."""
    level: dict = {}
    for mk in candidates:
        tab = tables[mk]
        sel = np.isin(tab.img, idx)
        for k in range(1, SHARE_STEPS + 1):
            t = lowest(tab, budget * k / SHARE_STEPS)
            on = sel & (tab.score >= t)
            level[(mk, k)] = (t, {(TYPE_OF[mk[1]], h) for h in tab.hit[on & (tab.hit >= 0)].tolist()},
                              int((on & tab.false).sum()))
    best_key, best = None, ()
    for shares in _compositions(SHARE_STEPS, len(candidates)):
        on = [(mk, k) for mk, k in zip(candidates, shares) if k and level[(mk, k)][0] != OFF]
        found = set().union(*(level[o][1] for o in on)) if on else set()
        key = (len(found), -len(on), -sum(level[o][2] for o in on))
        if best_key is None or key > best_key:
            best_key, best = key, on
    out = {mk: OFF for mk in tables}
    for mk, k in best:
        out[mk] = level[(mk, k)][0]
    return out


def by_parts(images, marks, rates: dict[tuple[str, str], float]) -> tuple[dict, dict[int, list]]:
    """Held-out figures of maps sent together, each at the threshold chosen for it ALONE on the
    validation folds (its own false-mark ``rates`` per image; every other map off): how an
    operating point chosen per model, not jointly, performs when the node sends all of it.
    Returns the figures (with ``per_map_held_out`` as :func:`cross_validate`'s points) and the
    held-out sent marks per image."""
    tables = _tables(images, marks)
    folds = [[i for i, im in enumerate(images) if im.fold == k] for k in range(MIAS_FOLDS)]
    sent, per_fold, per_map_held = {}, {}, {}
    for k, held in enumerate(folds):
        val = [i for f, ids in enumerate(folds) if f != k for i in ids]
        thr = {mk: OFF for mk in tables}
        for mk, rate in rates.items():
            if mk in tables:
                thr.update(choose_thresholds({mk: tables[mk]}, val, rate))
        per_fold[str(k)] = {f"{m}/{key}": (None if t == OFF else t) for (m, key), t in thr.items() if (m, key) in rates}
        for i in held:
            sent[i] = sent_marks(marks[i], thr)
        for (m, key), t in thr.items():
            fp, sens = tables[(m, key)].stats(np.asarray(held), t)
            per_map_held.setdefault(f"{m}/{key}", []).append((len(held), fp, sens))
    out = score_sent(images, sent, range(len(images)))
    out["per_map_held_out"] = _per_map_held_out(per_map_held)
    # The thresholds a node would ship for this pair: each chosen alone on all five folds.
    every = np.arange(len(images))
    out["thresholds_all_folds"] = {f"{m}/{key}": (None if t == OFF else t)
                                   for (m, key), rate in rates.items() if (m, key) in tables
                                   for t in [choose_thresholds({(m, key): tables[(m, key)]}, every, rate)[(m, key)]]}
    total = sum(len(v) for v in sent.values())
    out["share_of_sent_marks"] = {m: round(sum(m in f["models"] for v in sent.values() for f in v) / max(total, 1), 4)
                                  for m in BUNDLES}
    out.update(rates={f"{m}/{k}": r for (m, k), r in rates.items()}, per_fold_thresholds=per_fold,
               auc=_auc(images, sent))
    return out, sent


def sent_marks(marks: dict[str, ModelMarks], thresholds) -> list[dict]:
    """The node's findings of one image at ``thresholds``, merged across models (module doc)."""
    items = []
    for m, k, c in _cands(marks):
        for s, r, cc, a in c[c[:, 0] >= thresholds.get((m, k), OFF)]:
            items.append({"model": m, "map": k, "score": float(s), "row": float(r), "col": float(cc), "area": float(a)})
    items.sort(key=lambda d: -d["score"])
    merged: list[dict] = []
    for it in items:
        kind = MERGE_KIND.get(it["map"])
        for f in merged:
            if kind and MERGE_KIND.get(f["map"]) == kind and it["model"] not in f["models"]:
                radius = math.sqrt(max(f["area"], it["area"]) / math.pi)
                if math.hypot(f["row"] - it["row"], f["col"] - it["col"]) <= radius:
                    f["models"].append(it["model"])
                    break
        else:
            merged.append(dict(it, models=[it["model"]]))
    return merged


def held_out_sent(images, marks, budget: float) -> dict[int, list]:
    """Held-out sent marks at a node budget of ``budget`` false marks per image: each fold's
    images at the thresholds :func:`choose_thresholds` picks on the other four folds."""
    tables = _tables(images, marks)
    folds = [[i for i, im in enumerate(images) if im.fold == k] for k in range(MIAS_FOLDS)]
    sent: dict[int, list] = {}
    for k, held in enumerate(folds):
        val = [i for f, ids in enumerate(folds) if f != k for i in ids]
        thr = choose_thresholds(tables, val, budget)
        for i in held:
            sent[i] = sent_marks(marks[i], thr)
    return sent


def found_and_false(images, sent, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(found per located lesion of ``kind`` in image order, false marks per image) of one set of
    sent marks; a mark of any map counts."""
    found, false = [], np.zeros(len(images))
    for i, im in enumerate(images):
        for m in im.truth[kind]:
            found.append(any(_at(m, f["row"], f["col"]) for f in sent[i]))
        false[i] = sum(not any(_at(m, f["row"], f["col"]) for m in im.any) for f in sent[i])
    return np.array(found, float), false


def paired_over_women(images, kind: str, a: dict, b: dict, n: int, label: str, seed: int = 0) -> dict[str, dict]:
    """b minus a per budget, both given as :func:`found_and_false` per budget on the same
    ``images``: each side's sensitivity and false marks per image (all, normals), the ``label``
    lesions found by one side only, and 95 % intervals of the differences from ``n`` resamples
    of the women (a woman's lesions and images are drawn together)."""
    women = np.array([mias_woman(im.reference) for im in images])
    lesion_woman = np.array([women[i] for i, im in enumerate(images) for _ in im.truth[kind]])
    uw = np.unique(women)
    rng = np.random.default_rng(seed)
    picks = [np.bincount(np.searchsorted(uw, rng.choice(uw, len(uw))), minlength=len(uw)) for _ in range(n)]
    normal = np.array([im.normal for im in images])
    out = {}
    for budget in a:
        (fa, pa), (fb, pb) = a[budget], b[budget]
        ds, dp = [], []
        for cnt in picks:
            wl, wi = cnt[np.searchsorted(uw, lesion_woman)], cnt[np.searchsorted(uw, women)]
            ds.append(((fb - fa) * wl).sum() / max(wl.sum(), 1))
            dp.append(((pb - pa) * wi).sum() / wi.sum())
        side = {name: {"sensitivity": round(float(f.mean()), 4), "false_marks_per_image": round(float(p_.mean()), 4),
                       "false_marks_per_normal_image": round(float(p_[normal].mean()), 4)}
                for name, (f, p_) in (("a", (fa, pa)), ("b", (fb, pb)))}
        out[str(budget)] = dict(side, **{
            f"{label}_found_by_b_only": int(((fb == 1) & (fa == 0)).sum()),
            f"{label}_found_by_a_only": int(((fa == 1) & (fb == 0)).sum()),
            "sensitivity_difference_ci95": [round(float(np.quantile(ds, q)), 4) for q in (0.025, 0.975)],
            "false_marks_difference_ci95": [round(float(np.quantile(dp, q)), 4) for q in (0.025, 0.975)]})
    return out


def score_sent(images, sent, idx) -> dict:
    """Sensitivity per type, false marks per image (all, normals) of the sent findings."""
    found = {t: 0 for t in ("mass", "calcification_cluster")}
    total = {t: 0 for t in found}
    fp = fp_normal = n_normal = 0
    for i in idx:
        im = images[i]
        n_normal += im.normal
        for t in found:
            total[t] += len(im.truth[t])
            found[t] += sum(any(_at(m, f["row"], f["col"]) and TYPE_OF[f["map"]] == t for f in sent[i])
                            for m in im.truth[t])
        false = sum(not any(_at(m, f["row"], f["col"]) for m in im.any) for f in sent[i])
        fp += false
        fp_normal += false if im.normal else 0
    return {"sensitivity": {t: round(found[t] / total[t], 4) if total[t] else None for t in found},
            "lesions": total, "false_marks_per_image": round(fp / max(len(idx), 1), 4),
            "false_marks_per_normal_image": round(fp_normal / n_normal, 4) if n_normal else None,
            "n_images": len(idx), "n_normal": n_normal}


def cross_validate(images, marks, split: str = "equal") -> dict:
    """Held-out figures per named point and the node FROC (thresholds chosen per fold)."""
    tables = _tables(images, marks)
    folds = [[i for i, im in enumerate(images) if im.fold == k] for k in range(MIAS_FOLDS)]
    out: dict = {"points": {}, "froc": {}, "per_fold_thresholds": {}}
    budgets = sorted(set(POINTS.values()) | set(LESION_FROC_RATES))
    for budget in budgets:
        sent: dict[int, list] = {}
        per_map_held: dict = {}
        for k, held in enumerate(folds):
            val = [i for f, ids in enumerate(folds) if f != k for i in ids]
            thr = choose_thresholds(tables, val, budget, split)
            out["per_fold_thresholds"].setdefault(str(budget), {})[str(k)] = {f"{m}/{key}": (None if t == OFF else t) for (m, key), t in thr.items()}
            for i in held:
                sent[i] = sent_marks(marks[i], thr)
            for (m, key), t in thr.items():
                fp, sens = tables[(m, key)].stats(np.asarray(held), t)
                acc = per_map_held.setdefault(f"{m}/{key}", [])
                acc.append((len(held), fp, sens))
        result = score_sent(images, sent, range(len(images)))
        result["per_map_held_out"] = _per_map_held_out(per_map_held)
        out["froc"][str(budget)] = result
        for name, b in POINTS.items():
            if b == budget:
                out["points"][name] = result
                out.setdefault("sent", {})[name] = sent
    return out


def _per_map_held_out(per_map_held: dict[str, list[tuple[int, float, float]]]) -> dict:
    """Per map, from (held-out images, false marks per image, sensitivity) of each fold: false
    marks per image over all held-out images and the mean sensitivity over folds."""
    return {mk: {"false_marks_per_image": round(sum(n * fp for n, fp, _ in v) / sum(n for n, _, _ in v), 4),
                 "sensitivity_mean_over_folds": round(float(np.mean([s for _, _, s in v])), 4)}
            for mk, v in per_map_held.items()}


def _auc(images, sent) -> dict:
    """Image-level AUC (abnormal vs normal; malignant vs rest) of the highest sent score."""
    score = np.array([max([f["score"] for f in sent[i]], default=0.0) for i in range(len(images))])
    out = {}
    for task, y in (("abnormal", np.array([not im.normal for im in images])),
                    ("malignant", np.array([im.malignant for im in images]))):
        iv = bootstrap_ci(roc_auc, score, y, n=2000)
        out[task] = {"value": round(iv.value, 4), "ci95": [round(iv.low, 4), round(iv.high, 4)]}
    return out


def _independent_outside(sample, sent) -> int:
    """Sent marks failing the intensity check (module doc (b))."""
    img = sample.image.pixels
    small = img[::2, ::2]
    f = sitk.TriangleThresholdImageFilter()
    f.SetInsideValue(0)
    f.SetOutsideValue(1)
    f.Execute(sitk.GetImageFromArray(small.astype(np.float32)))
    level = f.GetThreshold()
    bad = 0
    for m in sent:
        r, c = int(round(m["row"])), int(round(m["col"]))
        patch = img[max(0, r - 4):r + 5, max(0, c - 4):c + 5]
        bad += float(np.median(patch)) <= level
    return bad


def _preview(pixels, breast, sent, path: Path, title: str) -> None:
    h, w = pixels.shape
    f = max(1, int(math.ceil(max(h, w) / 512)))
    small = (np.clip(pixels[::f, ::f], 0, 1) * 255).astype(np.uint8)
    rgb = Image.fromarray(np.stack([small] * 3, -1))
    edge = breast[::f, ::f]
    er = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(edge.astype(np.uint8)), [1, 1])).astype(bool)
    arr = np.asarray(rgb).copy()
    arr[edge & ~er] = (0, 200, 255)
    rgb = Image.fromarray(arr)
    d = ImageDraw.Draw(rgb)
    colours = {"glam": (255, 64, 64), "dunet": (255, 200, 0), "microcalc": (64, 255, 64)}
    for m in sent:
        r, c = m["row"] / f, m["col"] / f
        rad = max(4.0, math.sqrt(m["area"] / math.pi) / f)
        d.ellipse([c - rad, r - rad, c + rad, r + rad], outline=colours.get(m["models"][0], (255, 255, 255)), width=2)
    d.text((4, 4), title, fill=(255, 255, 255))
    rgb.save(path)


#: Where each model's MIAS marks come from (``model_sources``): fold bundles (each held-out fold
#: run by the bundle that did not see it), one bundle that saw no mini-MIAS image (every image
#: held out), or none: a bundle trained or fine-tuned on mini-MIAS without fold bundles would be
#: scored on its own training images, so it is kept off.
FOLDS, HELD_OUT, OFF_LEAK = "folds", "bundle (MIAS fully held out)", "off"


def saw_mias(manifest: dict) -> bool:
    """Whether a bundle's manifest says it was trained or fine-tuned on mini-MIAS (its
    ``training``, ``licence``, ``version`` or ``intended_use`` name MIAS)."""
    text = json.dumps([manifest.get("training"), manifest.get("licence"), manifest.get("version"),
                       manifest.get("intended_use")]).lower()
    return "mias" in text


def model_sources(args) -> dict[str, dict]:
    """Per model of BUNDLES: ``{"kind": FOLDS | HELD_OUT | OFF_LEAK, "path", "ship", "reason"}``.

    ``path`` is the folder of fold0..fold4 (FOLDS) or the bundle (HELD_OUT); ``ship`` the bundle
    the node runs (the real images are run by it and ``--write-manifests`` writes its points).
    """
    out = {}
    for name in BUNDLES:
        folds = getattr(args, f"{name}_folds", None)
        if isinstance(folds, list):  # --dunet-folds may repeat: the last folder is the shipped recipe
            folds = folds[-1] if folds else None
        bundle = getattr(args, f"{name}_bundle", None)
        ship = Path(bundle) if bundle else MODELS_DIR / name
        manifest = json.loads((ship / "manifest.json").read_text())
        if folds:
            out[name] = {"kind": FOLDS, "path": Path(folds), "ship": ship,
                         "reason": f"fold bundles {Path(folds).name}/fold0..4: each held-out fold run by the bundle "
                                   "trained without it"}
            if name == "microcalc" and getattr(args, "microcalc_dump", None) is not None:
                out[name]["reason"] += (f" (its MIAS-dependent choices made without that fold; the networks' outputs "
                                        f"read from {args.microcalc_dump}, cut to breast mask v{MASK_VERSION}, and "
                                        "each fold bundle's cluster stage run on them)")
        elif saw_mias(manifest):
            if bundle:
                raise SystemExit(f"--{name}-bundle {bundle}: its manifest names mini-MIAS in its training; "
                                 f"scoring it on mini-MIAS would test it on its training images (give --{name}-folds)")
            out[name] = {"kind": OFF_LEAK, "path": None, "ship": ship,
                         "reason": f"{name} {manifest['version']} was trained or fine-tuned on mini-MIAS and no fold "
                                   f"bundles were given (--{name}-folds): scoring it on mini-MIAS would test it on its "
                                   "own training images, so it is kept off (not scored, not sent)"}
        else:
            out[name] = {"kind": HELD_OUT, "path": ship, "ship": ship,
                         "reason": f"{name} {manifest['version']} saw no mini-MIAS image: every image is held out "
                                   "(thresholds still chosen on the other folds)"}
    return out


def candidate_model(bundle_dir: Path, device: str = "cpu"):
    """A bundle's model at its plain manifest thresholds (no operating point applied), so its
    candidate regions start at the bundle's own candidate level whatever point the manifest's
    default is (the bench chooses the points)."""
    b = load_bundle(bundle_dir)
    plain = json.loads((b.path / "manifest.json").read_text())["thresholds"]
    b.manifest = dict(b.manifest, thresholds={k: float(v) for k, v in plain.items()},
                      operating_point={"name": "", "target": "", "off": []})
    return model_from_bundle(b, device)


def _cache_for(args, bundle_dir: Path) -> Path | None:
    """``--cache`` subfolder keyed by what sets a bundle's marks (weights digest, calibration,
    plain thresholds), so a changed bundle of the same name and version never reads old marks."""
    if args.cache is None:
        return None
    m = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    key = json.dumps([m["weights_sha256"], m.get("calibration"), m["thresholds"], m.get("architecture")], sort_keys=True)
    return args.cache / ("w" + hashlib.sha256(key.encode()).hexdigest()[:12])


def dumped_microcalc_marks(args, samples, images, source: dict) -> list[ModelMarks]:
    """microcalc fold bundles' marks from the networks' dumped working-grid maps
    (``--microcalc-dump``, benchmarks/microcalc_dump.py): each image through the cluster stage of
    the fold bundle that did not see it (:func:`microcalc_dump.output_from_dump`, cut to
    today's breast mask), then the node's breast restriction and mark extraction, as
    :func:`dicom_ai.data.evaluate.predict_marks` does. The fold bundles must carry the dumped
    networks (same weights digest as ``--microcalc-dump-source``)."""
    dumped = json.loads((args.microcalc_dump_source / "manifest.json").read_text())["weights_sha256"]
    models = {}
    for k in range(MIAS_FOLDS):
        folder = source["path"] / f"fold{k}"
        if json.loads((folder / "manifest.json").read_text())["weights_sha256"] != dumped:
            raise SystemExit(f"{folder}: its networks are not the dumped ones ({args.microcalc_dump_source}); "
                             "the dump cannot stand for them")
        models[k] = candidate_model(folder)
    out, shifted = [], 0
    for i, s in enumerate(samples):
        output, info = output_from_dump(models[images[i].fold], args.microcalc_dump / "mias" / f"{images[i].reference}.npz",
                                        s.image)
        shifted += any(info["box_shift_px"])
        output = restrict_to_breast(output, s.image)
        out.append(ModelMarks.from_prediction(_output_prediction(output), allowed_region(s.image)))
    print(f"microcalc marks from dumps: {len(samples)} images, breast box moved since the dump on {shifted}", flush=True)
    args.dump_box_moved = shifted
    return out


def marks_of(args, samples, images, name: str, source: dict) -> list[ModelMarks] | None:
    """Model ``name``'s marks on every sample from ``source`` (None when it is kept off)."""
    if source["kind"] == OFF_LEAK:
        return None
    if source["kind"] == FOLDS and name == "microcalc" and args.microcalc_dump is not None:
        return dumped_microcalc_marks(args, samples, images, source)
    out = []
    if source["kind"] == FOLDS:
        folders = {k: source["path"] / f"fold{k}" for k in range(MIAS_FOLDS)}
        pipes = {k: Pipeline([candidate_model(f)]) for k, f in folders.items()}
        for i, s in enumerate(samples):
            k = images[i].fold
            ((_, mm),) = predict_marks([s], pipes[k], cache=_cache_for(args, folders[k]))
            out.append(mm[name])
        return out
    pipe, cache = Pipeline([candidate_model(source["path"])]), _cache_for(args, source["path"])
    for _, mm in predict_marks(samples, pipe, cache=cache):
        out.append(mm[name])
    return out


def choose_default(result: dict, configs_name: str, max_normal: float) -> tuple[str, str]:
    """The default point: the loosest named point whose VALIDATION false marks per normal image
    (the shipped thresholds, chosen on all five folds, on those same images) are <= ``max_normal``
    and at which as many maps are on as at any point (every map with signal stays on); returns
    (name, reason). Held-out figures play no part in the choice."""
    val = result["validation_shipped"]
    most_on = max(v["maps_on"] for v in val.values())
    ok = [pn for pn in sorted(POINTS, key=POINTS.get)
          if val[pn]["false_marks_per_normal_image"] is not None
          and val[pn]["false_marks_per_normal_image"] <= max_normal and val[pn]["maps_on"] == most_on]
    if not ok:
        pn = min(POINTS, key=POINTS.get)
        return pn, (f"no named point keeps validation false marks per normal image <= {max_normal:g} with every "
                    f"map that has signal on; the strictest ({pn}) is the default")
    pn = ok[-1]
    return pn, (f"loosest named point whose validation false marks per normal image "
                f"({val[pn]['false_marks_per_normal_image']:.2f}, thresholds chosen on all 5 folds, scored on them) "
                f"are <= {max_normal:g} with the {most_on} map(s) that have signal on ({configs_name})")


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("DICOM_AI_MIAS", "/work/data/mias")))
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("DICOM_AI_MIAS_CACHE", "/work/data/mias_cache")))
    p.add_argument("--real", type=Path, default=Path("/work/shared/data/real"))
    p.add_argument("--dunet-folds", type=Path, action="append", default=None,
                   help="folder with fold0..fold4 U-Net bundles, each trained on the other folds (repeatable: one "
                        "config per folder; the last is the shipped models/dunet's recipe)")
    p.add_argument("--glam-folds", type=Path, default=None,
                   help="folder with fold0..fold4 GLAM bundles, each fine-tuned on the other folds")
    p.add_argument("--glam-bundle", type=Path, default=None,
                   help="with --glam-folds: the all-folds GLAM bundle the node would ship (it runs the shared real "
                        "images; default models/glam)")
    p.add_argument("--microcalc-folds", type=Path, default=None,
                   help="folder with fold0..fold4 microcalcification bundles, each trained on the other folds")
    p.add_argument("--microcalc-bundle", type=Path, default=None,
                   help="a microcalcification bundle trained with NO mini-MIAS image (every MIAS image held out; "
                        "thresholds still chosen on the other folds); it also runs the real images. Without it "
                        "the shipped models/microcalc is used (if it saw no MIAS image)")
    p.add_argument("--microcalc-dump", type=Path, default=None,
                   help="with --microcalc-folds: the microcalc networks' outputs dumped on every MIAS image "
                        "(benchmarks/microcalc_dump.py, e.g. /work/data/microcalc-real/dump); each fold bundle's "
                        "cluster stage runs on them instead of the networks (same marks, see output_from_dump)")
    p.add_argument("--microcalc-dump-source", type=Path, default=Path("/work/data/microcalc-real/bundle"),
                   help="the bundle whose networks made --microcalc-dump (the fold bundles must carry its weights)")
    p.add_argument("--compare-microcalc", type=Path, default=None,
                   help="another microcalcification bundle that saw no MIAS image, scored as a comparison config "
                        "(default: the shipped models/microcalc when --microcalc-bundle/--microcalc-folds replace it)")
    p.add_argument("--split", choices=["equal", "validation"], default="equal",
                   help="how the maps on share a point's budget: equally (default), or the split that finds the "
                        "most validation lesions (measured, overfits: see the module doc)")
    p.add_argument("--by-parts", nargs="*", default=["dunet/mass=0.25", "microcalc/calcification_cluster=0.125"],
                   metavar="MODEL/MAP=RATE",
                   help="also score, held out, these maps sent together, each at the threshold chosen ALONE on the "
                        "validation folds for its own false-mark rate (default: microcalc 0.3.0's shipped default, "
                        "the U-Net at the whole fp0.25 budget and the cluster map at half of it)")
    p.add_argument("--default-by-parts", action="store_true",
                   help="with --write-manifests: the default point sends the --by-parts maps, each at the "
                        "threshold chosen ALONE on all five folds for its own rate, and carries the held-out "
                        "--by-parts figures (the joint equal split switches the cluster map off at fp0.25; this "
                        "keeps every model with signal on at the default within --max-normal-fp)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="first N images only (a dry run; figures not valid)")
    p.add_argument("--no-real", action="store_true", help="skip the four shared real images")
    p.add_argument("--write-manifests", action="store_true",
                   help="write operating_points (and the node's CV figures) into the shipped bundles under models/")
    p.add_argument("--default-point", default="auto", choices=["auto", *sorted(POINTS)],
                   help="the default point; auto: chosen on validation folds (choose_default)")
    p.add_argument("--max-normal-fp", type=float, default=0.5,
                   help="auto default: most validation false marks per normal image at the default point")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--previews", type=Path, default=RESULTS.parent.parent / "build" / "mias_node",
                   help="PNG previews of the shared real images (never under benchmarks/results: not to be committed)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    args.previews.mkdir(parents=True, exist_ok=True)
    sources = model_sources(args)
    data = MIASDataset(args.root)
    n = len(data) if args.limit is None else min(args.limit, len(data))
    samples = [data[i] for i in range(n)]
    images = [Image_(s, data.fold_of[s.source.rsplit("/", 1)[-1].split(".")[0]]) for s in samples]
    per_model = {name: marks_of(args, samples, images, name, src) for name, src in sources.items()}
    # Configs: the shipped one last; before it, the same with each earlier --dunet-folds folder,
    # and with the shipped microcalc where another one replaces it (comparisons).
    comparisons: list[tuple[str, dict, dict]] = []
    for folder in (args.dunet_folds or [])[:-1]:
        src = {"kind": FOLDS, "path": folder, "ship": None, "reason": f"fold bundles {folder.name}/fold0..4"}
        comparisons.append(("dunet", src, {"dunet": marks_of(args, samples, images, "dunet", src)}))
    other_mc = args.compare_microcalc or MODELS_DIR / "microcalc"
    other = json.loads((other_mc / "manifest.json").read_text())
    if sources["microcalc"]["path"] != other_mc and not saw_mias(other):
        src = {"kind": HELD_OUT, "path": other_mc, "ship": other_mc,
               "reason": f"microcalc {other['version']} ({other_mc}), for comparison: saw no mini-MIAS image, "
                         "every image held out"}
        comparisons.append(("microcalc", src, {"microcalc": marks_of(args, samples, images, "microcalc", src)}))
    if sources["glam"]["kind"] == FOLDS:
        # The same configuration with GLAM off (today's shipped one), so GLAM's effect is read in one run.
        src = {"kind": OFF_LEAK, "path": None, "ship": None,
               "reason": "for comparison: GLAM kept off (the configuration shipped without GLAM fold bundles)"}
        comparisons.append(("glam", src, {"glam": None}))
    config_sources = [dict(sources, **{name: src}) for name, src, _ in comparisons] + [sources]
    config_marks = [dict(per_model, **extra) for _, _, extra in comparisons] + [per_model]
    configs = {}
    for srcs, pm in zip(config_sources, config_marks):
        on = [m for m in BUNDLES if pm.get(m) is not None]
        marks = [{m: pm[m][i] for m in on} for i in range(len(samples))]
        configs[_config_name(srcs)] = (srcs, marks)
    result: dict = {"benchmark": "node's sent marks on mini-MIAS, 5-fold CV (issue 14 part 2, issue 26)",
                    "data": {"images": len(images), "normal": int(sum(im.normal for im in images)),
                             "licence": data.licence,
                             "split": "dicom_ai.data.datasets.mias_folds (patient level, fixed 5 folds)"},
                    "budget_split": args.split,
                    "protocol": __doc__.split("Protocol (everything held out is held out by fold):")[1].split("    nice")[0].strip(),
                    "today": TODAY, "configs": {}}
    cvs = {name: cross_validate(images, mk, args.split) for name, (_, mk) in configs.items()}
    if args.by_parts:
        rates = {tuple(spec.split("=")[0].split("/", 1)): float(spec.split("=")[1]) for spec in args.by_parts}
        by_parts_figures, by_parts_sent = by_parts(images, list(configs.values())[-1][1], rates)
        result["by_parts"] = dict(by_parts_figures,
                                  config=list(configs)[-1])
    # Shipped thresholds: chosen on all five folds of the shipped (last) config; the default
    # point is chosen on their validation figures (the same images they were chosen on).
    ship_name = list(configs)[-1]
    ship_srcs, ship_marks = configs[ship_name]
    ship_tables = _tables(images, ship_marks)
    ship = {pn: choose_thresholds(ship_tables, range(len(images)), b, args.split) for pn, b in POINTS.items()}
    result["validation_shipped"] = {
        pn: {**score_sent(images, [sent_marks(ship_marks[i], thr) for i in range(len(images))], range(len(images))),
             "maps_on": sum(t != OFF for t in thr.values())} for pn, thr in ship.items()}
    if args.default_point == "auto":
        default, why = choose_default(result, ship_name, args.max_normal_fp)
    else:
        default, why = args.default_point, "given on the command line (--default-point)"
    if args.default_by_parts:
        if not args.by_parts:
            p.error("--default-by-parts needs --by-parts")
        bp = result["by_parts"]
        if bp["false_marks_per_normal_image"] > args.max_normal_fp:
            p.error(f"--default-by-parts: held-out false marks per normal image "
                    f"{bp['false_marks_per_normal_image']:.2f} exceed --max-normal-fp {args.max_normal_fp:g}")
        # The named point keeps its other maps' joint thresholds; the by-parts maps take their
        # own (each chosen alone on all five folds, as in held-out scoring, per fold).
        for spec, t in bp["thresholds_all_folds"].items():
            ship[default][tuple(spec.split("/", 1))] = OFF if t is None else t
        # The shipped config's held-out record of the point is the by-parts one (its figures,
        # per-map figures and marks: shares of sent marks, AUC, previews, manifests); the FROC
        # at the same budget stays the joint rule's.
        shipped_cv = cvs[list(configs)[-1]]
        shipped_cv["points"][default] = {k: v for k, v in bp.items() if k in shipped_cv["points"][default]}
        shipped_cv["sent"][default] = by_parts_sent
        result["validation_shipped"][default] = {
            **score_sent(images, [sent_marks(ship_marks[i], ship[default]) for i in range(len(images))],
                         range(len(images))),
            "maps_on": sum(t != OFF for t in ship[default].values())}
        why = (f"{default} with each of {', '.join(bp['rates'])} (false marks per image) at its threshold chosen "
               f"alone on the validation folds (--default-by-parts): held out {bp['false_marks_per_normal_image']:.2f} "
               f"false marks per normal image (<= {args.max_normal_fp:g}) with every map that has signal on; the "
               f"joint equal split switches the cluster map off at {default} ({why})")
    result["default_point"] = {"name": default, "reason": why, "max_false_marks_per_normal_image": args.max_normal_fp,
                               "by_parts": bool(args.default_by_parts)}
    worst_ref = None
    for name, (srcs, mk) in configs.items():
        cv = cvs[name]
        sent = cv.pop("sent")[default]
        ev = evaluate_lesions(zip(samples, mk), bootstrap=0, progress=False).summary()
        cv["models"] = {m: {"source": s["kind"], "reason": s["reason"],
                            "bundle": None if s["path"] is None else str(s["path"])} for m, s in srcs.items()}
        cv["per_model_froc_candidates"] = {m: {t: f["sensitivity_at"] for t, f in by.items()} for m, by in ev["froc"].items()}
        cv["mass_dice_per_model_at_0.5"] = ev["mass_dice"]
        cv["auc_sent_default"] = _auc(images, sent)
        total = sum(len(v) for v in sent.values())
        cv["share_of_sent_marks_default"] = {m: round(sum(m in f["models"] for v in sent.values() for f in v)
                                                      / max(total, 1), 4) for m in BUNDLES}
        cv["outside_breast_default"] = {
            "node_mask": sum(not _at(allowed_region(s.image), f["row"], f["col"]) for i, s in enumerate(samples)
                             for f in sent[i]),
            "independent_intensity_check": sum(_independent_outside(s, sent[i]) for i, s in enumerate(samples)),
            "marks_sent": total}
        result["configs"][name] = cv
        worst_ref = sent
    # Previews of the worst MIAS cases (most false marks at the default point, shipped config).
    sent = worst_ref
    falses = sorted(range(len(images)), key=lambda i: -sum(not any(_at(m, f["row"], f["col"]) for m in images[i].any)
                                                            for f in sent[i]))[:4]
    for old in args.previews.glob("mias_node_worst_*.png"):
        old.unlink()
    previews = []
    for i in falses:
        path = args.previews / f"mias_node_worst_{images[i].reference}.png"
        _preview(samples[i].image.pixels, allowed_region(samples[i].image), sent[i], path,
                 f"{images[i].reference}: {len(sent[i])} marks at {default}")
        previews.append(path.name)
    result["previews"] = previews
    result["pectoral_found"] = int(sum(bool(s.image.pectoral_mask.any()) for s in samples))
    result["shipped_thresholds"] = {"config": ship_name,
                                    "bundles": {m: None if s["kind"] == OFF_LEAK else _ident(s["ship"])
                                                for m, s in ship_srcs.items()},
                                    "points": {pn: {f"{m}/{k}": (None if t == OFF else t) for (m, k), t in thr.items()}
                                               for pn, thr in ship.items()},
                                    "note": "null: switched off; models kept off are not listed"}
    # The four shared real images at the default point, run by the bundles the node ships.
    real = {}
    models_on = [m for m, s in ship_srcs.items() if s["kind"] != OFF_LEAK
                 and any(t != OFF for (mm, _), t in ship[default].items() if mm == m)]
    ship_models = {m: candidate_model(ship_srcs[m]["ship"]) for m in models_on}
    for png in [] if args.no_real else sorted(args.real.glob("*.png")):
        arr = np.asarray(Image.open(png)).astype(np.float32)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        lat = "L" if "_L_" in png.name else "R"
        # 0.07 mm: the 3328 x 2560 detector's nominal pixel, as RealPNGDataset and the node's own
        # DICOMs of these images use (the PNGs carry none; 0.1 mm before issue 26f noticed it).
        m = mammogram_from_array(arr, lat, "CC", (0.07, 0.07))
        # The file name's laterality plays the header's part, cross-checked against the pixels.
        m.faces_left, m.orientation = orient(lat == "R", m.breast_mask)
        by_model = {}
        for name, model in ship_models.items():
            out = restrict_to_breast(model.predict(m), m)
            by_model[name] = ModelMarks.from_prediction(_output_prediction(out), allowed_region(m))
        s = sent_marks(by_model, ship[default])
        path = args.previews / f"mias_node_real_{png.stem}.png"
        _preview(m.pixels, allowed_region(m), s, path, f"{png.stem}: {len(s)} marks at {default}")
        real[png.stem] = {"marks": len(s), "by_model": {k: sum(k in f["models"] for f in s) for k in by_model},
                          "orientation": m.orientation, "preview": path.name}
    result["shared_real_images"] = {"note": "four CC FFDM images, one benign mass in exam 1 R (no masks): "
                                            "every mark counted as a false mark except by-eye hits; run by the "
                                            "shipped bundles of the models on at the default point",
                                    "point": default, "models_run": models_on, "images": real,
                                    "previews_in": str(args.previews),
                                    "marks_per_image": round(sum(v["marks"] for v in real.values()) / max(len(real), 1), 3)}
    if getattr(args, "dump_box_moved", None) is not None:
        result["microcalc_from_dump"] = {
            "dump": str(args.microcalc_dump), "networks": str(args.microcalc_dump_source),
            "mask_version_of_dump": 3, "mask_version_now": MASK_VERSION,
            "images_breast_box_moved": args.dump_box_moved,
            "how": "benchmarks/microcalc_dump.py output_from_dump: the dumped working-grid map cut to the breast box "
                   "of today's mask and set to 0 outside it, then each fold bundle's cluster stage; the node's marks "
                   "checked on a few images in results/microcalc_dump_check.json",
            "calcification_map": "the per-calcification map is 0 below the dump's floor (0.2), so its candidates "
                                 "start at 0.2 instead of 0.1"}
    result["seconds"] = round(time.time() - t0, 1)
    (args.out / "mias_node.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "mias_node.md").write_text(_table(result))
    print(_table(result))
    if args.write_manifests:
        _write_manifests(ship, result, ship_name, ship_srcs, default)
    return 0


def _ident(bundle_dir: Path) -> str:
    m = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    return f"{m['name']} {m['version']} ({bundle_dir})"


def _config_name(srcs: dict) -> str:
    """A config's name: per model its version and where its MIAS marks come from."""
    parts = []
    for m, s in srcs.items():
        if s["kind"] == OFF_LEAK:
            parts.append(f"{m} off (saw MIAS, no folds)")
        elif s["kind"] == FOLDS:
            v = json.loads((s["path"] / "fold0" / "manifest.json").read_text())["version"]
            parts.append(f"{m} {v.replace('fold0', 'fold*')} (CV folds)")
        else:
            v = json.loads((s["path"] / "manifest.json").read_text())["version"]
            parts.append(f"{m} {v} (held out)")
    return "; ".join(parts)


def _table(result: dict) -> str:
    """Markdown: the node's held-out figures per config next to today's and the part-1 baseline."""
    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    default = result["default_point"]["name"]
    lines = ["# mini-MIAS, what the node sends (5-fold CV, held-out folds pooled)", "",
             f"Default point: **{default}** ({result['default_point']['reason']}).", "",
             "| marks | mass sens @ 0.125 / 0.25 / 0.5 / 1 / 2 / 4 FP/img | calc-cluster sens @ 0.125 / 0.25 / 0.5 / 1 / 2 / 4 | "
             "FP/image @ default: normals (all images) | AUC abnormal (image) @ default | share of sent marks "
             "glam / dunet / microcalc | marks outside breast (node mask / independent) |",
             "|---|---|---|---|---|---|---|"]
    base_path = RESULTS / "mias_baseline.json"
    if base_path.is_file():
        b = json.loads(base_path.read_text())["pooled"]
        mass = b["froc"][UNION]["mass"]["sensitivity_at"]
        calc = b["froc"][UNION]["calcification_cluster"]["sensitivity_at"]
        auc = b["auc"][UNION]["abnormal (image)"]
        rob = b["robustness"][UNION]
        lines.append(f"| baseline (part 1): phantom bundles, threshold mask, thresholds 0.5, no merging, FROC over "
                     f"candidates | {' / '.join(f(mass.get(k)) for k in ('0.125', '0.25', '0.5', '1.0', '2.0', '4.0'))} | "
                     f"{' / '.join(f(calc.get(k)) for k in ('0.125', '0.25', '0.5', '1.0', '2.0', '4.0'))} | "
                     f"{f(rob['false_marks_per_normal_image'])} (at 0.5) | "
                     f"{f(auc['value'])} [{f(auc['ci95'][0])}, {f(auc['ci95'][1])}] | - | "
                     f"{rob['marks_outside_breast']} / n.a. of {rob['marks_sent']} |")
    t = result.get("today")
    if t:
        lines.append(f"| today ({t['config']}) | {' / '.join(f(v) for v in t['mass'])} | "
                     f"{' / '.join(f(v) for v in t['calcification_cluster'])} | "
                     f"{f(t['fp_normal_default'])} ({f(t['fp_all_default'])}) at {t['default']} | "
                     f"{f(t['auc'][0])} [{f(t['auc'][1])}, {f(t['auc'][2])}] at {t['default']} | "
                     f"{' / '.join(f(v) for v in t['share'])} | {t['outside']} |")
    for name, c in result["configs"].items():
        fr = c["froc"]
        mass = [fr[k]["sensitivity"]["mass"] for k in ("0.125", "0.25", "0.5", "1.0", "2.0", "4.0")]
        calc = [fr[k]["sensitivity"]["calcification_cluster"] for k in ("0.125", "0.25", "0.5", "1.0", "2.0", "4.0")]
        d = c["points"][default]
        a = c["auc_sent_default"]["abnormal"]
        o = c["outside_breast_default"]
        share = c["share_of_sent_marks_default"]
        lines.append(f"| {name} | {' / '.join(f(v) for v in mass)} | {' / '.join(f(v) for v in calc)} | "
                     f"{f(d['false_marks_per_normal_image'])} ({f(d['false_marks_per_image'])}) | "
                     f"{f(a['value'])} [{f(a['ci95'][0])}, {f(a['ci95'][1])}] | "
                     f"{' / '.join(f(share[m]) for m in BUNDLES)} | "
                     f"{o['node_mask']} / {o['independent_intensity_check']} of {o['marks_sent']} |")
    last = list(result["configs"].values())[-1]
    lines += ["", "Models in the shipped (last) config:"]
    lines += [f"- {m}: {s['source']}: {s['reason']}" for m, s in last["models"].items()]
    val = result.get("validation_shipped", {})
    if val:
        lines += ["", "Validation figures of the shipped thresholds (chosen on all 5 folds, scored on them; what "
                  "the default point is chosen on): " + "; ".join(
                      f"{pn}: {f(v['false_marks_per_normal_image'])} false marks per normal image, "
                      f"{f(v['false_marks_per_image'])} per image, mass {f(v['sensitivity']['mass'])}, "
                      f"{v['maps_on']} map(s) on" for pn, v in val.items())]
    bp = result.get("by_parts")
    if bp:
        lines += ["", "Maps at thresholds chosen per map ALONE (" + ", ".join(f"{k} at {v:g} false marks per image"
                  for k, v in bp["rates"].items()) + "), sent together, held out: mass "
                  f"{f(bp['sensitivity']['mass'])}, clusters {f(bp['sensitivity']['calcification_cluster'])}, "
                  f"{f(bp['false_marks_per_normal_image'])} false marks per normal image "
                  f"({f(bp['false_marks_per_image'])} per image), AUC {f(bp['auc']['abnormal']['value'])} "
                  f"[{f(bp['auc']['abnormal']['ci95'][0])}, {f(bp['auc']['abnormal']['ci95'][1])}]."]
    real = result.get("shared_real_images", {})
    if real.get("images"):
        lines += ["", f"Four shared real CC images at {real['point']} (run by the shipped bundles of "
                  f"{', '.join(real['models_run']) or 'no model'}): "
                  + ", ".join(f"{k} {v['marks']} marks ({v['orientation']})" for k, v in real["images"].items())
                  + f"; {real['marks_per_image']} marks per image."]
    lines += ["", f"Pectoral muscle found on {result.get('pectoral_found')} of {result['data']['images']} MLO images.",
              "Baseline FROC reads each model's candidates at any threshold; the node rows are operating points "
              "chosen on validation folds (a stricter protocol), held-out folds pooled. Sensitivities per lesion "
              "type: masses 58, calcification clusters 27 located (mini-MIAS Info.txt)."]
    return "\n".join(lines) + "\n"


def _write_manifests(ship, result, ship_name, ship_srcs, default) -> None:
    """The shipped bundles' ``operating_points`` (and the node's CV figures in ``metrics``).

    Only bundles under models/ are written; a model kept off gets every finding off at every
    point, with the reason."""
    cv = result["configs"][ship_name]
    for bundle, src in ship_srcs.items():
        path = Path(src["ship"]) / "manifest.json"
        if Path(src["ship"]).resolve().parent != MODELS_DIR.resolve():
            print(f"not writing {path}: not a shipped bundle under {MODELS_DIR}")
            continue
        manifest = json.loads(path.read_text())
        findings: dict = {}
        if src["kind"] == OFF_LEAK:
            for k in manifest["thresholds"]:
                findings[k] = [{"name": pn, "off": True, "target": f"node <= {b:g} false marks per image (mini-MIAS); "
                                "off: trained on mini-MIAS without fold bundles, not validated on held-out images"}
                               for pn, b in POINTS.items()]
        for pn, thr in ship.items():
            held = cv["points"][pn]
            by_parts_here = pn == default and result["default_point"].get("by_parts")
            for (m, k), t in thr.items():
                if m != manifest["name"]:
                    continue
                per_map = held["per_map_held_out"].get(f"{m}/{k}", {})
                findings.setdefault(k, []).append({
                    "name": pn, **({"off": True} if t == OFF else {"threshold": round(t, 6)}),
                    "target": (f"this map alone <= {result['by_parts']['rates'][f'{m}/{k}']:g} false marks per image "
                               f"(mini-MIAS, --default-by-parts)"
                               if by_parts_here and f"{m}/{k}" in result["by_parts"]["rates"] else
                               f"node <= {POINTS[pn]:g} false marks per image (mini-MIAS), this map's share")
                              + (" (off: adds no lesion on the validation folds at its share of the budget: no "
                                 "signal, or no threshold strict enough)"
                                 if t == OFF else ""),
                    "sensitivity": per_map.get("sensitivity_mean_over_folds"),
                    "false_marks_per_image": per_map.get("false_marks_per_image"),
                    "node_held_out": {"sensitivity": held["sensitivity"],
                                      "false_marks_per_image": held["false_marks_per_image"],
                                      "false_marks_per_normal_image": held["false_marks_per_normal_image"]},
                    "data": "threshold chosen on all 5 mini-MIAS folds (322 MLO images); sensitivity and false marks: "
                            "5-fold CV, each held-out fold at thresholds chosen on the other 4 "
                            "(benchmarks/bench_mias_node.py)"})
        if not findings:
            continue
        # Points this bench does not choose (e.g. "phantom": every finding on at the bundle's own
        # threshold, used by tests and by sites debugging a model) are kept; a bundle without one
        # gets "phantom" at its plain manifest threshold.
        kept = dict(manifest.get("operating_points") or {}).get("findings", {})
        for k in findings:
            extra = [pt for pt in kept.get(k, []) if pt.get("name") not in POINTS]
            if not any(pt.get("name") == "phantom" for pt in extra):
                extra.append({"name": "phantom", "threshold": float(manifest["thresholds"][k]), "sensitivity": None,
                              "data": "none on real images", "target": "the bundle's own threshold (its candidate "
                              "level): every finding on; not validated on real images"})
            findings[k] += extra
        manifest["operating_points"] = {
            "default": default, "default_reason": result["default_point"]["reason"], "findings": findings,
            "licence": result["data"]["licence"], "how_validated": src["reason"],
            "note": "Named points fp0.25/fp0.5/fp1/fp2: node budgets of false marks per image on mini-MIAS, chosen by "
                    "benchmarks/bench_mias_node.py; 'off' = the map is not sent (no signal on MIAS validation folds, "
                    "or not validated on held-out images); 'phantom' = every finding on at the bundle's own threshold "
                    "(not validated on real images)."}
        manifest.setdefault("metrics", {})["node_cross_validation"] = {
            "config": ship_name, "source": "benchmarks/results/mias_node.json", "this_model": src["reason"],
            "node_sensitivity_at_budget": {b: c["sensitivity"] for b, c in cv["froc"].items()},
            "node_false_marks_per_image_at_budget": {b: c["false_marks_per_image"] for b, c in cv["froc"].items()},
            "node_false_marks_per_normal_image_at_budget": {b: c["false_marks_per_normal_image"]
                                                            for b, c in cv["froc"].items()},
            "share_of_sent_marks_default": cv["share_of_sent_marks_default"].get(bundle)}
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        print(f"wrote operating points of {path} (default {default})")


if __name__ == "__main__":
    raise SystemExit(main())
