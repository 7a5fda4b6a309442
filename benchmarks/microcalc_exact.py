"""The dumped microcalc maps on the node's own grid, with the node's own working image.

benchmarks/microcalc_dump.py stored, per image, the networks' working-grid calcification
probability and the working image only in 2 mm windows around each probability >= 0.2
component. The cluster stage's contrast features read a 2 mm window around each
calcification at the cluster threshold (0.5-0.6), which is often off-centre in its 0.2-level
component's window: part of its background was missing (NaN) and, below 20 finite pixels,
its contrast was set to 0. So cluster scores computed from the windows were not the node's
(on mini-MIAS, film upsampled 4x, the node sent 59 clusters at 0.7985 where the windows gave 37).

This writes, for every dump under ``--dump``, a dump of the same format under ``--out`` whose

* working image is the node's (:meth:`MicrocalcModel.working_grid`: bilinear resample of the
  breast box of the source image), computed from the source image (mini-MIAS PGMs, the shared
  images, the CBIS-DDSM DICOMs, and the hybrids regenerated with the dump's seeds), stored
  sparsely (``img_idx``/``img_val``, float32) within :data:`MARGIN` working pixels of every
  probability >= 0.2 component's bounding box, which holds every window the cluster stage reads;
* grid is the node's breast box of today's breast mask where that box is a whole-pixel part of
  the dumped grid (integer working/source pixel ratio: mini-MIAS and the 0.2 mm hybrids at 4,
  CBIS-DDSM at 1), the probability cut to it and set to 0 outside today's mask, exactly as
  :func:`microcalc_dump.output_from_dump` does for bench_mias_node; otherwise (FFDM at 0.07 mm)
  the dumped grid stays and the probability is set to 0 outside today's mask on it
  (``grid``: ``"node"`` or ``"dump"``).

Checks, per image (written to ``--report``): the regenerated image against the dump's windows
(largest |difference| at the windows' finite pixels; float16 storage allows ~5e-4; a hybrid
regenerated differently would show), and the candidate clusters of the sparse image against
those of the full working image (features equal to 1e-9) at component thresholds 0.5 and 0.6.

    nice -n 10 python benchmarks/microcalc_exact.py --out /work/data/microcalc-real/dump-exact
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_microcalc_real import _coarse  # noqa: E402
from microcalc_candidates import candidates, load  # noqa: E402
from microcalc_dump import MASK_V3_COMMIT, _mask_v3, crops, items, masks_of, output_from_dump  # noqa: E402, F401

from dicom_ai.data.datasets import MIASDataset  # noqa: E402
from dicom_ai.imaging import resize  # noqa: E402
from dicom_ai.imaging.mask import MASK_VERSION  # noqa: E402
from dicom_ai.networks.bundle import load_bundle  # noqa: E402
from dicom_ai.networks.microcalc import MicrocalcModel  # noqa: E402
from dicom_ai.networks.microcalc_clusters import WINDOW, ClusterConfig, candidate_clusters, components  # noqa: E402

#: Working pixels kept around each probability >= 0.2 component's bounding box: a window
#: (WINDOW // 2 = 20) around a calcification centroid, plus room for a centroid that lies
#: off its own pixels (a curved component), with margin.
MARGIN = WINDOW // 2 + 30
FLOOR = 0.2
CHECK = (ClusterConfig(threshold=0.5, min_diameter_mm=0.1, max_diameter_mm=1.0, min_count=3),
         ClusterConfig(threshold=0.6, min_diameter_mm=0.1, max_diameter_mm=1.0, min_count=3))


def regenerate(thunk, variant: str | None, v3: types.ModuleType, hybrid: bool):
    """The sample as microcalc_dump made it (hybrids: lesions placed under mask v3), its masks
    then computed afresh with today's functions (the node's)."""
    if hybrid:
        with masks_of(v3):
            sample = thunk()
            if variant == "0.2mm":
                sample = _coarse(sample)
    else:
        sample = thunk()
    sample.image._breast_mask = None
    sample.image._pectoral_mask = None
    return sample


def samples(dump_root: Path, args) -> dict:
    """key -> (sample thunk, crop or None) for every dump, regenerated as microcalc_dump made them."""
    out = {}
    ns = SimpleNamespace(real=args.real, mias=args.mias, mias_limit=None, copies=args.copies, pos_copies=args.pos_copies)
    for name in ("real", "cbis", "hyb-train", "hyb-test", "pos-train", "pos-train2", "pos-test"):
        if not (dump_root / name).is_dir():
            continue
        for key, _, thunk in items(name, ns):
            if name.startswith("pos-"):
                for variant in ("native", "0.2mm"):
                    out[f"{key}-{variant}"] = (thunk, variant)
            else:  # items() names hybrids with their variant and degrades the 0.2 mm ones itself
                out[key] = (thunk, None)
    ds = MIASDataset(args.mias)
    for i, rec in enumerate(ds.records):
        out[f"mias/{rec.extra['reference']}"] = ((lambda i=i: ds[i]), None)
    return out


def exact(model: MicrocalcModel, d, sample, crop: bool) -> tuple[dict, dict]:
    """(arrays for the exact dump, check figures) of dump ``d`` and its regenerated ``sample``."""
    mg = sample.image
    mask = mg.breast_mask
    if crop:
        keep = np.zeros_like(mask)
        for r0, r1, c0, c1 in crops(sample):
            keep[r0:r1, c0:c1] = True
        mask = mask & keep
    out = {"group": np.array(d.group), "source_spacing": np.array(mg.spacing_mm, dtype=np.float64),
           "source_shape": np.array(mg.shape), "labels": np.array(d.labels)}
    for k, (m, origin) in enumerate(d.lesions):
        out[f"lesion_{k}"], out[f"lesion_{k}_origin"] = m, origin
    info = {"grid": None, "window_max_abs_diff": None}
    if d.shape == (0, 0) or not mask.any():
        out["work_shape"] = np.array([0, 0])
        info["grid"] = "empty"
        return out, info
    px = model.config.pixel_spacing_mm
    sr, sc = (float(v) for v in mg.spacing_mm)
    # The dumped grid's own box and image (for the check against its windows).
    dr0, dc0 = int(d.offset[0]), int(d.offset[1])
    dr1, dc1 = dr0 + int(round(d.shape[0] * px / sr)), dc0 + int(round(d.shape[1] * px / sc))
    image, work_mask, (r0, r1, c0, c1) = model.working_grid(mg, mask)
    # A dump made with today's mask (microcalc_dump --hybrids-mask-v3, or any image whose box
    # did not move) is on the node's grid whatever the pixel ratio: same box, same shape.
    same_box = (r0, c0) == (dr0, dc0) and tuple(image.shape) == tuple(d.shape)
    if not same_box and (round((dr1 - dr0) * sr / px), round((dc1 - dc0) * sc / px)) != tuple(d.shape):
        raise SystemExit(f"{d.key}: cannot recover the dumped box from its grid")
    dump_image = image if same_box else resize(mg.pixels[dr0:dr1, dc0:dc1], d.shape)
    win = d.image
    fin = np.isfinite(win)
    info["window_max_abs_diff"] = float(np.abs(win[fin] - dump_image[fin]).max()) if fin.any() else 0.0
    info["window_pixels"] = int(fin.sum())
    fr, fc = sr / px, sc / px
    cr, cc = (r0 - dr0) * fr, (c0 - dc0) * fc
    if same_box or (abs(fr - round(fr)) < 1e-9 and abs(fc - round(fc)) < 1e-9 and cr >= 0 and cc >= 0
                    and cr + image.shape[0] <= d.shape[0] and cc + image.shape[1] <= d.shape[1]):
        cr, cc = int(round(cr)), int(round(cc))
        prob = np.where(work_mask, d.prob[cr:cr + image.shape[0], cc:cc + image.shape[1]], 0.0).astype(np.float32)
        offset = (r0, c0)
        info["grid"] = "node"
    else:
        image = dump_image
        work_mask = resize(mask[dr0:dr1, dc0:dc1].astype(np.float32), d.shape, mode="nearest") > 0.5
        prob = np.where(work_mask, d.prob, 0.0).astype(np.float32)
        offset = (dr0, dc0)
        info["grid"] = "dump"
    keep = np.zeros(image.shape, dtype=bool)
    for c in components(prob, FLOOR):
        rr, cc_ = c.pixels[:, 0], c.pixels[:, 1]
        keep[max(rr.min() - MARGIN, 0):rr.max() + MARGIN + 1, max(cc_.min() - MARGIN, 0):cc_.max() + MARGIN + 1] = True
    idx = np.flatnonzero(prob.ravel() >= FLOOR)
    img_idx = np.flatnonzero(keep.ravel())
    out.update(work_shape=np.array(image.shape), scale=np.array([px / sr, px / sc]), offset=np.array(offset, dtype=np.float64),
               prob_idx=idx.astype(np.int64), prob_val=prob.ravel()[idx].astype(np.float16),
               img_idx=img_idx.astype(np.int64), img_val=image.ravel()[img_idx].astype(np.float32),
               win_rc=np.zeros((0, 2), np.int32), win=np.zeros((0, WINDOW, WINDOW), np.float16))
    # The sparse image must give the cluster stage exactly what the full one gives.
    sparse = np.full(image.shape, np.nan, np.float32)
    sparse.ravel()[img_idx] = image.ravel()[img_idx]
    prob16 = np.zeros(image.size, np.float32)
    prob16[idx] = prob.ravel()[idx].astype(np.float16)
    prob16 = prob16.reshape(image.shape)
    worst = 0.0
    for cfg in CHECK:
        a = candidate_clusters(prob16, image, px, cfg)
        b = candidate_clusters(prob16, sparse, px, cfg)
        if len(a) != len(b):
            raise SystemExit(f"{d.key}: sparse image gives {len(b)} candidate clusters, full image {len(a)}")
        for (_, fa, _), (_, fb, _) in zip(a, b):
            worst = max(worst, float(np.abs(fa - fb).max()))
    if worst > 1e-9:
        raise SystemExit(f"{d.key}: sparse image features differ from the full image's by {worst}")
    info["sparse_vs_full_max_feature_diff"] = worst
    info["image_fraction_kept"] = round(float(keep.mean()), 4)
    return out, info


def check_node(bundle: str, dump: Path, exact_root: Path, mias_root: str, references: list[str]) -> dict:
    """Per mini-MIAS image: the cluster scores the node computes (the cluster stage of
    ``bundle`` through :func:`microcalc_dump.output_from_dump`, bench_mias_node's path, whose
    marks were checked against the networks run now) beside the scores the cluster bench
    computes from the exact dump (:func:`microcalc_candidates.candidates`) and from the old
    window dump."""
    model = MicrocalcModel.from_bundle(load_bundle(bundle), "cpu")
    captured: list = []
    own = model._clusters

    def capture(*a, **k):
        out = own(*a, **k)
        captured[:] = out
        return out
    model._clusters = capture  # records the node's clusters of the call below
    ds = MIASDataset(mias_root)
    by_ref = {r.extra["reference"]: i for i, r in enumerate(ds.records)}
    rows, worst, worst_windows = {}, 0.0, 0.0
    for ref in references:
        mg = ds[by_ref[ref]].image
        captured.clear()
        output_from_dump(model, dump / "mias" / f"{ref}.npz", mg)
        node = sorted(c.score for c in captured)
        bench = sorted(float(v) for v in candidates(load(exact_root / "mias" / f"{ref}.npz", exact_root), model.clusters)[1])
        windows = sorted(float(v) for v in candidates(load(dump / "mias" / f"{ref}.npz", dump), model.clusters)[1])
        diff = max((abs(a - b) for a, b in zip(node, bench)), default=0.0) if len(node) == len(bench) else None
        worst = max(worst, diff) if diff is not None else float("inf")
        if len(windows) == len(node):
            worst_windows = max(worst_windows, max((abs(a - b) for a, b in zip(node, windows)), default=0.0))
        rows[ref] = {"node": [round(v, 6) for v in node], "bench_exact": [round(v, 6) for v in bench],
                     "bench_windows": [round(v, 6) for v in windows], "max_abs_diff_exact": diff}
        print(ref, rows[ref], flush=True)
    return {"check": "cluster scores: node (output_from_dump, bench_mias_node's path) vs cluster bench on the exact dump "
                     "vs cluster bench on the old window dump", "bundle": str(bundle), "images": rows,
            "max_abs_diff_exact": worst, "same_count_exact": sum(len(r["node"]) == len(r["bench_exact"]) for r in rows.values()),
            "same_count_windows": sum(len(r["node"]) == len(r["bench_windows"]) for r in rows.values()),
            "max_abs_diff_windows_where_same_count": worst_windows, "clusters_node": sum(len(r["node"]) for r in rows.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dump", type=Path, default=Path("/work/data/microcalc-real/dump"))
    p.add_argument("--out", type=Path, default=Path("/work/data/microcalc-real/dump-exact"))
    p.add_argument("--bundle", default="/work/data/microcalc-real/bundle")
    p.add_argument("--real", default="/work/shared/data/real")
    p.add_argument("--mias", default="/work/data/mias")
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--pos-copies", type=int, default=4)
    p.add_argument("--only", default="", help="only dumps whose key starts with this")
    p.add_argument("--report", type=Path, default=None, help="per-image check figures (JSON); default OUT/report.json")
    p.add_argument("--check-node", nargs="+", default=None, metavar="MDB",
                   help="instead: node vs bench cluster scores on these mini-MIAS images (with --check-bundle), "
                        "written to --check-out")
    p.add_argument("--check-bundle", default="/work/data/microcalc-0.3.0-folds/fold0")
    p.add_argument("--check-out", type=Path, default=Path(__file__).resolve().parent / "results" / "microcalc_exact_check.json")
    args = p.parse_args(argv)
    if args.check_node:
        result = check_node(args.check_bundle, args.dump, args.out, args.mias, args.check_node)
        args.check_out.write_text(json.dumps(result, indent=1) + "\n")
        print({k: v for k, v in result.items() if k != "images"})
        return 0
    model = MicrocalcModel.from_bundle(load_bundle(args.bundle), "cpu")
    thunks = samples(args.dump, args)
    v3 = _mask_v3()
    paths = [q for q in sorted(args.dump.rglob("*.npz")) if not q.name.endswith(".tmp.npz")
             and str(q.relative_to(args.dump)).startswith(args.only)]
    report_path = args.report or args.out / f"report{('-' + args.only.replace('/', '_')) if args.only else ''}.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    # Another job on another --only part writes its own report; what any report holds is done.
    done = {k for q in args.out.glob("report*.json") for k in json.loads(q.read_text())} | set(report)
    for q in paths:
        key = str(q.relative_to(args.dump).with_suffix(""))
        target = args.out / f"{key}.npz"
        if target.is_file() and key in done:
            continue
        if key not in thunks:
            raise SystemExit(f"{key}: no way to regenerate its source image")
        t0 = time.perf_counter()
        thunk, variant = thunks[key]
        sample = regenerate(thunk, variant, v3, hybrid=key.startswith(("hyb-", "pos-")))
        d = load(q, args.dump)
        arrays, info = exact(model, d, sample, crop=key.startswith("pos-"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(target)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        report[key] = info
        print(key, info, flush=True)
        if len(report) % 20 == 0:
            report_path.write_text(json.dumps(report, indent=1) + "\n")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    report = {k: v for q in sorted(args.out.glob("report*.json")) for k, v in json.loads(q.read_text()).items()}
    bad = {k: v["window_max_abs_diff"] for k, v in report.items() if (v["window_max_abs_diff"] or 0) > 2e-3}
    print(f"{len(report)} exact dumps (all reports) (mask v{MASK_VERSION}); grids: "
          + ", ".join(f"{g} {sum(v['grid'] == g for v in report.values())}" for g in ("node", "dump", "empty"))
          + f"; window check > 2e-3 on {len(bad)}: {bad}")
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
