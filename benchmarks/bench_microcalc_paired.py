"""Paired comparison of two microcalc bundles (networks + cluster stage) on the same held-out data.

Both bundles' networks were dumped on the same images (benchmarks/microcalc_dump.py; the second
with ``--hybrids-mask-v3`` so its hybrids are the reference dump's) and made exact
(benchmarks/microcalc_exact.py). Two parts, each with a bootstrap of the difference ``b - a``:

* **held-out hybrids** (the cluster bench's side B: the held-out-fold CBIS-DDSM woman and FFDM
  exam 1 with clusters inserted, seed 777 full images and seed 900 crops around inserted
  clusters, native and at 0.2 mm / 8 bit): each candidate scored by the bundle's own cluster
  stage as the node scores it (``bench_microcalc_clusters``' ``final_scored``: cluster model,
  sharp calibration by the image's pixel spacing), cluster FROC (false clusters counted on the
  full images only), bootstrap over the dumped images (2000 resamples, the same picks for a and b);
* **mini-MIAS, node marks** (every image through the fold bundle that did not see its fold,
  from the dumps, as bench_mias_node's ``--microcalc-dump``): the cluster map alone, held-out
  sensitivity for the 27 located clusters at each budget of false marks per image (threshold per
  held-out fold chosen on the other four, bench_mias_node's ``choose_thresholds``), bootstrap
  over women (2000 resamples).

    nice -n 10 python benchmarks/bench_microcalc_paired.py \\
        --a-exact /work/data/microcalc-real/dump-exact --a-bundle models/microcalc \\
        --a-dump /work/data/microcalc-real/dump --a-folds /work/data/microcalc-0.3.0-folds \\
        --a-source /work/data/microcalc-real/bundle \\
        --b-exact /work/data/microcalc-0.1mm/dump-exact --b-bundle /work/data/microcalc-0.5.0 \\
        --b-dump /work/data/microcalc-0.1mm/dump --b-folds /work/data/microcalc-0.5.0-folds \\
        --b-source /work/data/microcalc-0.1mm/bundle --out benchmarks/results/microcalc_paired_0.1mm.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mias_node as node  # noqa: E402
from bench_microcalc_clusters import RATES, froc, sharp, side  # noqa: E402
from microcalc_candidates import candidates, load_all  # noqa: E402

from dicom_ai.data.datasets import MIASDataset, mias_woman  # noqa: E402
from dicom_ai.data.evaluate import ModelMarks  # noqa: E402
from dicom_ai.data.metrics import LESION_FROC_RATES  # noqa: E402
from dicom_ai.networks.microcalc_clusters import ClusterConfig, calibrated, cluster_score  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLUSTER = "calcification_cluster"


def hybrid_items(exact: Path, bundle: Path) -> dict[str, dict[str, tuple]]:
    """Per held-out hybrid set ('sharp', '0.2mm'): key -> (scores, hits, lesions, full image)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    stage = ClusterConfig.from_dict(manifest["architecture"]["clusters"])
    plain = ClusterConfig(threshold=stage.threshold, min_diameter_mm=stage.min_diameter_mm,
                          max_diameter_mm=stage.max_diameter_mm, min_count=stage.min_count, link_mm=stage.link_mm)
    out = {"sharp": {}, "0.2mm": {}}
    for d in load_all(exact):
        if side(d) != "B" or not d.group.startswith(("hyb", "pos")):
            continue
        f, _, h = candidates(d, plain)
        spacing = min(d.source_spacing)
        s = np.array([calibrated(cluster_score(x, stage), spacing, stage) for x in f]) if len(f) else np.zeros(0)
        full = not d.group.startswith("pos-")
        out["sharp" if sharp(d) else "0.2mm"][d.key] = (s, h if full else np.where(h < 0, -2, h), len(d.lesions), full)
    return out


def paired_froc(a: dict, b: dict, n: int, seed: int = 0) -> dict:
    """FROC of a and b over the same images, and bootstrap CIs of b - a over images."""
    keys = sorted(set(a) & set(b))
    if set(a) != set(b):
        raise SystemExit(f"the two dumps hold different images: {sorted(set(a) ^ set(b))[:5]}")
    fa, fb = froc([a[k] for k in keys]), froc([b[k] for k in keys])
    rng = np.random.default_rng(seed)
    diffs = {str(r): [] for r in RATES}
    for _ in range(n):
        pick = [keys[i] for i in rng.integers(0, len(keys), len(keys))]
        ra, rb = froc([a[k] for k in pick])["sensitivity_at"], froc([b[k] for k in pick])["sensitivity_at"]
        for r in diffs:
            diffs[r].append(rb[r] - ra[r])
    return {"images": len(keys), "full_images": fa["n_images"], "clusters": fa["n_lesions"],
            "a": fa["sensitivity_at"], "b": fb["sensitivity_at"],
            "difference": {r: round(fb["sensitivity_at"][r] - fa["sensitivity_at"][r], 4) for r in diffs},
            "difference_ci95": {r: [round(float(np.quantile(v, q)), 4) for q in (0.025, 0.975)] for r, v in diffs.items()}}


def cluster_marks(marks: list[ModelMarks]) -> list[dict[str, ModelMarks]]:
    """The cluster map alone (the single-calcification map is off at every named point)."""
    return [{"microcalc": ModelMarks(candidates={CLUSTER: m.candidates.get(CLUSTER, np.zeros((0, 4)))},
                                     thresholds={CLUSTER: m.thresholds.get(CLUSTER, 0.5)})} for m in marks]


def mias_paired(args, samples, images) -> dict:
    res = {}
    for name in ("a", "b"):
        ns = SimpleNamespace(microcalc_dump=getattr(args, f"{name}_dump"), microcalc_dump_source=getattr(args, f"{name}_source"))
        marks = cluster_marks(node.dumped_microcalc_marks(ns, samples, images, {"kind": node.FOLDS,
                                                                              "path": getattr(args, f"{name}_folds")}))
        res[name] = {budget: node.found_and_false(images, node.held_out_sent(images, marks, budget), CLUSTER)
                     for budget in LESION_FROC_RATES}
    return {"clusters": sum(len(im.truth[CLUSTER]) for im in images), "images": len(images),
            "women": len({mias_woman(im.reference) for im in images}),
            "budgets": node.paired_over_women(images, CLUSTER, res["a"], res["b"], args.n, "clusters")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("a", "b"):
        p.add_argument(f"--{name}-exact", type=Path, required=True, help="exact dumps (benchmarks/microcalc_exact.py)")
        p.add_argument(f"--{name}-bundle", type=Path, required=True, help="all-folds bundle (its cluster stage scores the hybrids)")
        p.add_argument(f"--{name}-dump", type=Path, required=True, help="the dumps bench_mias_node reads (--microcalc-dump)")
        p.add_argument(f"--{name}-folds", type=Path, required=True, help="fold0..fold4 bundles (--microcalc-folds)")
        p.add_argument(f"--{name}-source", type=Path, required=True, help="the bundle whose networks were dumped")
    p.add_argument("--root", type=Path, default=Path("/work/data/mias"))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--no-mias", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "microcalc_paired.json")
    args = p.parse_args(argv)
    t0 = time.time()
    out = {"benchmark": "microcalc bundles a vs b, paired on the same held-out images", "protocol": __doc__.split("\n\n")[1].strip(),
           "a": {k: str(getattr(args, f"a_{k}")) for k in ("bundle", "exact", "dump", "folds")},
           "b": {k: str(getattr(args, f"b_{k}")) for k in ("bundle", "exact", "dump", "folds")}}
    ia, ib = hybrid_items(args.a_exact, args.a_bundle), hybrid_items(args.b_exact, args.b_bundle)
    out["held_out_hybrids"] = {part: paired_froc(ia[part], ib[part], args.n) for part in ("sharp", "0.2mm")}
    if not args.no_mias:
        data = MIASDataset(args.root)
        samples = [data[i] for i in range(len(data))]
        images = [node.Image_(s, data.fold_of[s.source.rsplit("/", 1)[-1].split(".")[0]]) for s in samples]
        out["mias_cluster_map_alone"] = mias_paired(args, samples, images)
    out["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for part, v in out["held_out_hybrids"].items():
        print(f"held-out hybrids, {part} ({v['images']} images, {v['full_images']} full, {v['clusters']} clusters): "
              "FP/img | a | b | b - a [95 % CI]")
        for r in v["a"]:
            print(f"  {r} | {v['a'][r]:.2f} | {v['b'][r]:.2f} | {v['difference'][r]:+.2f} {v['difference_ci95'][r]}")
    if "mias_cluster_map_alone" in out:
        print("mini-MIAS, cluster map alone, node marks (5-fold CV): budget | a sens (FP/img) | b | b only / a only | b - a CI")
        for b, v in out["mias_cluster_map_alone"]["budgets"].items():
            print(f"  {b} | {v['a']['sensitivity']:.2f} ({v['a']['false_marks_per_image']:.2f}) | {v['b']['sensitivity']:.2f} "
                  f"({v['b']['false_marks_per_image']:.2f}) | {v['clusters_found_by_b_only']} / {v['clusters_found_by_a_only']} | "
                  f"{v['b']['sensitivity'] - v['a']['sensitivity']:+.2f} {v['sensitivity_difference_ci95']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
