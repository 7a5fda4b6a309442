"""`dicom-ai train dunet`: patch training at a working pixel size, resume, curves, bundle (tiny phantoms)."""

import csv
import json

import numpy as np
import pytest
import torch

from dicom_ai.cli import main
from dicom_ai.data.phantom import generate_study
from dicom_ai.imaging import mammogram_from_array
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig, DUNetModel, calibrate, working_grid
from dicom_ai.networks.pipeline import Pipeline
from dicom_ai.training.checkpoint import RunState
from dicom_ai.training import dunet_patches as patches
from dicom_ai.training.dunet_patches import candidate_level, fit_platt, phantom_working_images, sample_patches

TINY = ["--dataset", "phantom", "--phantom-seeds", "0:3", "--phantom-shape", "128x96", "--pixel-size", "2.0",
        "--patch", "32", "--channels", "4,8,16", "--steps-per-epoch", "2", "--batch-size", "2"]


def _run(tmp_path, *extra):
    return main(["train", "dunet", *TINY, "--cache-dir", str(tmp_path / "cache"), *extra])


def test_working_grid_is_at_the_asked_pixel_size():
    pixels = np.zeros((500, 300), dtype=np.float32)
    pixels[100:400, :200] = 0.6  # a breast 300 x 200 source pixels at the chest wall (column 0)
    m = mammogram_from_array(pixels, "L", "CC", (0.2, 0.2))
    geo, image, breast = working_grid(m, 0.4, 16)
    assert image.shape[0] % 16 == 0 and image.shape[1] % 16 == 0
    r0, r1, c0, c1 = geo.box
    # 0.4 mm working pixels are two 0.2 mm source pixels on both axes.
    assert (r1 - r0) == 2 * image.shape[0] and (c1 - c0) == 2 * image.shape[1]
    assert image.shape[0] >= 150 and image.shape[1] >= 100  # the whole breast is inside
    assert breast.sum() == pytest.approx(150 * 100, rel=0.05)
    assert geo.inverse(image).shape == pixels.shape


def test_patches_centre_on_masses_at_the_lesion_rate():
    images = phantom_working_images([1, 2], (128, 96), 2.0, 4)
    rng = np.random.default_rng(0)
    _, lesions, _ = sample_patches(images, 40, 16, rng, lesion_rate=1.0)
    assert lesions.any(axis=(1, 2)).all()
    x, lesions, breast = sample_patches(images, 40, 16, rng, lesion_rate=0.0)
    assert x.shape == (40, 16, 16) and 0.0 <= x.min() and x.max() <= 1.0
    assert breast.any(axis=(1, 2)).all()


def test_platt_scaling_orders_and_spreads_scores():
    rng = np.random.default_rng(1)
    hits = np.r_[np.ones(30, bool), np.zeros(120, bool)]
    scores = np.where(hits, rng.normal(1.2, 0.15, 150), rng.normal(0.8, 0.2, 150))
    cal = fit_platt(scores, hits)
    assert cal["slope"] > 0
    p = calibrate(torch.tensor([0.7, 1.0, 1.3]), cal).numpy()
    assert (np.diff(p) > 0).all() and p.max() < 0.999  # no saturation at 1
    # As a map threshold, the candidate level keeps the regions of raw >= 0.1.
    assert candidate_level(cal) == pytest.approx(float(calibrate(torch.tensor(0.1), cal)), rel=1e-5)
    with pytest.raises(ValueError):
        fit_platt([0.5, 0.6], [False, False])


def test_run_state_round_trips_weights_and_optimiser(tmp_path):
    net = DiscriminativeUNet(DUNetConfig(input_shape=(16, 16), channels=(4, 8, 16)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(1, 1, 16, 16)).sum().backward()
    opt.step()
    RunState(tmp_path).save(net, opt, 3, [{"epoch": 3, "train_loss": 0.5}], {"stage": "segment"})
    other = DiscriminativeUNet(DUNetConfig(input_shape=(16, 16), channels=(4, 8, 16)))
    opt2 = torch.optim.Adam(other.parameters(), lr=1e-3)
    epoch, history, info = RunState(tmp_path).load(other, opt2)
    assert epoch == 3 and history[0]["train_loss"] == 0.5 and info["stage"] == "segment"
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    wrong = DiscriminativeUNet(DUNetConfig(input_shape=(16, 16), channels=(8, 16, 32)))
    with pytest.raises(ValueError, match="does not fit"):
        RunState(tmp_path).load(wrong)


def test_pretrain_segment_resume_and_a_bundle_the_pipeline_runs(tmp_path, monkeypatch):
    ckpt = tmp_path / "pre.safetensors"
    assert _run(tmp_path, "--stage", "pretrain", "--epochs", "1", "--run-dir", str(tmp_path / "pre"),
                "--out", str(ckpt)) == 0
    assert ckpt.is_file() and (tmp_path / "pre" / "curves.csv").is_file()

    seg = ["--stage", "segment", "--init", str(ckpt), "--folds", "0,1,2,3,4", "--epochs", "2"]
    real_train = patches.train

    def interrupted(*a, **kw):  # the run is killed once its first epoch is saved
        def stop(epoch, record):
            raise KeyboardInterrupt
        return real_train(*a, **dict(kw, on_epoch=stop))

    monkeypatch.setattr(patches, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, *seg, "--run-dir", str(tmp_path / "a"), "--out", str(tmp_path / "never"))
    monkeypatch.setattr(patches, "train", real_train)
    assert not (tmp_path / "never").exists()
    assert _run(tmp_path, *seg, "--run-dir", str(tmp_path / "a"), "--resume", "--out", str(tmp_path / "resumed")) == 0
    # The resumed run ends where an uninterrupted one does.
    assert _run(tmp_path, *seg, "--run-dir", str(tmp_path / "c"), "--out", str(tmp_path / "full")) == 0
    resumed, full = load_bundle(str(tmp_path / "resumed")), load_bundle(str(tmp_path / "full"))
    for k, v in full.state_dict.items():
        assert torch.allclose(v, resumed.state_dict[k], atol=1e-5), k
    rows = list(csv.DictReader((tmp_path / "a" / "curves.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(float(r["train_loss"]) > 0 for r in rows)
    assert (tmp_path / "a" / "curves.png").stat().st_size > 0

    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["architecture"]["pixel_spacing_mm"] == 2.0
    assert manifest["finding"] == "mass" and manifest["training"]["data"][0]["images"] == 12
    assert "--resume" not in manifest["training"]["command"] and "<folder>" not in manifest["training"]["command"]
    assert manifest["training"]["pretraining"]["stage"] == "pretrain"

    study = generate_study(4, shape=(128, 96))
    findings = Pipeline.from_bundles([str(tmp_path / "resumed")], device="cpu").run([im.dataset for im in study.images])
    for f, im in zip(findings, study.images):
        (pmap,) = f.maps
        assert pmap.finding == "mass" and pmap.probability.shape == im.masks["mass_malignant"].shape
        assert np.isfinite(pmap.probability).all()


def test_bad_arguments_are_refused_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "dunet", "--stage", "segment", "--dataset", "mias", "--out", str(tmp_path / "x")])
    assert "needs its folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="one --pixel-size"):
        _run(tmp_path, "--stage", "segment", "--pixel-size", "0.4", "0.8", "--out", str(tmp_path / "y"))


def test_calibrated_model_maps_do_not_saturate(tmp_path):
    config = DUNetConfig(input_shape=(32, 32), channels=(4, 8, 16), pixel_spacing_mm=2.0)
    net = DiscriminativeUNet(config)
    from dicom_ai.core.findings import ModelIdentity
    model = DUNetModel(net, ModelIdentity("dunet", "t"), finding="mass",
                       calibration={"method": "platt", "slope": 4.0, "intercept": -2.0})
    study = generate_study(1, shape=(128, 96))
    from dicom_ai.imaging import read_mammogram
    out = model.predict(read_mammogram(study.images[0].dataset))
    p = out.maps[0].probability
    assert 0.0 <= p.min() and p.max() < 1.0


def test_an_adapter_folder_trains_with_patient_level_folds(tmp_path):
    from dicom_ai.data import write_study

    for seed in (1, 2, 4):
        write_study(generate_study(seed, shape=(128, 96)), tmp_path / "studies" / f"s{seed}")
    out = tmp_path / "bundle"
    assert main(["train", "dunet", "--stage", "segment", "--dataset", f"phantom={tmp_path / 'studies'}",
                 "--folds", "0,1,2", "--k-folds", "3", "--pixel-size", "2.0", "--patch", "32", "--channels", "4,8,16",
                 "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"),
                 "--run-dir", str(tmp_path / "run"), "--out", str(out)]) == 0
    (source,) = json.loads((out / "manifest.json").read_text())["training"]["data"]
    assert source["dataset"] == "phantom" and source["images"] == 12 and source["with_mass"] >= 4
    assert source["folds"] == [0, 1, 2]
    # Every view of one study (one patient) lands in one fold.
    from dicom_ai.data.datasets import open_dataset
    from dicom_ai.cli.train import _fold_function
    ds = open_dataset("phantom", tmp_path / "studies")
    fold = _fold_function(ds, 3)
    by_patient = {}
    for i in range(len(ds)):
        by_patient.setdefault(ds.patient(i), set()).add(fold(i))
    assert all(len(f) == 1 for f in by_patient.values())
