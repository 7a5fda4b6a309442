"""GLAM training: losses go down, seeds reproduce, checkpoints resume, bundle loads safely."""

import json

import numpy as np
import pytest
import torch

from dicom_ai.networks.bundle import load_bundle, save_bundle
from dicom_ai.networks.glam import Glam, GlamConfig, GlamModel
from dicom_ai.imaging import mammogram_from_array
from dicom_ai.training.checkpoint import RunState
from dicom_ai.training.glam import GlamData, make_batch, stage_loss, train


TINY = GlamConfig(name="tiny", input_shape=(96, 64), pixel_spacing_mm=0.5,
                  global_channels=(4, 4, 8, 8, 8), patch_size=16, train_num_patches=2,
                  local_channels=(4, 4, 4, 4), local_blocks=(1, 1, 1, 1), crop_noise_px=3,
                  crop_size_noise_px=3)


def _toy_data(n=8, seed=0):
    """Half-disc breasts; 'malignant' ones carry a bright blob, 'benign' ones a faint ring."""
    rng = np.random.default_rng(seed)
    rows, cols = 100, 70
    r, c = np.mgrid[0:rows, 0:cols]
    mammograms, masks, labels = [], [], []
    for i in range(n):
        img = (((r - 50) ** 2 + (1.3 * c) ** 2) < 44**2).astype(np.float32) * 0.5
        img += 0.05 * rng.random(img.shape, dtype=np.float32)
        benign, malignant = i % 4 in (1, 3), i % 4 in (2, 3)
        cy, cx = rng.integers(30, 70), rng.integers(5, 25)
        if malignant:
            img[(r - cy) ** 2 + (c - cx) ** 2 < 25] = 1.0
        if benign:
            ring = np.abs(np.hypot(r - 100 + cy, c - cx - 5) - 4) < 1
            img[ring] = 0.9
        lat = "R" if i % 2 else "L"
        stored = img[:, ::-1].copy() if lat == "R" else img
        m = mammogram_from_array(stored, lat, "CC", spacing_mm=(0.5, 0.5))
        mammograms.append(m)
        masks.append(m.pixels > 0.2)
        labels.append([float(benign), float(malignant)])
    return GlamData(mammograms, masks, np.asarray(labels, dtype=np.float32))


@pytest.mark.parametrize("stage", ["global", "local", "joint"])
def test_a_few_steps_reduce_the_loss(stage):
    torch.manual_seed(0)
    net = Glam(TINY)
    data = _toy_data()
    x, mask, y = make_batch(data, range(len(data)), TINY)
    params = net.local_net.parameters() if stage == "local" else net.parameters()
    opt = torch.optim.Adam(params, lr=3e-3)
    net.train()
    if stage == "local":
        net.global_net.eval()
    losses = []
    for _ in range(12):
        loss, parts = stage_loss(stage, net, x, mask, y, TINY, beta=0.1)
        assert all(np.isfinite(v) for v in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Joint training reselects patches every step, so compare the last steps' mean.
    assert np.mean(losses[-3:]) < 0.9 * losses[0], losses


def _run(tmp_path, seed, epochs, resume=False, ckpt_name="ckpt"):
    torch.manual_seed(seed)
    net = Glam(TINY)
    history = train(net, _toy_data(), TINY, stages=[("global", epochs), ("local", 1), ("joint", 0)],
                    batch_size=4, lr=1e-3, beta=0.1, seed=seed, device=torch.device("cpu"),
                    state=RunState(tmp_path / ckpt_name), resume=resume, progress=False)
    return net, history


def test_fixed_seed_reproduces_and_resume_continues(tmp_path):
    a, hist_a = _run(tmp_path, seed=3, epochs=2, ckpt_name="a")
    b, _ = _run(tmp_path, seed=3, epochs=2, ckpt_name="b")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    # Interrupted after the first global epoch, then resumed: the same as uninterrupted.
    torch.manual_seed(3)
    first = Glam(TINY)
    train(first, _toy_data(), TINY, stages=[("global", 1)], batch_size=4, lr=1e-3, beta=0.1, seed=3,
          device=torch.device("cpu"), state=RunState(tmp_path / "c"), progress=False)
    resumed = Glam(TINY)  # different initial weights: everything must come from the checkpoint
    hist_c = train(resumed, _toy_data(), TINY, stages=[("global", 2), ("local", 1), ("joint", 0)],
                   batch_size=4, lr=1e-3, beta=0.1, seed=3, device=torch.device("cpu"),
                   state=RunState(tmp_path / "c"), resume=True, progress=False)
    for (ka, va), (kc, vc) in zip(a.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(va, vc, atol=1e-6), ka
    assert [(h["stage"], h["epoch"]) for h in hist_c] == [(h["stage"], h["epoch"]) for h in hist_a]


def test_bundle_loads_with_safetensors_only(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = Glam(TINY)
    manifest = {"name": "glam", "version": "t", "architecture": {"kind": "glam", **TINY.to_dict()},
                "input": {}, "thresholds": {"benign_lesion": 0.3, "malignant_lesion": 0.3},
                "intended_use": "test", "training": {}}
    save_bundle(tmp_path / "glam", manifest, net.state_dict())

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used to load a bundle")

    monkeypatch.setattr(torch, "load", no_pickle)
    model = GlamModel.from_bundle(load_bundle(tmp_path / "glam"), "cpu")
    for (k, v), (k2, v2) in zip(net.state_dict().items(), model.network.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # The weights file is plain safetensors: an 8-byte header length, then a JSON header.
    raw = (tmp_path / "glam" / "weights.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert "global_net.conv1.weight" in header


def test_shipped_bundle_loads_and_predicts():
    bundle = load_bundle("glam")
    assert bundle.kind == "glam"
    assert "not for clinical use" in bundle.manifest["intended_use"]
    model = GlamModel.from_bundle(bundle, "cpu")
    data = _toy_data(n=2)
    out = model.predict(data.mammograms[1])
    assert [m.probability.shape for m in out.maps] == [data.mammograms[1].shape] * 2
    assert all(0 <= s.value <= 1 for s in out.scores)


def test_cli_registers_train_glam():
    from dicom_ai.cli import build_parser

    args = build_parser().parse_args(["train", "glam", "--epochs-global", "1", "--seed", "7"])
    assert args.epochs_global == 1 and args.seed == 7 and callable(args.handler)


def test_phantom_data_do_not_depend_on_the_number_of_workers():
    from dicom_ai.training.glam import load_phantoms

    one = load_phantoms(321, 2, (148, 114), None, progress=False, workers=1)
    two = load_phantoms(321, 2, (148, 114), None, progress=False, workers=2)
    assert len(one) == len(two) == 8
    assert np.array_equal(one.labels, two.labels) and np.array_equal(one.lesions, two.lesions)
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(one.mammograms, two.mammograms))


def test_phantom_cache_is_keyed_by_the_generator_code(tmp_path):
    from dicom_ai.data.cache import generator_version
    from dicom_ai.training.glam import load_phantoms

    load_phantoms(321, 1, (148, 114), tmp_path, progress=False)
    (folder,) = tmp_path.iterdir()
    assert folder.name.endswith(generator_version())
    # A second call reads the folder back: the same views, no new folder.
    again = load_phantoms(321, 1, (148, 114), tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name] and len(again) == 4


def test_cli_trains_on_any_dataset_with_folds_resume_curves_and_manifest(tmp_path):
    """`train glam --dataset NAME=FOLDER --folds`: real views of the other folds validate, hybrids of
    them are dropped, the manifest names sources / licences / folds without data paths, --resume
    continues the run folder's history and curves."""
    import csv

    from dicom_ai.cli import main
    from dicom_ai.data import write_study
    from dicom_ai.data.phantom import generate_study
    from dicom_ai.networks.pipeline import Pipeline

    for seed in (1, 2, 4):
        write_study(generate_study(seed, shape=(222, 170)), tmp_path / "studies" / f"s{seed}")
    folder = str(tmp_path / "studies")
    common = ["train", "glam", "--dataset", f"phantom={folder}", "--dataset", f"hybrid:phantom={folder}",
              "--copies", "1", "--folds", "0,1", "--k-folds", "3", "--epochs-joint", "0",
              "--batch-size", "4", "--no-progress", "--run-dir", str(tmp_path / "run"),
              "--work-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "bundle")]
    # A run stopped after its first epoch (as if killed), then resumed with the full schedule.
    assert main([*common, "--epochs-global", "1", "--epochs-local", "0"]) == 0
    first = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["training"]
    assert [h["stage"] for h in first["history"]] == ["global"]
    assert main([*common, "--epochs-global", "2", "--epochs-local", "1", "--resume"]) == 0
    training = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["training"]
    # Resumed: the finished global epoch is kept, the second one and the local stage run after it.
    assert [(h["stage"], h["epoch"]) for h in training["history"]] == [("global", 1), ("global", 2), ("local", 3)]
    assert training["history"][0] == first["history"][0]
    names = [s["dataset"] for s in training["sources"]]
    assert names == ["phantom", "hybrid:phantom"] and training["folds"] == [0, 1]
    phantom, hybrid = training["sources"]
    assert phantom["images"] + hybrid["images"] <= 24 and hybrid["copies"] == 1 and hybrid["mass_contrast"] == [0.2, 0.6]
    assert training["licences"] and "dicom_ai" in " ".join(training["licences"])
    assert folder not in training["command"] and "phantom=<folder>" in training["command"]
    assert "<run-dir>" in training["command"]
    with open(tmp_path / "run" / "curves.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and "val_auc_any" in rows[0]
    assert (tmp_path / "run" / "curves.png").is_file()
    # The bundle is one the node loads.
    Pipeline.from_bundles([str(tmp_path / "bundle")], device="cpu")
