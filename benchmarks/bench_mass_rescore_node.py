"""Paired node-level comparison of two U-Net fold-bundle sets (e.g. today's and the rescore stage's):
held-out mass sensitivity differences at each named point with a bootstrap over women.

Uses bench_mias_node's own machinery unchanged (its mark cache, ``marks_of``, ``cross_validate``), so
the figures are those of its table for the same folders; GLAM fold bundles join both configs when
given (as in bench_mias_node's shipped config).

    nice -n 10 python benchmarks/bench_mass_rescore_node.py --base /work/data/dunet-0.8-folds \\
        --new /work/data/dunet-rescore-folds --glam-folds /work/data/glam-0.3.0-folds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from dicom_ai.data.datasets import MIASDataset, mias_woman

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mias_node as node  # noqa: E402
from bench_mass_rescore import paired_bootstrap, per_image  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("/work/data/mias"))
    p.add_argument("--cache", type=Path, default=Path("/work/data/mias_cache"))
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--new", type=Path, required=True)
    p.add_argument("--glam-folds", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "mass_rescore_node_paired.json")
    args = p.parse_args(argv)
    data = MIASDataset(args.root)
    samples = [data[i] for i in range(len(data))]
    refs = [s.source.rsplit("/", 1)[-1].split(".")[0] for s in samples]
    images = [node.Image_(s, data.fold_of[r]) for s, r in zip(samples, refs)]
    women = [str(mias_woman(r)) for r in refs]
    ns = SimpleNamespace(cache=args.cache)
    glam = node.marks_of(ns, samples, images, "glam", {"kind": node.FOLDS, "path": args.glam_folds}) \
        if args.glam_folds else None
    sent = {}
    for name, folder in (("base", args.base), ("new", args.new)):
        dunet = node.marks_of(ns, samples, images, "dunet", {"kind": node.FOLDS, "path": folder})
        marks = [dict({"dunet": dunet[i]}, **({"glam": glam[i]} if glam else {})) for i in range(len(samples))]
        sent[name] = node.cross_validate(images, marks)["sent"]
    out = {"benchmark": "bench_mass_rescore_node", "base": str(args.base), "new": str(args.new),
           "glam_folds": str(args.glam_folds) if args.glam_folds else None, "n_women": len(set(women)), "points": {}}
    for pt in node.POINTS:
        fa, tot, fpa = per_image(images, sent["base"][pt])
        fb, _, fpb = per_image(images, sent["new"][pt])
        normal = np.array([im.normal for im in images])
        out["points"][pt] = {
            "mass_sensitivity": [round(fa.sum() / tot.sum(), 4), round(fb.sum() / tot.sum(), 4)],
            "false_marks_per_normal_image": [round(fpa[normal].mean(), 4), round(fpb[normal].mean(), 4)],
            "paired_difference": paired_bootstrap(images, women, sent["base"][pt], sent["new"][pt])}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    lines = ["| point | masses base -> new | FP/normal base -> new | difference [95 % CI, women] |", "|---|---|---|---|"]
    for pt, v in out["points"].items():
        d = v["paired_difference"]
        lines.append(f"| {pt} | {v['mass_sensitivity'][0]:.2f} -> {v['mass_sensitivity'][1]:.2f} | "
                     f"{v['false_marks_per_normal_image'][0]:.2f} -> {v['false_marks_per_normal_image'][1]:.2f} | "
                     f"{d['difference']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
