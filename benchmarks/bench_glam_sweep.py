"""Short, measured GLAM runs that chose the shipped bundle's training settings.

Each run trains the global module only, for ``--epochs`` epochs on the first
``--studies`` training studies (seeds from 10000), and reports the validation image AUCs
(50 studies from seed 11200, the shipped bundle's validation set) after every epoch.
Compared: learning rate, class weighting of positives, schedule, and the Models-Genesis
initialisation against random initialisation. Same seed everywhere, one CPU thread per run.

Run: ``.venv/bin/python benchmarks/bench_glam_sweep.py --init build/glam/pretrain.safetensors``.
Result: benchmarks/results/glam_sweep.json (and a table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_ai.networks.glam import CONFIGS, Glam  # noqa: E402
from dicom_ai.training.glam import class_weights, load_phantoms, phantom_shape_for, train  # noqa: E402
from dicom_ai.training.glam_pretrain import load_pretrained  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = {
    "lr3e-4": dict(lr=3e-4, balance="none", schedule="constant", init=True),
    "lr1e-3": dict(lr=1e-3, balance="none", schedule="constant", init=True),
    "lr1e-3_sqrt": dict(lr=1e-3, balance="sqrt", schedule="constant", init=True),
    "lr1e-3_sqrt_random_init": dict(lr=1e-3, balance="sqrt", schedule="constant", init=False),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="glam-pretrain safetensors file")
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--cache", default=str(ROOT / "build" / "glam-cache"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = CONFIGS["compact"]
    shape = phantom_shape_for(config)
    full = load_phantoms(10_000, 1200, shape, args.cache, progress=False)
    n = 4 * args.studies
    data = type(full)(full.mammograms[:n], full.breast_masks[:n], full.labels[:n], None)
    val = load_phantoms(11_200, 50, shape, args.cache, progress=False)
    out = RESULTS / "glam_sweep.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({"data": f"global stage only; first {args.studies} training studies ({n} views) from seed 10000; "
                           f"validation 50 studies ({len(val)} views) from seed 11200; {args.epochs} epochs, batch 8, "
                           "beta 0.1, seed 0, warm-up 20 steps",
                   "runs": result.get("runs", {})})
    for name in args.runs:
        spec = RUNS[name]
        torch.manual_seed(0)
        net = Glam(config)
        if spec["init"]:
            load_pretrained(net, args.init)
        t0 = time.time()
        history = train(net, data, config, stages=[("global", args.epochs)], batch_size=8, lr=spec["lr"], beta=0.1,
                        seed=0, device=torch.device("cpu"), val=val, progress=False,
                        pos_weight=class_weights(data.labels, spec["balance"]), schedule=spec["schedule"],
                        warmup_steps=20)
        result["runs"][name] = {**spec, "minutes": round((time.time() - t0) / 60, 1),
                                "history": [{k: h[k] for k in ("epoch", "bce_g", "val_auc_benign", "val_auc_malignant")}
                                            for h in history]}
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':28s} " + " ".join(f"{'e' + str(e + 1) + ' ben/mal':>14s}" for e in range(args.epochs)))
    for name, run in result["runs"].items():
        print(f"{name:28s} " + " ".join(f"{h['val_auc_benign']:6.3f}/{h['val_auc_malignant']:6.3f} "
                                         for h in run["history"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
