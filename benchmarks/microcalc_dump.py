"""Dump a microcalc bundle's working-grid calcification maps, sparsely, for cluster-level work.

The networks are the slow part (20-60 s per image on one core); the cluster definition and the
cluster-level false-positive reduction (dicom_ai/networks/microcalc_clusters.py) only need the
0.05 mm working-grid calcification probability and the image around each candidate. This
writes, per image, one ``.npz`` under ``--out`` (outside the repository):

* ``prob_idx``/``prob_val``: flat indices and values (float16) of working-grid pixels with
  probability >= 0.2 (every threshold the cluster stage may use is above that);
* ``win_rc``/``win``: the working-grid image in a 41 x 41 window (2 mm) around each
  probability >= 0.2 component (float16), enough for the local contrast and noise features;
* ``work_shape``, ``scale``/``offset`` (working -> source pixels), ``source_spacing``;
* ``lesion_<k>``: each located calcification cluster's mask on the source grid (bounding box
  crop + origin), for hit tests; ``labels``: the image labels; ``group``: which set it is.

:func:`output_from_dump` gives what ``MicrocalcModel.predict`` returns on an image from its
dump, for any bundle with the dumped networks (e.g. the fold variants of the cluster stage
that bench_mias_node.py scores), without running the networks again.

Sets (``--set``, repeatable): ``real`` (the four shared FFDM images), ``cbis`` (8 CBIS-DDSM
views), ``mias`` (mini-MIAS: every image with a CALC row, then the others in the bench's fixed
random order; ``--mias-limit``), ``hyb-train``/``hyb-test`` (clusters inserted into the
training-fold / held-out-fold backgrounds, insertion seed 0 / 777, native and degraded to
0.2 mm). Images already dumped are skipped, so the job resumes.

    nice -n 10 python benchmarks/microcalc_dump.py --set real --set cbis
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_microcalc_real import _coarse, _mias_order  # noqa: E402
from microcalc_candidates import load  # noqa: E402

import dicom_ai.imaging.mammogram as mammogram_module  # noqa: E402
from dicom_ai.data.datasets import MIASDataset, open_dataset, patient_folds  # noqa: E402
from dicom_ai.data.evaluate import ModelMarks, _output_prediction, lesions_of  # noqa: E402
from dicom_ai.imaging.mask import MASK_VERSION  # noqa: E402
from dicom_ai.networks.pipeline import allowed_region, restrict_to_breast  # noqa: E402
from dicom_ai.networks.bundle import load_bundle  # noqa: E402
from dicom_ai.core.errors import ModelError  # noqa: E402
from dicom_ai.core.findings import ModelOutput, ProbabilityMap  # noqa: E402
from dicom_ai.imaging import Mammogram, resize  # noqa: E402
from dicom_ai.networks.microcalc import MicrocalcModel, fill_polygon  # noqa: E402
from dicom_ai.networks.microcalc_clusters import WINDOW, components  # noqa: E402

FLOOR = 0.2
#: The commit whose breast mask (MASK_VERSION 3) the dumps' hybrids were made with: the
#: insertion places lesions inside the breast mask (and off the pectoral muscle), so the
#: hybrids regenerate as dumped only under that mask.
MASK_V3_COMMIT = "ce24432"


def _mask_v3() -> types.ModuleType:
    """dicom_ai/imaging/mask.py as of :data:`MASK_V3_COMMIT` (this repository's own history)."""
    repo = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "-C", str(repo), "show", f"{MASK_V3_COMMIT}:dicom_ai/imaging/mask.py"],
                         capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("mask_v3")
    exec(compile(src, f"{MASK_V3_COMMIT}:dicom_ai/imaging/mask.py", "exec"), module.__dict__)
    if module.MASK_VERSION != 3:
        raise SystemExit(f"{MASK_V3_COMMIT}: mask.py is version {module.MASK_VERSION}, not 3")
    return module


@contextlib.contextmanager
def masks_of(module: types.ModuleType):
    """Mammograms made inside compute their breast and pectoral masks with ``module``'s functions."""
    saved = mammogram_module.breast_mask, mammogram_module.pectoral_mask
    mammogram_module.breast_mask, mammogram_module.pectoral_mask = module.breast_mask, module.pectoral_mask
    try:
        yield
    finally:
        mammogram_module.breast_mask, mammogram_module.pectoral_mask = saved


def _as_dumped(thunk, v3: types.ModuleType):
    """``thunk`` (a hybrid sample) made under breast mask v3 (where the insertion placed the
    reference dumps' lesions), its masks then computed afresh with today's functions (the
    node's), as microcalc_exact.regenerate makes it; ``with_coarse=True`` also gives the 0.2 mm
    version (made under v3 as well)."""
    def made(with_coarse: bool = False):
        with masks_of(v3):
            sample = thunk()
            coarse = _coarse(sample) if with_coarse else None
        for s in (sample, coarse):
            if s is not None:
                s.image._breast_mask = None
                s.image._pectoral_mask = None
        return (sample, coarse) if with_coarse else sample
    return made


def dump(model: MicrocalcModel, sample, path: Path, group: str, crop: list | None = None) -> float:
    """``crop``: boxes (r0, r1, c0, c1 source pixels); the networks run there only (the breast
    mask, computed on the whole image, is cleared outside them)."""
    cfg = model.config
    t0 = time.perf_counter()
    mg = sample.image
    mask = mg.breast_mask
    if crop is not None:
        keep = np.zeros_like(mask)
        for r0, r1, c0, c1 in crop:
            keep[r0:r1, c0:c1] = True
        mask = mask & keep
    out = {"group": np.array(group), "source_spacing": np.array(mg.spacing_mm, dtype=np.float64),
           "source_shape": np.array(mg.shape), "labels": np.array(sorted(k for k, v in sample.labels.items() if v))}
    for k, les in enumerate(l for l in lesions_of(sample) if l.kind == "calcification_cluster" and l.mask is not None):
        rr, cc = np.nonzero(les.mask)
        out[f"lesion_{k}"] = les.mask[rr.min():rr.max() + 1, cc.min():cc.max() + 1]
        out[f"lesion_{k}_origin"] = np.array([rr.min(), cc.min()])
    if mask.any():
        image, work_mask, (r0, _, c0, _) = model.working_grid(mg, mask)
        sr, sc = (float(v) for v in mg.spacing_mm)
        work_shape = image.shape
        prob, _ = model.dense_cascade(image, work_mask)
        idx = np.flatnonzero(prob.ravel() >= FLOOR)
        comps = components(prob, FLOOR)
        half = WINDOW // 2
        padded = np.pad(image, half)
        rc = np.array([[int(round(c.centroid[0])), int(round(c.centroid[1]))] for c in comps], dtype=np.int32).reshape(-1, 2)
        out.update(work_shape=np.array(work_shape), scale=np.array([cfg.pixel_spacing_mm / sr, cfg.pixel_spacing_mm / sc]),
                   offset=np.array([r0, c0], dtype=np.float64), prob_idx=idx.astype(np.int64),
                   prob_val=prob.ravel()[idx].astype(np.float16), win_rc=rc,
                   win=np.stack([padded[r:r + WINDOW, c:c + WINDOW] for r, c in rc]).astype(np.float16)
                   if len(rc) else np.zeros((0, WINDOW, WINDOW), np.float16))
    else:
        out.update(work_shape=np.array([0, 0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **out)
    tmp.replace(path)
    return time.perf_counter() - t0


def output_from_dump(model: MicrocalcModel, path: Path, mammogram: Mammogram) -> tuple[ModelOutput, dict]:
    """What ``model.predict(mammogram)`` returns, from the networks' outputs dumped for the same
    image (``path``, written by :func:`dump` with the same networks), and how the dump's grid
    relates to the node's.

    The node runs the networks on the working grid of the bounding box of the image's breast
    mask (``model.working_grid``). The dump may have been made with another mask (mini-MIAS
    dumps: breast mask v3; the node now uses v4). At an integer working/source pixel ratio
    (mini-MIAS: 0.2 mm / 0.05 mm = 4) the working grid of a box inside the dumped box is a
    sub-array of the dumped grid (bilinear, half-pixel centres), and both networks are
    patch-wise, so the node's map is the dumped map cut to the new box and set to 0 outside the
    new mask, except (a) within half a patch (1.2 mm) of the new box's edges, where the node's
    patches see zero padding instead of image, and (b) at the new mask's edge, where a pixel may
    have been visited only because the Detector fired on a patch centred outside the new mask.
    Below the dump's floor (0.2) the calcification map is 0, and the dump holds float16 values.
    The working image (for the calcifications' contrast) is computed from ``mammogram`` as the
    node computes it, not read from the dump's windows. The cluster stage is the model's
    own (``MicrocalcModel._clusters``, as ``analyse`` calls it) with ``model``'s configuration,
    and the cluster outlines are drawn on the source grid as ``analyse`` draws them.

    Returns the output (maps ``calcification`` and ``calcification_cluster`` on the source
    grid, at ``model``'s thresholds) and ``{"box_shift_px": source pixels the breast box moved
    per side (top, bottom, left, right), "clusters": count}``. Raises
    :class:`~dicom_ai.core.errors.ModelError` when the new box is not inside the dumped one
    or the pixel ratio is not an integer (the dump cannot stand for the node there).
    """
    d = load(path, path.parent)
    rows, cols = mammogram.shape
    prob_src = np.zeros((rows, cols), dtype=np.float32)
    cluster_src = np.zeros((rows, cols), dtype=np.float32)
    info = {"box_shift_px": [0, 0, 0, 0], "clusters": 0}
    mask = mammogram.breast_mask
    if mask.any():
        if d.shape == (0, 0):
            raise ModelError(f"{path.name}: the dump has no breast; the node's mask has one")
        px = model.config.pixel_spacing_mm
        sr, sc = (float(v) for v in mammogram.spacing_mm)
        # The node's working image and mask (exact: no network involved); only the networks'
        # probability comes from the dump.
        image, work_mask, (r0, r1, c0, c1) = model.working_grid(mammogram, mask)
        shape = image.shape
        fr, fc = sr / px, sc / px
        dr, dc = (r0 - d.offset[0]) * fr, (c0 - d.offset[1]) * fc
        # A dump made on today's breast box is the node's grid at any pixel ratio (e.g. 0.07 mm
        # from mini-MIAS's 0.2 mm): same box, same shape.
        same_box = (r0, c0) == (int(d.offset[0]), int(d.offset[1])) and tuple(shape) == tuple(d.shape)
        if not same_box and (abs(fr - round(fr)) > 1e-9 or abs(fc - round(fc)) > 1e-9 or dr < 0 or dc < 0
                             or dr + shape[0] > d.shape[0] or dc + shape[1] > d.shape[1]):
            raise ModelError(f"{path.name}: the breast box {r0}:{r1}, {c0}:{c1} is not a whole-pixel part of the "
                             "dumped working grid")
        dr, dc = int(round(dr)), int(round(dc))
        dumped_rows, dumped_cols = d.shape[0] / fr, d.shape[1] / fc
        info["box_shift_px"] = [0, 0, 0, 0] if same_box else [
            r0 - int(d.offset[0]), int(round(d.offset[0] + dumped_rows)) - r1,
            c0 - int(d.offset[1]), int(round(d.offset[1] + dumped_cols)) - c1]
        prob = np.where(work_mask, d.prob[dr:dr + shape[0], dc:dc + shape[1]], 0.0).astype(np.float32)
        prob_src[r0:r1, c0:c1] = resize(prob, (r1 - r0, c1 - c0), mode="nearest")
        clusters = model._clusters(prob, (sr, sc), (r0, c0), image)
        for cl in sorted(clusters, key=lambda c: c.score):
            inside = fill_polygon(cl.polygon, (rows, cols))
            cluster_src[inside] = np.maximum(cluster_src[inside], cl.score)
        info["clusters"] = len(clusters)
    return ModelOutput(maps=[
        ProbabilityMap("calcification", prob_src, model.calcification_threshold, model.identity),
        ProbabilityMap("calcification_cluster", cluster_src, model.cluster_threshold, model.identity),
    ]), info


def crops(sample, half_mm: float = 12.5) -> list[tuple[int, int, int, int]]:
    """A square of 2 * ``half_mm`` around each located cluster (source pixels)."""
    out = []
    for les in lesions_of(sample):
        if les.kind == "calcification_cluster" and les.mask is not None:
            rr, cc = np.nonzero(les.mask)
            hr, hc = (round(half_mm / s) for s in sample.image.spacing_mm)
            r, c = int(rr.mean()), int(cc.mean())
            out.append((max(r - hr, 0), r + hr, max(c - hc, 0), c + hc))
    return out


def items(name: str, args):
    """(key, group, sample thunk) of one set."""
    if name == "real":
        ds = open_dataset("real-png", args.real)
        for i, rec in enumerate(ds.records):
            yield f"real/{Path(rec.path).stem}", "real-ffdm", (lambda i=i: ds[i])
    elif name == "cbis":
        ds = open_dataset("cbis-ddsm-cases", None)
        folds = patient_folds(ds.patients(), 5)
        for i in range(len(ds)):
            yield f"cbis/{i}", f"cbis-fold{folds[i]}", (lambda i=i: ds[i])
    elif name == "mias":
        ds = MIASDataset(args.mias)
        for i in _mias_order(ds)[:args.mias_limit]:
            yield f"mias/{ds.records[i].extra['reference']}", "mias", (lambda i=i: ds[i])
    elif name in ("hyb-train", "hyb-test"):
        seed = 0 if name == "hyb-train" else 777
        for bg, root in (("hybrid:cbis-ddsm-cases", None), ("hybrid:real-png-normals", args.real)):
            ds = open_dataset(bg, root, seed=seed, copies=args.copies, kinds={"cluster": 1.0},
                              lesion_counts={0: 0.3, 1: 0.4, 2: 0.3})
            folds = patient_folds(ds.patients(), 5)
            short = "cbis" if "cbis" in bg else "ffdm"
            for i in range(len(ds)):
                if (folds[i] == 0) != (name == "hyb-test"):
                    continue
                for variant in ("native", "0.2mm"):
                    thunk = (lambda i=i, ds=ds: ds[i]) if variant == "native" else (lambda i=i, ds=ds: _coarse(ds[i]))
                    yield f"{name}/{short}-{i}-{variant}", f"{name}-{short}-fold{folds[i]}-{variant}", thunk
    elif name in ("pos-train", "pos-train2", "pos-test"):
        # Many inserted clusters, the networks run only around them: positives for the cluster model
        # (and the held-out sensitivity); never used for false-cluster rates.
        seed = {"pos-train": 100, "pos-train2": 200, "pos-test": 900}[name]
        for bg, root in (("hybrid:cbis-ddsm-cases", None), ("hybrid:real-png-normals", args.real)):
            ds = open_dataset(bg, root, seed=seed, copies=args.pos_copies, kinds={"cluster": 1.0},
                              lesion_counts={1: 0.5, 2: 0.5})
            folds = patient_folds(ds.patients(), 5)
            short = "cbis" if "cbis" in bg else "ffdm"
            for i in range(len(ds)):
                if (folds[i] == 0) != (name == "pos-test"):
                    continue
                yield f"{name}/{short}-{i}", f"{name}-{short}-fold{folds[i]}", (lambda i=i, ds=ds: ds[i])


def check_node(bundle: str, dump_dir: Path, mias_root: str, references: list[str], out: Path | None) -> dict:
    """The node's marks on mini-MIAS images (the networks run now, breast mask of today) beside
    the marks :func:`output_from_dump` makes from the dumped maps, through the same breast
    restriction and mark extraction (:func:`dicom_ai.data.evaluate.predict_marks`' path)."""
    model = MicrocalcModel.from_bundle(load_bundle(bundle), "cpu")
    ds = MIASDataset(mias_root)
    by_ref = {r.extra["reference"]: i for i, r in enumerate(ds.records)}
    rows = {}
    for ref in references:
        sample = ds[by_ref[ref]]
        mg = sample.image
        t0 = time.perf_counter()
        node = ModelMarks.from_prediction(_output_prediction(restrict_to_breast(model.predict(mg), mg)), allowed_region(mg))
        seconds = time.perf_counter() - t0
        dumped, info = output_from_dump(model, dump_dir / "mias" / f"{ref}.npz", mg)
        offline = ModelMarks.from_prediction(_output_prediction(restrict_to_breast(dumped, mg)), allowed_region(mg))
        row = {"networks_s": round(seconds, 1), "box_shift_px": info["box_shift_px"]}
        for key in ("calcification_cluster", "calcification"):
            a, b = node.candidates[key], offline.candidates[key]
            row[key] = {"node": len(a), "from_dump": len(b)}
            if key == "calcification_cluster":
                row[key]["node_marks"] = [[round(float(v), 3) for v in m] for m in a]
                row[key]["dump_marks"] = [[round(float(v), 3) for v in m] for m in b]
                pairs = [(m, min(b, key=lambda x: np.hypot(x[1] - m[1], x[2] - m[2]))) for m in a] if len(b) else []
                row[key]["max_score_difference"] = (round(max(abs(float(m[0] - x[0])) for m, x in pairs), 4)
                                                    if pairs else None)
                row[key]["max_centroid_shift_px"] = (round(max(float(np.hypot(m[1] - x[1], m[2] - x[2]))
                                                               for m, x in pairs), 2) if pairs else None)
        rows[ref] = row
        print(ref, row, flush=True)
    result = {"check": "node marks (networks run now) vs marks from the dumped maps (output_from_dump)",
              "bundle": str(bundle), "dump": str(dump_dir), "mask_version": MASK_VERSION, "images": rows}
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="/work/data/microcalc-real/bundle")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--check-node", nargs="+", default=None, metavar="MDB",
                   help="instead of dumping: the node's marks on these mini-MIAS images (networks run now) beside "
                        "the marks from their dumps (output_from_dump), written to --check-out")
    p.add_argument("--check-out", type=Path, default=Path(__file__).resolve().parent / "results" / "microcalc_dump_check.json")
    p.add_argument("--out", type=Path, default=Path("/work/data/microcalc-real/dump"))
    p.add_argument("--real", default="/work/shared/data/real")
    p.add_argument("--mias", default="/work/data/mias")
    p.add_argument("--mias-limit", type=int, default=None)
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--pos-copies", type=int, default=8)
    p.add_argument("--shard", default="0/1")
    p.add_argument("--reverse", action="store_true", help="last image first (a second job on the same sets)")
    p.add_argument("--hybrids-mask-v3", action="store_true",
                   help="make the hybrids as the reference dumps (/work/data/microcalc-real/dump) made them: lesions "
                        "placed under breast mask v3, then today's breast mask (the node's), so another bundle's "
                        "dump holds the same images (paired comparison)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.check_node:
        check_node(args.bundle, args.out, args.mias, args.check_node, args.check_out)
        return 0
    if not args.set:
        p.error("--set is required (or --check-node)")
    model = MicrocalcModel.from_bundle(load_bundle(args.bundle), "cpu")
    k, n = (int(v) for v in args.shard.split("/"))
    todo = [it for name in args.set for it in items(name, args)][k::n]
    if args.reverse:
        todo = todo[::-1]
    v3 = _mask_v3() if args.hybrids_mask_v3 else None
    for key, group, thunk in todo:
        path = args.out / f"{key}.npz"
        if v3 is not None and key.startswith(("hyb-", "pos-")):
            thunk = _as_dumped(thunk, v3)
        if key.startswith("pos-"):
            if (args.out / f"{key}-0.2mm.npz").is_file():
                continue
            sample, coarse = thunk(with_coarse=True) if v3 is not None else (lambda s: (s, _coarse(s)))(thunk())
            for variant, smp in (("native", sample), ("0.2mm", coarse)):
                seconds = dump(model, smp, args.out / f"{key}-{variant}.npz", f"{group}-{variant}", crop=crops(smp))
                print(f"{key}-{variant} {group} {seconds:.1f} s", flush=True)
            continue
        if path.is_file():
            continue
        seconds = dump(model, thunk(), path, group)
        print(f"{key} {group} {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
