"""What the node sends on real mammograms (mini-MIAS 5-fold CV): marks after breast filtering,
merging and operating points chosen on validation folds (issue 14 part 2).

Protocol (everything held out is held out by fold):

* Marks: each bundle's marks of :func:`dicom_ai.data.evaluate.predict_marks` (maps restricted to
  the breast mask less the pectoral muscle, as :class:`dicom_ai.networks.Pipeline` does), i.e.
  connected regions of each map at p >= 0.1 (or at the bundle's threshold where lower: a
  calibrated map) scored by their peak; a map at threshold t sends the regions whose peak is
  >= t, and no threshold is chosen below that candidate level.
* Operating points (:func:`choose_thresholds`): for a node-level budget R false marks per image,
  on the validation images each map alone is checked at budget R; a map that finds under 5 % of
  its lesion type there is switched off (threshold above its highest score); the others share R
  equally, each at the lowest threshold whose validation false marks per image stay within its
  share. For held-out fold k the thresholds are chosen on the other four folds; the shipped
  thresholds are chosen on all five folds.
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

    nice -n 10 python benchmarks/bench_mias_node.py --root /work/data/mias --cache /work/data/mias_cache

Writes benchmarks/results/mias_node.json, mias_node.md and PNG previews; with
``--write-manifests`` also the shipped bundles' ``operating_points``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image, ImageDraw

from dicom_ai.data.datasets import MIAS_FOLDS, MIASDataset
from dicom_ai.data.evaluate import FROC_CANDIDATE_THRESHOLD, UNION, ModelMarks, _output_prediction, evaluate_lesions, lesions_of, predict_marks
from dicom_ai.data.metrics import LESION_FROC_RATES, bootstrap_ci, roc_auc
from dicom_ai.imaging.mammogram import mammogram_from_array, orient
from dicom_ai.networks import Pipeline
from dicom_ai.networks.bundle import MODELS_DIR, load_bundle
from dicom_ai.networks.pipeline import allowed_region, restrict_to_breast

RESULTS = Path(__file__).resolve().parent / "results"
BUNDLES = ("glam", "dunet", "microcalc")
#: Node-level budgets (false marks per image) of the named operating points.
POINTS = {"fp0.25": 0.25, "fp0.5": 0.5, "fp1": 1.0, "fp2": 2.0}
DEFAULT_POINT = "fp1"  # figures, worst cases and real images are shown at this point
TYPE_OF = {"malignant_lesion": "mass", "benign_lesion": "mass", "mass": "mass",
           "calcification_cluster": "calcification_cluster", "calcification": "calcification_cluster"}
MERGE_KIND = {"malignant_lesion": "lesion", "benign_lesion": "lesion", "mass": "lesion", "calcification_cluster": "cluster"}
OFF = float("inf")  # switched off: the map is not sent (manifest "off": true)
MIN_USEFUL = 0.05


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


def choose_thresholds(tables: dict, idx, budget: float) -> dict[tuple[str, str], float]:
    """Per (model, map) threshold for a node budget of ``budget`` false marks per image (module doc)."""
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

    useful = [mk for mk, tab in tables.items() if tab.stats(idx, lowest(tab, budget))[1] >= MIN_USEFUL]
    out = {mk: OFF for mk in tables}
    for mk in useful:
        out[mk] = lowest(tables[mk], budget / len(useful))
    return out


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


def cross_validate(images, marks) -> dict:
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
            thr = choose_thresholds(tables, val, budget)
            out["per_fold_thresholds"].setdefault(str(budget), {})[str(k)] = {f"{m}/{key}": (None if t == OFF else t) for (m, key), t in thr.items()}
            for i in held:
                sent[i] = sent_marks(marks[i], thr)
            for (m, key), t in thr.items():
                fp, sens = tables[(m, key)].stats(np.asarray(held), t)
                acc = per_map_held.setdefault(f"{m}/{key}", [])
                acc.append((len(held), fp, sens))
        result = score_sent(images, sent, range(len(images)))
        result["per_map_held_out"] = {
            mk: {"false_marks_per_image": round(sum(n * fp for n, fp, _ in v) / sum(n for n, _, _ in v), 4),
                 "sensitivity_mean_over_folds": round(float(np.mean([s for _, _, s in v])), 4)}
            for mk, v in per_map_held.items()}
        out["froc"][str(budget)] = result
        for name, b in POINTS.items():
            if b == budget:
                out["points"][name] = result
        if budget == POINTS[DEFAULT_POINT]:
            out["sent_default"] = sent
    return out


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("DICOM_AI_MIAS", "/work/data/mias")))
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("DICOM_AI_MIAS_CACHE", "/work/data/mias_cache")))
    p.add_argument("--real", type=Path, default=Path("/work/shared/data/real"))
    p.add_argument("--dunet-folds", type=Path, action="append", default=None,
                   help="folder with fold0..fold4 U-Net bundles fine-tuned on the other folds (CV of the MIAS U-Net)")
    p.add_argument("--glam-folds", type=Path, default=None,
                   help="folder with fold0..fold4 GLAM bundles fine-tuned on the other folds "
                        "(benchmarks/bench_glam_mias.py); adds a config with both MIAS-tuned models, the shipped one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="first N images only (a dry run; figures not valid)")
    p.add_argument("--no-real", action="store_true", help="skip the four shared real images")
    p.add_argument("--write-manifests", action="store_true", help="write operating_points into models/*/manifest.json")
    p.add_argument("--default-point", default="fp1", choices=sorted(POINTS), help="the manifests' default point")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    data = MIASDataset(args.root)
    pipeline = Pipeline.from_bundles(BUNDLES, device="cpu")
    samples, images, marks = [], [], []
    n = len(data) if args.limit is None else min(args.limit, len(data))
    for sample, by_model in predict_marks((data[i] for i in range(n)), pipeline, cache=args.cache):
        samples.append(sample)
        images.append(Image_(sample, data.fold_of[sample.source.rsplit("/", 1)[-1].split(".")[0]]))
        marks.append(by_model)
    configs = {"phantom bundles (breast-filtered)": marks}
    for folder in args.dunet_folds or []:
        tuned = []
        fold_pipes = {k: Pipeline.from_bundles([str(folder / f"fold{k}")], device="cpu") for k in range(MIAS_FOLDS)}
        epochs = load_bundle(folder / "fold0").manifest["training"]["epochs"]
        for i, s in enumerate(samples):
            ((_, mm),) = predict_marks([s], fold_pipes[images[i].fold], cache=args.cache)
            tuned.append({**{k: v for k, v in marks[i].items() if k != "dunet"}, "dunet": mm["dunet"]})
        configs[f"MIAS-tuned U-Net {epochs} epochs (CV) + phantom GLAM/microcalc"] = tuned
    if args.glam_folds and len(configs) > 1:
        glam_pipes = {k: Pipeline.from_bundles([str(args.glam_folds / f"fold{k}")], device="cpu")
                      for k in range(MIAS_FOLDS)}
        both = []
        for i, s in enumerate(samples):
            ((_, mm),) = predict_marks([s], glam_pipes[images[i].fold], cache=args.cache)
            both.append({**tuned[i], "glam": mm["glam"]})
        configs["MIAS-tuned U-Net and GLAM (CV) + phantom microcalc"] = both
    result: dict = {"benchmark": "node's sent marks on mini-MIAS, 5-fold CV (issue 14 part 2)",
                    "data": {"images": len(images), "normal": int(sum(im.normal for im in images)),
                             "licence": data.licence,
                             "split": "dicom_ai.data.datasets.mias_folds (patient level, fixed 5 folds)"},
                    "protocol": __doc__.split("Protocol (everything held out is held out by fold):")[1].split("    nice")[0].strip(),
                    "configs": {}}
    worst_ref = None
    for name, mk in configs.items():
        cv = cross_validate(images, mk)
        sent = cv.pop("sent_default")
        ev = evaluate_lesions(zip(samples, mk), bootstrap=0, progress=False).summary()
        cv["per_model_froc_candidates"] = {m: {t: f["sensitivity_at"] for t, f in by.items()} for m, by in ev["froc"].items()}
        cv["mass_dice_per_model_at_0.5"] = ev["mass_dice"]
        cv["auc_sent_default"] = _auc(images, sent)
        cv["outside_breast_default"] = {
            "node_mask": sum(not _at(allowed_region(s.image), f["row"], f["col"]) for s, i in zip(samples, range(len(samples)))
                             for f in sent[i]),
            "independent_intensity_check": sum(_independent_outside(s, sent[i]) for i, s in enumerate(samples)),
            "marks_sent": sum(len(v) for v in sent.values())}
        result["configs"][name] = cv
        worst_ref = (name, sent)
    # Previews of the worst MIAS cases (most false marks at the default point, last config).
    name, sent = worst_ref
    falses = sorted(range(len(images)), key=lambda i: -sum(not any(_at(m, f["row"], f["col"]) for m in images[i].any)
                                                            for f in sent[i]))[:4]
    previews = []
    for i in falses:
        path = args.out / f"mias_node_worst_{images[i].reference}.png"
        _preview(samples[i].image.pixels, allowed_region(samples[i].image), sent[i], path,
                 f"{images[i].reference}: {len(sent[i])} marks at {DEFAULT_POINT}")
        previews.append(path.name)
    result["previews"] = previews
    # Pectoral detections.
    result["pectoral_found"] = int(sum(bool(s.image.pectoral_mask.any()) for s in samples))
    # Shipped thresholds: chosen on all five folds, per config; manifests get the tuned config's.
    ship_name = list(configs)[-1]
    ship_tables = _tables(images, configs[ship_name])
    ship = {pn: choose_thresholds(ship_tables, range(len(images)), b) for pn, b in POINTS.items()}
    result["shipped_thresholds"] = {"config": ship_name,
                                    "points": {pn: {f"{m}/{k}": (None if t == OFF else t) for (m, k), t in thr.items()}
                                               for pn, thr in ship.items()},
                                    "note": "null: switched off"}
    # The four shared real images at the default point.
    real = {}
    pipes = Pipeline.from_bundles(BUNDLES, device="cpu")
    for png in [] if args.no_real else sorted(args.real.glob("*.png")):
        arr = np.asarray(Image.open(png)).astype(np.float32)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        lat = "L" if "_L_" in png.name else "R"
        m = mammogram_from_array(arr, lat, "CC", (0.1, 0.1))
        # The file name's laterality plays the header's part, cross-checked against the pixels.
        m.faces_left, m.orientation = orient(lat == "R", m.breast_mask)
        by_model = {}
        for model in pipes.models:
            out = restrict_to_breast(model.predict(m), m)
            by_model[model.identity.name] = ModelMarks.from_prediction(_output_prediction(out), allowed_region(m))
        if "dunet" in by_model and args.dunet_folds:
            tuned_pipe = Pipeline.from_bundles([str(args.dunet_folds[0] / "fold0")], device="cpu")
            out = restrict_to_breast(tuned_pipe.models[0].predict(m), m)
            by_model["dunet"] = ModelMarks.from_prediction(_output_prediction(out), allowed_region(m))
        s = sent_marks(by_model, ship[args.default_point])
        path = args.out / f"mias_node_real_{png.stem}.png"
        _preview(m.pixels, allowed_region(m), s, path, f"{png.stem}: {len(s)} marks at {args.default_point}")
        real[png.stem] = {"marks": len(s), "by_model": {k: sum(k in f["models"] for f in s) for k in by_model},
                          "orientation": m.orientation, "preview": path.name}
    result["shared_real_images"] = {"note": "four CC FFDM images, one benign mass in exam 1 R (no masks): "
                                            "every mark counted as a false mark except by-eye hits",
                                    "images": real,
                                    "marks_per_image": round(sum(v["marks"] for v in real.values()) / max(len(real), 1), 3)}
    result["seconds"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mias_node.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "mias_node.md").write_text(_table(result))
    print(_table(result))
    if args.write_manifests:
        _write_manifests(ship, result, ship_name, args)
    print(json.dumps({n: {"points": c["points"], "outside": c["outside_breast_default"]} for n, c in result["configs"].items()},
                     indent=1))
    return 0


def _table(result: dict) -> str:
    """Markdown: the node's held-out figures per config next to the part-1 baseline."""
    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    lines = ["# mini-MIAS, what the node sends (5-fold CV, held-out folds pooled)", "",
             "| marks | mass sens @ 0.25 / 0.5 / 1 / 2 / 4 FP/img | calc-cluster sens @ 1 / 4 | FP/image on normals "
             "@ default | AUC abnormal (image) | marks outside breast (node mask / independent) |",
             "|---|---|---|---|---|---|"]
    base_path = RESULTS / "mias_baseline.json"
    if base_path.is_file():
        b = json.loads(base_path.read_text())["pooled"]
        mass = b["froc"][UNION]["mass"]["sensitivity_at"]
        calc = b["froc"][UNION]["calcification_cluster"]["sensitivity_at"]
        auc = b["auc"][UNION]["abnormal (image)"]
        rob = b["robustness"][UNION]
        lines.append(f"| baseline (part 1): phantom bundles, threshold mask, thresholds 0.5, no merging, FROC over "
                     f"candidates | {' / '.join(f(mass[k]) for k in ('0.25', '0.5', '1.0', '2.0', '4.0'))} | "
                     f"{f(calc['1.0'])} / {f(calc['4.0'])} | {f(rob['false_marks_per_normal_image'])} (at 0.5) | "
                     f"{f(auc['value'])} [{f(auc['ci95'][0])}, {f(auc['ci95'][1])}] | "
                     f"{rob['marks_outside_breast']} / n.a. of {rob['marks_sent']} |")
    for name, c in result["configs"].items():
        fr = c["froc"]
        mass = [fr[k]["sensitivity"]["mass"] for k in ("0.25", "0.5", "1.0", "2.0", "4.0")]
        calc = [fr[k]["sensitivity"]["calcification_cluster"] for k in ("1.0", "4.0")]
        d = c["points"][DEFAULT_POINT]
        a = c["auc_sent_default"]["abnormal"]
        o = c["outside_breast_default"]
        lines.append(f"| {name}: breast-filtered, merged, thresholds chosen on the other folds | "
                     f"{' / '.join(f(v) for v in mass)} | {' / '.join(f(v) for v in calc)} | "
                     f"{f(d['false_marks_per_normal_image'])} ({DEFAULT_POINT}; all images {f(d['false_marks_per_image'])}) | "
                     f"{f(a['value'])} [{f(a['ci95'][0])}, {f(a['ci95'][1])}] | "
                     f"{o['node_mask']} / {o['independent_intensity_check']} of {o['marks_sent']} |")
    real = result.get("shared_real_images", {})
    if real.get("images"):
        lines += ["", f"Four shared real CC images at {DEFAULT_POINT}: "
                  + ", ".join(f"{k} {v['marks']} marks ({v['orientation']})" for k, v in real["images"].items())
                  + f"; {real['marks_per_image']} marks per image."]
    lines += ["", f"Pectoral muscle found on {result.get('pectoral_found')} of {result['data']['images']} MLO images.",
              "Baseline FROC reads each model's candidates at any threshold; the node rows are operating points "
              "chosen on validation folds (a stricter protocol). Sensitivities per lesion type: masses 58, "
              "calcification clusters 27 located (mini-MIAS Info.txt)."]
    return "\n".join(lines) + "\n"


def _write_manifests(ship, result, ship_name, args) -> None:
    cv = result["configs"][ship_name]
    for bundle in BUNDLES:
        path = MODELS_DIR / bundle / "manifest.json"
        manifest = json.loads(path.read_text())
        findings: dict = {}
        for pn, thr in ship.items():
            held = cv["points"][pn]
            for (m, k), t in thr.items():
                if m != manifest["name"]:
                    continue
                per_map = held["per_map_held_out"].get(f"{m}/{k}", {})
                findings.setdefault(k, []).append({
                    "name": pn, **({"off": True} if t == OFF else {"threshold": round(t, 4)}),
                    "target": f"node <= {POINTS[pn]:g} false marks per image (mini-MIAS), this map's share"
                              + (" (off: no signal on validation, or no threshold strict enough: saturated scores)"
                                 if t == OFF else ""),
                    "sensitivity": per_map.get("sensitivity_mean_over_folds"),
                    "false_marks_per_image": per_map.get("false_marks_per_image"),
                    "node_held_out": {"sensitivity": held["sensitivity"],
                                      "false_marks_per_image": held["false_marks_per_image"],
                                      "false_marks_per_normal_image": held["false_marks_per_normal_image"]},
                    "data": "threshold chosen on all 5 mini-MIAS folds (322 MLO images); sensitivity and false marks: "
                            "5-fold CV, each held-out fold at thresholds chosen on the other 4 "
                            "(benchmarks/bench_mias_node.py)"})
        if findings:
            manifest["operating_points"] = {"default": args.default_point, "findings": findings,
                                            "licence": result["data"]["licence"]}
            manifest["thresholds"] = {k: v for k, v in manifest["thresholds"].items()}
            path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
