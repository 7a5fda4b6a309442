"""Equivalence of our authors' GLAM with the authors' own implementation (nyukat/GLAM ``src/modeling``).

Runs their ``MILSingleImageModel`` from a checkout of their repository (outside this project,
never committed, never a test dependency) and ours (``dicom-ai import glam`` -> bundle ->
``dicom_ai.networks.glam.run_reference``) on the same seeded random weights (the checkpoint's
names and shapes, saved as torch 1.1 would: the legacy format) and the same input, and reports
the maximum absolute difference of each output and whether the patch locations are identical.

Their code imports ``cv2`` and ``torchvision`` only for parts the forward pass does not use
(transforms, cv2.resize) and for ``torchvision.models.resnet.conv3x3``; those modules are
stubbed here (``conv3x3`` as torchvision 0.2.2, which their environment.yml pins, defines it:
3x3, padding 1, no bias). Their code was written for torch 1.1, where ``LongTensor / int`` is
an integer division (``get_max_window``); on torch 2 it is a true division, which moves their
patches. The reference run therefore restores the torch 1.1 semantics for integer tensors
only; the run "as is" on torch 2 is reported beside it.

The input batch: (0) one of their sample PNGs through our NYU preprocessing when the checkout
has it, (1) seeded white noise. Also checks that their state_dict's names, shapes and dtypes
are the table kept in the project (``dicom_ai/networks/glam_authors_tensors.py``).

    python benchmarks/bench_glam_authors_equivalence.py --authors-repo /work/scratch-27/GLAM \
        --authors-git-dir /work/.mirror/nyukat+GLAM/repo

Writes ``benchmarks/results/glam_authors_equivalence.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_ai.imaging import mammogram_from_array  # noqa: E402
from dicom_ai.imaging.nyu_window import nyu_input  # noqa: E402
from dicom_ai.networks.glam import run_reference  # noqa: E402
from dicom_ai.networks.glam_authors import GlamAuthorsConfig, synthetic_state_dict  # noqa: E402
from dicom_ai.networks.glam_authors_tensors import AUTHORS_TENSORS  # noqa: E402
from dicom_ai.networks.glam_import import import_glam  # noqa: E402

TARGET = 1e-4
PARAMETERS = {"device_type": "cpu", "gpu_number": 0, "max_crop_noise": (100, 100), "max_crop_size_noise": 100,
              "cam_size": (184, 120), "top_k_per_class": 1, "crop_shape": (512, 512), "percent_k": 0.03,
              "detection_pooling_percent_k": 0.3}


def _stub_modules() -> None:
    """cv2 and torchvision as their forward pass needs them (see the module docstring)."""

    def missing(name):
        def fail(*_a, **_k):
            raise RuntimeError(f"{name} is stubbed: the authors' forward pass should not call it")
        return fail

    cv2 = types.ModuleType("cv2")
    cv2.__getattr__ = lambda name: missing(f"cv2.{name}")  # type: ignore[attr-defined]
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__getattr__ = lambda name: missing(f"torchvision.transforms.{name}")  # type: ignore[attr-defined]
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")

    def conv3x3(in_planes, out_planes, stride=1):
        return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)

    resnet.conv3x3 = conv3x3
    tv.transforms, tv.models, models.resnet = transforms, models, resnet
    sys.modules.update({"cv2": cv2, "torchvision": tv, "torchvision.transforms": transforms,
                        "torchvision.models": models, "torchvision.models.resnet": resnet})


@contextmanager
def torch11_integer_division():
    """``/`` of integer tensors by integers truncates, as in torch 1.1 (their pinned version)."""
    original = torch.Tensor.__truediv__

    def truediv(self, other):
        other_int = isinstance(other, int) or (isinstance(other, torch.Tensor) and not other.is_floating_point())
        if not self.is_floating_point() and not self.is_complex() and other_int:
            return torch.div(self, other, rounding_mode="trunc")
        return original(self, other)

    torch.Tensor.__truediv__ = truediv
    try:
        yield
    finally:
        torch.Tensor.__truediv__ = original


def _authors_model(repo: Path, state: dict[str, torch.Tensor], k: int = 1, **overrides):
    _stub_modules()
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from src.modeling import glam as authors_glam  # their code, from the checkout

    model = authors_glam.MILSingleImageModel(dict(PARAMETERS, top_k_per_class=k, **overrides))
    table = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    model.load_state_dict(state, strict=True)
    return model.eval(), table == [tuple(r) for r in AUTHORS_TENSORS]


def _run_authors(model, x: torch.Tensor) -> tuple[dict[str, np.ndarray], float]:
    started = time.process_time()
    with torch.no_grad():
        y = model(x)
    cpu = time.process_time() - started
    return {"y_global": y.numpy(), "saliency_global": model.saliency_map_global.numpy(),
            "saliency_fused": model.saliency_map.numpy(), "patch_locations": np.asarray(model.patch_locations)}, cpu


def _small_trials(repo: Path, state: dict[str, torch.Tensor], trials: int, seed: int) -> dict:
    """Many small inputs (512 x 320, 32 x 32 crops, K = 3) with a bright blob at a random place, so
    that patches are also chosen inside the map, not only at its border as the full-size runs do."""
    cfg = GlamAuthorsConfig(input_shape=(512, 320), cam_size=(32, 20), crop_shape=(32, 32), top_k_per_class=3)
    model, _ = _authors_model(repo, state, k=3, cam_size=cfg.cam_size, crop_shape=cfg.crop_shape)
    rng = np.random.default_rng(seed + 1)
    rows, cols = cfg.input_shape
    rr, cc = np.mgrid[:rows, :cols]
    x = []
    for _ in range(trials):
        r, c, radius = rng.uniform(40, rows - 40), rng.uniform(40, cols - 40), rng.uniform(8, 30)
        blob = 4.0 * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * radius ** 2))
        x.append((rng.standard_normal((rows, cols)) + blob).astype(np.float32))
    x = np.stack(x)[:, None]
    with torch11_integer_division():
        theirs, _ = _run_authors(model, torch.from_numpy(x))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model_synthetic.ckpt"
        torch.save(state, ckpt)
        ours = run_reference(str(import_glam(ckpt, Path(tmp) / "bundle", config=cfg)), x)
    loc = theirs["patch_locations"]
    inside = (loc[..., 0] > 0) & (loc[..., 0] < rows - 32) & (loc[..., 1] > 0) & (loc[..., 1] < cols - 32)
    return {"config": cfg.to_dict(), "inputs": f"{trials} x (N(0, 1) noise + a Gaussian blob of peak 4 at a random "
                                                f"place), numpy seed {seed + 1}",
            "max_abs_diff": _diffs(ours, theirs),
            "patch_locations_identical": bool(np.array_equal(ours["patch_locations"], loc)),
            "patches_away_from_the_border": int(inside.sum()), "patches": int(inside.size)}


def _diffs(ours: dict, theirs: dict) -> dict[str, float]:
    return {k: float(np.abs(ours[k].astype(np.float64) - theirs[k].astype(np.float64)).max())
            for k in ("y_global", "saliency_global", "saliency_fused")}


def _inputs(repo: Path, seed: int) -> tuple[np.ndarray, list[str]]:
    rows, cols = GlamAuthorsConfig().input_shape
    rng = np.random.default_rng(seed)
    batch, names = [], []
    sample = repo / "sample_data" / "images" / "0_L-CC.png"
    if sample.is_file() and sample.stat().st_size > 0:
        from PIL import Image

        pixels = np.asarray(Image.open(sample)).astype(np.float32)
        m = mammogram_from_array(pixels / pixels.max(), laterality="L", view="CC", spacing_mm=(0.1, 0.1),
                                 faces_left=False)
        x, _ = nyu_input(m)
        batch.append(x)
        names.append(f"{sample.relative_to(repo)} through dicom_ai.imaging.nyu_window")
    batch.append(rng.standard_normal((rows, cols)).astype(np.float32))
    names.append(f"white noise N(0, 1), numpy seed {seed}")
    return np.stack(batch)[:, None], names


def _git_commit(git_dir: str) -> str:
    if not git_dir:
        return "unknown"
    try:
        return subprocess.run(["git", "--git-dir", git_dir, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", required=True, help="checkout of nyukat/GLAM (src/modeling is imported)")
    parser.add_argument("--authors-git-dir", default="", help="its git directory, to record the commit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small-trials", type=int, default=0,
                        help="also compare on this many small inputs with a blob (interior patches)")
    parser.add_argument("--k3", action="store_true", help="also compare with K = 3 patches (the greedy suppression)")
    parser.add_argument("--skip-as-is", action="store_true", help="do not also run their code unshimmed on torch 2")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "glam_authors_equivalence.json"))
    args = parser.parse_args(argv)
    repo = Path(args.authors_repo).resolve()

    state = synthetic_state_dict(args.seed)
    model, table_matches = _authors_model(repo, state)
    x, names = _inputs(repo, args.seed)
    xt = torch.from_numpy(x)
    with torch11_integer_division():
        theirs, their_cpu = _run_authors(model, xt)
    as_is, as_is_error = None, ""
    if not args.skip_as_is:
        try:
            as_is, _ = _run_authors(model, xt)
        except RuntimeError as exc:  # their fractional patch row runs past the canvas
            as_is_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model_synthetic.ckpt"
        torch.save(state, ckpt, _use_new_zipfile_serialization=False)
        bundle = import_glam(ckpt, Path(tmp) / "bundle", source="synthetic weights (bench)")
        started = time.process_time()
        ours = run_reference(str(bundle), x)
        our_cpu = time.process_time() - started

    diffs = _diffs(ours, theirs)
    same_locations = bool(np.array_equal(ours["patch_locations"], theirs["patch_locations"]))
    # The greedy proposal's suppression and the pasting order are only exercised with K > 1:
    # the same comparison with K = 3 patches (not the released configuration).
    k3 = {}
    if args.k3:
        model3, _ = _authors_model(repo, state, k=3)
        with torch11_integer_division():
            theirs3, _ = _run_authors(model3, xt)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "model_synthetic.ckpt"
            torch.save(state, ckpt)
            bundle = import_glam(ckpt, Path(tmp) / "bundle", config=GlamAuthorsConfig(top_k_per_class=3))
            ours3 = run_reference(str(bundle), x)
        k3 = {"max_abs_diff": _diffs(ours3, theirs3),
              "patch_locations": {"ours": ours3["patch_locations"].tolist(), "theirs": theirs3["patch_locations"].tolist(),
                                  "identical": bool(np.array_equal(ours3["patch_locations"], theirs3["patch_locations"]))}}
    result = {
        "what": "max |ours - authors'| per output, same seeded random weights and input",
        "authors_repository": "github:nyukat/GLAM",
        "authors_commit": _git_commit(args.authors_git_dir),
        "authors_code_run": "src/modeling (MILSingleImageModel) from the checkout, parameters of src/scripts/run_model.py",
        "stubs": "cv2, torchvision.transforms (unused by the forward pass); torchvision.models.resnet.conv3x3 as "
                 "torchvision 0.2.2 (3x3, padding 1, no bias)",
        "integer_division": "torch 1.1 semantics restored for integer tensors during their forward (get_max_window)",
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "weights": f"dicom_ai.networks.glam_authors.synthetic_state_dict({args.seed}), saved in torch's legacy format "
                   "and imported with dicom-ai import glam",
        "inputs": names, "input_shape": list(x.shape),
        "state_dict_table_matches_theirs": table_matches,
        "max_abs_diff": diffs,
        "target": TARGET,
        "within_target": {k: v <= TARGET for k, v in diffs.items()},
        "patch_locations": {"ours": ours["patch_locations"].tolist(), "theirs": theirs["patch_locations"].tolist(),
                            "identical": same_locations},
        "y_global": {"ours": ours["y_global"].tolist(), "theirs": theirs["y_global"].tolist()},
        "cpu_seconds": {"theirs": round(their_cpu, 1), "ours": round(our_cpu, 1)},
    }
    if k3:
        result["k3_not_released_config"] = k3
    if args.small_trials:
        result["small_inputs_k3"] = small = _small_trials(repo, state, args.small_trials, args.seed)
        print(f"small inputs, K = 3: max |diff| {small['max_abs_diff']}; locations identical "
              f"{small['patch_locations_identical']}; {small['patches_away_from_the_border']}/{small['patches']} "
              "patches away from the border")
    if as_is_error:
        result["theirs_as_is_on_torch2"] = {"error": as_is_error}
    elif as_is is not None:
        result["theirs_as_is_on_torch2"] = {
            "patch_locations": as_is["patch_locations"].tolist(),
            "identical_to_torch11_semantics": bool(np.array_equal(as_is["patch_locations"], theirs["patch_locations"])),
            "max_abs_diff_saliency_fused": float(np.abs(as_is["saliency_fused"] - theirs["saliency_fused"]).max()),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"authors' commit {result['authors_commit']}; state_dict table matches: {table_matches}")
    print(f"{'output':18s} {'max |diff|':>12s}  <= {TARGET:g}")
    for k, v in diffs.items():
        print(f"{k:18s} {v:12.3e}  {v <= TARGET}")
    print(f"{'patch_locations':18s} {'identical' if same_locations else 'DIFFER'}: ours {ours['patch_locations'].tolist()} "
          f"theirs {theirs['patch_locations'].tolist()}")
    if as_is_error:
        print(f"their code as is on torch {torch.__version__}: {as_is_error}")
    elif as_is is not None:
        print(f"their code as is on torch {torch.__version__}: patch locations {as_is['patch_locations'].tolist()}")
    if k3:
        print(f"K = 3: max |diff| {k3['max_abs_diff']}; patch locations identical {k3['patch_locations']['identical']}: "
              f"{k3['patch_locations']['ours']}")
    ok = table_matches and same_locations and all(v <= TARGET for v in diffs.values())
    if args.small_trials:
        ok = ok and small["patch_locations_identical"] and all(v <= TARGET for v in small["max_abs_diff"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
