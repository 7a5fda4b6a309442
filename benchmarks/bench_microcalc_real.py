"""Microcalcification bundles on real anatomy: mini-MIAS clusters, held-out hybrids, the shared images.

Compares bundles (default: the shipped phantom-only ``microcalc`` 0.1.0 and the bundle trained on
clusters inserted into real backgrounds, /work/data/microcalc-real/bundle) on the same images in
one run, at cluster level:

* **mini-MIAS** (322 MLO films at 0.2 mm, 27 located calcification clusters = Info.txt CALC
  circles; never used in training of either bundle, so every image is held out): cluster FROC
  at 0.125-4 false clusters per image over all 322 images
  (:func:`dicom_ai.data.evaluate.evaluate_lesions`: a mark of the ``calcification_cluster`` map
  is a hit when its centroid lies in the circle; marks on other lesion types are ignored),
  the operating point, and image AUC with bootstrap 95 % CI of images with a CALC cluster
  against the 207 normal images (score: the cluster map's peak; also the calcification map's).
* **held-out hybrids**: calcification clusters inserted (``seed`` 777, not the training seed)
  into the backgrounds of the held-out fold (``--holdout-fold``, patient_folds of
  cbis-ddsm-cases and real-png-normals: one CBIS woman and one FFDM image) at their own pixel
  size, and the same images degraded to 0.2 mm and 8 bits (as a film scan like mini-MIAS);
  cluster FROC and AUC (image with an inserted cluster vs without). A sanity figure only.
* **the four shared FFDM images** (/work/shared/data/real): clusters found per image and a PNG
  preview per image (build/previews/microcalc_real_<name>.png) with each bundle's cluster
  outlines, to judge by eye (1_R_CC holds a benign finding without an outline; the others are
  normal).

Marks are cached per bundle weight digest under ``--cache`` (outside the repository), so a
rerun only scores. ``--limit N`` scores the first N MIAS images only (dry runs).

    nice -n 10 python benchmarks/bench_microcalc_real.py [--limit 20] [--skip-hybrids]

Writes benchmarks/results/microcalc_real.json and prints a short table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pydicom.uid
import torch
from matplotlib.figure import Figure

from dicom_ai.data import metrics as M
from dicom_ai.data.datasets import MIASDataset, open_dataset, patient_folds
from dicom_ai.data.evaluate import evaluate_lesions, lesions_of, predict_marks
from dicom_ai.data.sample import Sample
from dicom_ai.imaging import mammogram_from_array, resize
from dicom_ai.imaging.mask import MASK_VERSION
from dicom_ai.networks import Pipeline
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.microcalc import MicrocalcModel

RESULTS = Path(__file__).resolve().parent / "results"
# Pictures of real images (the shared FFDM exams, mini-MIAS) are derived data: their sources may not be
# committed, so they go to build/ (ignored), never to benchmarks/results.
PREVIEWS = Path(__file__).resolve().parent.parent / "build" / "previews"
CLUSTER = "calcification_cluster"
DEFAULT_BUNDLES = ("shipped=microcalc", "real=/work/data/microcalc-real/bundle")


def _load(spec: str) -> tuple[str, MicrocalcModel, dict]:
    """``LABEL=BUNDLE`` -> (label, model, facts). A bundle whose default operating point
    switches the cluster map off (0.1.0) is read at its own ``phantom`` point (0.5)."""
    label, _, where = spec.partition("=")
    probe = load_bundle(where)
    points = [p["name"] for p in probe.manifest.get("operating_points", {}).get("findings", {}).get(CLUSTER, [])]
    off = CLUSTER in probe.manifest.get("operating_point", {}).get("off", ())
    bundle = load_bundle(where, operating_point="phantom") if off and "phantom" in points else probe
    model = MicrocalcModel.from_bundle(bundle, "cpu")
    facts = {"bundle": where if not os.path.isabs(where) else Path(where).name,
             "version": bundle.identity.version, "weights_sha256": bundle.manifest.get("weights_sha256", "")[:16],
             "thresholds": {"calcification": model.calcification_threshold, CLUSTER: model.cluster_threshold},
             "training_data": bundle.manifest.get("training", {}).get("data")}
    return label, model, facts


def _marks(sample: Sample, models: dict, cache: Path) -> dict:
    out = {}
    for label, (model, digest) in models.items():
        folder = cache / f"{label}-{digest}" if sample.image.sop_instance_uid else None
        out[label] = next(predict_marks([sample], Pipeline([model]), cache=folder))[1][model.identity.name]
    return out


def _mias_order(ds: MIASDataset) -> list[int]:
    """Image indices, those with a calcification cluster (Info.txt CALC) first, the rest in a
    fixed random order (seed 0)."""
    calc = [i for i, r in enumerate(ds.records) if any(row.cls == "CALC" for row in r.extra["rows"])]
    rest = [i for i in range(len(ds)) if i not in set(calc)]
    return calc + [rest[j] for j in np.random.default_rng(0).permutation(len(rest))]


def _cached(record, model: MicrocalcModel, digest: str, label: str, cache: Path) -> bool:
    """Whether the marks of a MIAS record are in the cache (named by the adapter's stable UID)."""
    uid = pydicom.uid.generate_uid(entropy_srcs=["dicom_ai-mini-MIAS", record.extra["reference"]])
    ident = model.identity
    return (cache / f"{label}-{digest}" / f"{ident.name}-{ident.version}-mask{MASK_VERSION}" / f"{uid}.npz").is_file()


def _has_cluster(sample: Sample) -> bool:
    return any(l.kind == CLUSTER and l.mask is not None for l in lesions_of(sample))


def _score(pairs, labels: list[str], bootstrap: int, positive, negative) -> tuple[dict, dict]:
    """evaluate_lesions summary (FROC of the cluster map etc.), and image AUCs positive vs negative."""
    scores = {l: {"cluster": [], "calcification": []} for l in labels}
    y = []
    cluster_marks = {l: [] for l in labels}
    truth, ignore = [], []

    def tap():
        for sample, marks in pairs:
            located = [l for l in lesions_of(sample) if l.mask is not None]
            truth.append([l.mask for l in located if l.kind == CLUSTER])
            ignore.append([l.mask for l in located if l.kind != CLUSTER])
            for l in labels:
                cluster_marks[l].append(marks[l].marks([CLUSTER]))
            pos, neg = positive(sample), negative(sample)
            if pos or neg:
                y.append(pos)
                for l in labels:
                    scores[l]["cluster"].append(marks[l].peaks.get(CLUSTER, 0.0))
                    scores[l]["calcification"].append(marks[l].peaks.get("calcification", 0.0))
            yield sample, marks

    ev = evaluate_lesions(tap(), bootstrap=0, progress=False).summary()
    auc = {}
    for l in labels:
        # The cluster-score threshold that reaches each FROC rate (descriptive: where the curve is read).
        f = M.lesion_froc(cluster_marks[l], truth, ignore)
        ev.setdefault("cluster_threshold_at", {})[l] = {
            str(r): (None if not np.isfinite(t := float(f.thresholds[np.flatnonzero(f.fp_per_image <= r + 1e-12)[-1]]))
                     else round(t, 4)) for r in M.LESION_FROC_RATES}
        auc[l] = {}
        for key, s in scores[l].items():
            if len(set(y)) < 2:
                auc[l][key] = None
                continue
            iv = M.bootstrap_ci(M.roc_auc, np.asarray(s), np.asarray(y, bool), n=bootstrap)
            auc[l][key] = {"value": round(iv.value, 4), "ci95": [round(iv.low, 4), round(iv.high, 4)],
                           "positives": int(sum(y)), "negatives": int(len(y) - sum(y))}
    return ev, auc


def _cluster_summary(ev: dict, auc: dict, labels: list[str]) -> dict:
    out = {}
    for l in labels:
        f = ev["froc"].get(l, {}).get(CLUSTER, {})
        op = ev["operating_point"].get(l, {}).get(CLUSTER, {})
        out[l] = {"froc": f.get("sensitivity_at"), "mean_sensitivity": f.get("mean_sensitivity"),
                  "operating_point": op, "marks_per_image": ev["robustness"][l]["marks_per_image"],
                  # every map's marks (each calcification component too), not clusters only
                  "all_map_marks_per_normal_image": ev["robustness"][l]["false_marks_per_normal_image"],
                  "marks_outside_breast": ev["robustness"][l]["marks_outside_breast"],
                  "auc_cluster_vs_normal": auc[l],
                  "cluster_threshold_at_rate": ev.get("cluster_threshold_at", {}).get(l)}
    out["n_images"] = ev["n_images"]
    out["n_clusters"] = ev["n_lesions"].get(CLUSTER, 0)
    return out


def _coarse(sample: Sample, spacing_mm: float = 0.2, bits: int = 8) -> Sample:
    """The sample as a film scan at ``spacing_mm`` would store it: antialiased shrink, 8 bits;
    lesion regions resized with nearest neighbours."""
    mg = sample.image
    shape = (round(mg.shape[0] * mg.spacing_mm[0] / spacing_mm), round(mg.shape[1] * mg.spacing_mm[1] / spacing_mm))
    levels = float(2 ** bits - 1)
    pixels = np.round(np.clip(resize(mg.pixels, shape), 0, 1) * levels) / levels
    image = mammogram_from_array(pixels.astype(np.float32), mg.laterality, mg.view, (spacing_mm, spacing_mm),
                                 faces_left=mg.faces_left)
    if mg.sop_instance_uid:  # a UID of its own, derived from the source's, keys the mark cache
        image.sop_instance_uid = pydicom.uid.generate_uid(entropy_srcs=[mg.sop_instance_uid, f"{spacing_mm}mm"])

    def small(mask):
        return resize(mask.astype(np.float32), shape, mode="nearest") > 0.5

    lesions = [dataclasses.replace(l, mask=small(l.mask) if l.mask is not None else None, centre_rc=None,
                                   radius_px=None) for l in sample.lesions]
    masks = {k: small(v) for k, v in sample.masks.items()}
    return Sample(image, masks, dict(sample.labels), sample.view, sample.laterality, sample.study, sample.source, lesions)


def _heldout_hybrids(fold: int, copies: int, real_root: str) -> list:
    out = []
    for name, root in (("hybrid:cbis-ddsm-cases", None), ("hybrid:real-png-normals", real_root)):
        ds = open_dataset(name, root, seed=777, copies=copies, kinds={"cluster": 1.0},
                          lesion_counts={0: 0.3, 1: 0.4, 2: 0.3})
        folds = patient_folds(ds.patients(), 5)
        out += [(name, ds, i) for i in range(len(ds)) if folds[i] == fold]
    return out


def _preview(sample: Sample, results: dict, path: Path, thresholds: dict | None = None) -> None:
    """Thumbnail of the image with each bundle's clusters (outline, score) side by side; with
    ``thresholds`` (label -> cluster threshold) clusters below it are drawn thin in blue."""
    pixels = sample.image.pixels
    step = max(1, int(np.ceil(pixels.shape[0] / 900)))
    thumb = pixels[::step, ::step]
    fig = Figure(figsize=(4.2 * len(results), 5.2))
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (label, result) in zip(axes, results.items()):
        ax.imshow(thumb, cmap="gray", vmin=0, vmax=1)
        calc = result.calcification >= 0.5
        rr, cc = np.nonzero(calc[::step, ::step])
        ax.scatter(cc, rr, s=1, c="yellow", linewidths=0)
        t = (thresholds or {}).get(label, 0.0)
        for cl in result.clusters:
            poly = np.vstack([cl.polygon, cl.polygon[:1]]) / step
            colour = "red" if cl.score >= t else "deepskyblue"
            ax.plot(poly[:, 1], poly[:, 0], c=colour, lw=1 if cl.score >= t else 0.5)
            ax.text(cl.centroid[1] / step, cl.centroid[0] / step, f"{cl.score:.2f}", color=colour, fontsize=7)
        sent = sum(cl.score >= t for cl in result.clusters)
        ax.set_title(f"{label}: {len(result.clusters)} clusters, {sent} >= {t:.2f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _table(title: str, s: dict, labels: list[str]) -> None:
    rates = [str(r) for r in M.LESION_FROC_RATES]
    print(f"\n{title}: {s['n_images']} images, {s['n_clusters']} clusters")
    print(f"{'bundle':8s} FROC @ " + " ".join(f"{r:>5s}" for r in rates)
          + " | op sens  FP/img | AUC cluster-map [95% CI]     | AUC calc-map")
    for l in labels:
        r = s[l]
        f = r["froc"] or {}
        cells = " ".join("  n/a" if f.get(k) is None else f"{f[k]:5.2f}" for k in rates)
        op = r["operating_point"] or {}
        a, b = r["auc_cluster_vs_normal"].get("cluster"), r["auc_cluster_vs_normal"].get("calcification")
        fa = f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]" if a else "n/a"
        fb = f"{b['value']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]" if b else "n/a"
        sens = op.get("sensitivity")
        print(f"{l:8s}        {cells} | {'n/a' if sens is None else f'{sens:5.2f}':>7s} "
              f"{op.get('false_marks_per_image', float('nan')):6.3f} | {fa:28s} | {fb}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", action="append", help=f"LABEL=BUNDLE, repeatable (default {' '.join(DEFAULT_BUNDLES)})")
    p.add_argument("--root", default=os.environ.get("DICOM_AI_MIAS", "/work/data/mias"), help="mini-MIAS folder")
    p.add_argument("--real", default="/work/shared/data/real", help="the shared real PNG images")
    p.add_argument("--cache", type=Path, default=Path("/work/data/microcalc-real/marks"),
                   help="mark cache outside the repository")
    p.add_argument("--limit", type=int, default=None,
                   help="score the first N MIAS images only (dry run; clusters first, see _mias_order)")
    p.add_argument("--shard", default="0/1", help="K/N: run every N-th MIAS image from the K-th (parallel cache fill)")
    p.add_argument("--cached-only", action="store_true",
                   help="score only the MIAS images whose marks every bundle has in the cache")
    p.add_argument("--holdout-fold", type=int, default=0, help="patient fold of the held-out hybrid backgrounds")
    p.add_argument("--hybrid-copies", type=int, default=2)
    p.add_argument("--skip-mias", action="store_true")
    p.add_argument("--skip-hybrids", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "microcalc_real.json")
    p.add_argument("--preview-prefix", default="microcalc_real_", help="file name prefix of the PNG previews")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = [_load(spec) for spec in (args.bundle or DEFAULT_BUNDLES)]
    labels = [l for l, _, _ in loaded]
    models = {l: (m, f["weights_sha256"][:10]) for l, m, f in loaded}
    result = {"benchmark": "microcalc bundles on real anatomy (issue 26 item 3)",
              "bundles": {l: f for l, _, f in loaded}, "froc_rates": list(M.LESION_FROC_RATES),
              "protocol": {"marks": "connected regions of the calcification_cluster map (cluster polygons filled "
                                    "with the cluster score), FROC sweeps the score; hit = mark centroid inside the "
                                    "lesion (MIAS: Info.txt circle; hybrids: the inserted cluster's region)",
                           "operating_point": "each bundle's thresholds (shipped: its 'phantom' point, 0.5/0.5)",
                           "auc": "image score = peak of the cluster map (or of the calcification map); positives "
                                  "= images with a located cluster; negatives = images without any finding",
                           "bootstrap": args.bootstrap}}
    t_start = time.time()
    if not args.skip_mias:
        ds = MIASDataset(args.root)
        order = _mias_order(ds)
        if args.limit is not None:
            order = order[:args.limit]
        k, n_shards = (int(v) for v in args.shard.split("/"))
        order = order[k::n_shards]
        if args.cached_only:
            order = [i for i in order if all(_cached(ds.records[i], m, d, l, args.cache)
                                             for l, (m, d) in models.items())]
        t0 = time.time()
        pairs = ((ds[i], _marks(ds[i], models, args.cache)) for i in order)
        ev, auc = _score(pairs, labels, args.bootstrap, _has_cluster,
                         lambda s: not lesions_of(s) and not any(s.labels.values()))
        result["mias"] = _cluster_summary(ev, auc, labels)
        result["mias"]["seconds"] = round(time.time() - t0, 1)
        result["mias"]["subset"] = {"limit": args.limit, "shard": args.shard, "cached_only": args.cached_only,
                                    "images": len(order), "order": "images with a CALC lesion first, then the others "
                                    "in a fixed random order (seed 0), so any prefix is all clusters + a random "
                                    "sample of the other images"}
        _table("mini-MIAS (0.2 mm film, held out)", result["mias"], labels)
    if not args.skip_hybrids:
        items = _heldout_hybrids(args.holdout_fold, args.hybrid_copies, args.real)
        result["hybrids"] = {"backgrounds": sorted({f"{name} #{ds.plans[i].background}" for name, ds, i in items}),
                             "insertion_seed": 777, "copies": args.hybrid_copies}
        for variant in ("native", "0.2mm"):
            t0 = time.time()

            def gen(variant=variant):
                for name, ds, i in items:
                    sample = ds[i]
                    if variant != "native":
                        sample = _coarse(sample)
                    yield sample, _marks(sample, models, args.cache)

            ev, auc = _score(gen(), labels, args.bootstrap, _has_cluster, lambda s: not _has_cluster(s))
            result["hybrids"][variant] = _cluster_summary(ev, auc, labels)
            result["hybrids"][variant]["seconds"] = round(time.time() - t0, 1)
            _table(f"held-out hybrids, {variant}", result["hybrids"][variant], labels)
    if not args.skip_real:
        real = open_dataset("real-png", args.real)
        result["real_png"] = {}
        PREVIEWS.mkdir(parents=True, exist_ok=True)
        for i, rec in enumerate(real.records):
            name = Path(rec.path).stem
            files = {l: args.cache / f"{l}-{d}" / "real-png" / f"{name}.json" for l, (_, d) in models.items()}
            per_model = {l: json.loads(f.read_text()) for l, f in files.items() if f.is_file()}
            sample = real[i]
            if len(per_model) < len(models):  # run every bundle and draw the preview once
                found = {l: m.analyse(sample.image) for l, (m, _) in models.items()}
                _preview(sample, found, PREVIEWS / f"{args.preview_prefix}{name}.png",
                         {l: m.cluster_threshold for l, (m, _) in models.items()})
                for l, r in found.items():
                    t = models[l][0].cluster_threshold
                    per_model[l] = {"clusters": len(r.clusters), "scores": [round(c.score, 3) for c in r.clusters],
                                    "cluster_threshold": t,
                                    "clusters_at_threshold": int(sum(c.score >= t for c in r.clusters)),
                                    "calcification_pixels_ge_0.5": int((r.calcification >= 0.5).sum()),
                                    "seconds": round(r.timings_s.get("total", 0.0), 1)}
                    files[l].parent.mkdir(parents=True, exist_ok=True)
                    files[l].write_text(json.dumps(per_model[l]))
            for l, r in per_model.items():  # clusters that would be sent at the score reaching each MIAS rate
                at = result.get("mias", {}).get(l, {}).get("cluster_threshold_at_rate") or {}
                r["clusters_at_mias_rate"] = {k: (None if t is None else sum(v >= t for v in r["scores"]))
                                              for k, t in at.items()}
            result["real_png"][name] = {"labels": dict(sample.labels), "preview": f"{args.preview_prefix}{name}.png",
                                        **per_model}
            print(f"{name}: " + ", ".join(f"{l} {r['clusters']} clusters ({r.get('clusters_at_threshold', 'n/a')} at "
                                          f"{r.get('cluster_threshold', 'n/a')})" for l, r in per_model.items()))
    result["timing"] = {"seconds": round(time.time() - t_start, 1), "cpu": platform.processor() or platform.machine(),
                        "torch_threads": args.threads, "note": "0 s for marks read from the cache"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
