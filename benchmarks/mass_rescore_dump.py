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
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    data = MIASDataset(args.root)
    models = {k: DUNetModel.from_bundle(load_bundle(args.dunet_folds / f"fold{k}")) for k in range(5)}
    si, sn = (int(v) for v in args.shard.split("/"))
    t0 = time.time()
    for i in range(si, len(data), sn):
        sample = data[i]
        ref = sample.source.rsplit("/", 1)[-1].split(".")[0]
        path = args.out / f"{ref}.npz"
        if path.is_file():
            continue
        im = Image_(sample, data.fold_of[ref])
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
            fold=im.fold, normal=im.normal, woman=str(mias_woman(ref)),
            spacing=np.array(sample.image.spacing_mm, dtype=float))
        tmp.rename(path)
        print(f"{ref} fold {im.fold} grid {out.shape} {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
