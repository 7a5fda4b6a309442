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

Sets (``--set``, repeatable): ``real`` (the four shared FFDM images), ``cbis`` (8 CBIS-DDSM
views), ``mias`` (mini-MIAS: every image with a CALC row, then the others in the bench's fixed
random order; ``--mias-limit``), ``hyb-train``/``hyb-test`` (clusters inserted into the
training-fold / held-out-fold backgrounds, insertion seed 0 / 777, native and degraded to
0.2 mm). Images already dumped are skipped, so the job resumes.

    nice -n 10 python benchmarks/microcalc_dump.py --set real --set cbis
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_microcalc_real import _coarse, _mias_order  # noqa: E402

from dicom_ai.data.datasets import MIASDataset, open_dataset, patient_folds  # noqa: E402
from dicom_ai.data.evaluate import lesions_of  # noqa: E402
from dicom_ai.networks.bundle import load_bundle  # noqa: E402
from dicom_ai.networks.microcalc import MicrocalcModel  # noqa: E402
from dicom_ai.networks.microcalc_clusters import WINDOW, components  # noqa: E402

FLOOR = 0.2


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="/work/data/microcalc-real/bundle")
    p.add_argument("--set", action="append", required=True)
    p.add_argument("--out", type=Path, default=Path("/work/data/microcalc-real/dump"))
    p.add_argument("--real", default="/work/shared/data/real")
    p.add_argument("--mias", default="/work/data/mias")
    p.add_argument("--mias-limit", type=int, default=None)
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--pos-copies", type=int, default=8)
    p.add_argument("--shard", default="0/1")
    p.add_argument("--reverse", action="store_true", help="last image first (a second job on the same sets)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = MicrocalcModel.from_bundle(load_bundle(args.bundle), "cpu")
    k, n = (int(v) for v in args.shard.split("/"))
    todo = [it for name in args.set for it in items(name, args)][k::n]
    if args.reverse:
        todo = todo[::-1]
    for key, group, thunk in todo:
        path = args.out / f"{key}.npz"
        if key.startswith("pos-"):
            if (args.out / f"{key}-0.2mm.npz").is_file():
                continue
            sample = thunk()
            coarse = _coarse(sample)
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
