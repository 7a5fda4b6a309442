"""Dump, for every mini-MIAS image, the out-of-fold U-Net's raw subtraction output on its
working grid (plain pass and up-down-flipped pass, flipped back), the working-grid input, the
node's allowed region (breast less pectoral) and the lesion masks on that grid.

Input to ``bench_mass_rescore.py`` (test-time augmentation and the false-positive reduction
stage are measured from these arrays without running the networks again). Each image is run
by the fold bundle that did not see it (``--dunet-folds``/fold<k>), as bench_mias_node does.

    nice -n 10 python benchmarks/mass_rescore_dump.py --root /work/data/mias \
        --dunet-folds /work/data/dunet-0.8-folds --out /work/data/rescore/dump
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dicom_ai.data.datasets import MIASDataset, mias_woman
from dicom_ai.data.insertion import insert_lesions
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.dunet import DUNetModel, network_grid
from dicom_ai.networks.pipeline import allowed_region

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mias_node import Image_  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--dunet-folds", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shard", default="0/1", help="i/n: every n-th image from i")
    p.add_argument("--hybrid-copies", type=int, default=0,
                   help="instead of the real images: this many copies of every NORMAL image, each with one mass "
                        "inserted (dicom_ai.data.insertion, default InsertionConfig), named <ref>_h<copy>")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    data = MIASDataset(args.root)
    models = {k: DUNetModel.from_bundle(load_bundle(args.dunet_folds / f"fold{k}")) for k in range(5)}
    si, sn = (int(v) for v in args.shard.split("/"))
    t0 = time.time()
    for i in range(si, len(data), sn):
        base = data[i]
        ref0 = base.source.rsplit("/", 1)[-1].split(".")[0]
        if args.hybrid_copies:
            if not Image_(base, 0).normal:
                continue
            todo = [(f"{ref0}_h{c}", insert_lesions(base, (0, i, c), masses=1)) for c in range(args.hybrid_copies)]
        else:
            todo = [(ref0, base)]
        for ref, sample in todo:
            path = args.out / f"{ref}.npz"
            if path.is_file():
                continue
            dump_one(models, sample, ref, data.fold_of[ref0], mias_woman(ref0), path)
            print(f"{ref} {time.time() - t0:.0f}s", flush=True)
    return 0


def dump_one(models, sample, ref, fold, woman, path) -> None:
    """Run the fold's U-Net on one sample and write its arrays (module doc) to ``path``."""
    im = Image_(sample, fold)
    model = models[im.fold]
    geo, image, _ = network_grid(sample.image, model.config)
    x = torch.from_numpy(image)[None, None]
    with torch.no_grad():
        out = (x - model.network.reconstruct(x))[0, 0].numpy()
        xf = torch.flip(x, dims=(2,))
        out_ud = torch.flip(xf - model.network.reconstruct(xf), dims=(2,))[0, 0].numpy()
    fwd = lambda m: geo.forward(np.asarray(m, dtype=np.float32)) > 0.5  # noqa: E731
    masses = [fwd(m) for m in im.truth["mass"]]
    anyl = [fwd(m) for m in im.any]
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp, out=out.astype(np.float32), out_ud=out_ud.astype(np.float32), image=image.astype(np.float16),
        allowed=fwd(allowed_region(sample.image)),
        masses=np.stack(masses) if masses else np.zeros((0,) + out.shape, bool),
        any=np.stack(anyl) if anyl else np.zeros((0,) + out.shape, bool),
        fold=im.fold, normal=im.normal, woman=str(woman),
        spacing=np.array(sample.image.spacing_mm, dtype=float))
    tmp.rename(path)


if __name__ == "__main__":
    raise SystemExit(main())
