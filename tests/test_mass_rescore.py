"""The U-Net's false-positive reduction stage: regions, features, the rescored map, training, the bundle
and `dicom-ai train dunet --stage rescore` (small synthetic images only)."""

import json

import numpy as np
import pytest
import torch

from dicom_ai.cli import main
from dicom_ai.core.errors import BundleError, ModelError
from dicom_ai.data import write_study
from dicom_ai.data.phantom import generate_study
from dicom_ai.imaging import mammogram_from_array
from dicom_ai.networks.bundle import load_bundle, save_bundle
from dicom_ai.networks.dunet import RESCORE_PREFIX, DiscriminativeUNet, DUNetConfig, DUNetModel, working_grid
from dicom_ai.networks.pipeline import Pipeline
from dicom_ai.networks.mass_rescore import (FEATURES, MassRescoreNet, RescoreConfig, candidate_regions, combine,
                                            region_features, region_patches, rescore_regions, rescored_map)
from dicom_ai.training.dunet_patches import patch_manifest
from dicom_ai.training.mass_rescore import Examples, attach_rescore, image_examples, train_rescorer


def _blobs(shape=(64, 48)):
    out = np.zeros(shape, dtype=np.float32)
    rr, cc = np.mgrid[:shape[0], :shape[1]]
    out += 0.6 * np.exp(-((rr - 20) ** 2 + (cc - 15) ** 2) / 20.0)  # a round blob
    out += 0.3 * np.exp(-((rr - 45) ** 2 + (cc - 30) ** 2) / 8.0)   # a smaller, fainter one
    return out


def test_regions_features_patches_and_the_rescored_map():
    output = _blobs()
    image = 0.4 + output
    allowed = np.ones(output.shape, dtype=bool)
    allowed[:, 40:] = False
    config = RescoreConfig(pixel_spacing_mm=0.8)
    regions = candidate_regions(output, allowed, 0.1)
    assert len(regions) == 2
    assert sorted(round(r.peak, 2) for r in regions) == [0.3, 0.6]
    feats = region_features(regions, output, image, allowed, config)
    assert feats.shape == (2, len(FEATURES)) and np.isfinite(feats).all()
    big = int(np.argmax([r.peak for r in regions]))
    assert feats[big, FEATURES.index("contrast")] > 0.1  # brighter than its ring
    assert feats[big, FEATURES.index("log_area_mm2")] > feats[1 - big, FEATURES.index("log_area_mm2")]
    win = region_patches(regions, output, image, config)
    assert win.shape == (2, 2, config.window_px, config.window_px)
    # The window is centred on the region: its output channel peaks at the centre.
    assert abs(np.unravel_index(win[big, 1].argmax(), win[big, 1].shape)[0] - config.window_px // 2) <= 1

    floor = 1e-4
    new = rescored_map(regions, np.array([0.05, 0.8]), output, floor)
    for reg, s in zip(regions, (0.05, 0.8)):
        values = new[reg.pixels[:, 0], reg.pixels[:, 1]]
        assert values.min() >= floor and values.max() == pytest.approx(s)
    # At the floor the regions are exactly the U-Net's candidate regions, and nothing else is set.
    assert ((new >= floor) == ((output >= 0.1) & allowed)).all()


def test_the_rescorer_learns_which_regions_are_masses():
    rng = np.random.default_rng(0)

    def draw(n):
        labels = (rng.random(n) < 0.15).astype(np.float32)
        feats = rng.normal(0, 1, (n, len(FEATURES))).astype(np.float32)
        feats[:, FEATURES.index("contrast")] += 3.5 * labels  # masses are brighter than their ring
        win = rng.normal(0, 0.1, (n, 2, 16, 16)).astype(np.float32)
        return Examples(win, feats, labels, np.stack([win] * 2))

    config = RescoreConfig(pixel_spacing_mm=2.0, window_mm=32, channels=(4,), members=2)
    net = train_rescorer(draw(600), config, epochs=8, batch_size=32, seed=0)
    test = draw(400)
    with torch.no_grad():
        logit = net(torch.from_numpy(test.windows), torch.from_numpy(test.features)).numpy()
    pos, neg = logit[test.labels == 1], logit[test.labels == 0]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc > 0.9
    with pytest.raises(ValueError, match="positive and negative"):
        train_rescorer(Examples(test.windows[:3], test.features[:3], np.zeros(3, np.float32),
                                np.stack([test.windows[:3]])), config)


def _constant_unet(config: DUNetConfig, level: float) -> DiscriminativeUNet:
    """A U-Net whose f(x) is the constant ``level``: its raw output x - f(x) marks whatever is brighter."""
    net = DiscriminativeUNet(config)
    with torch.no_grad():
        net.unet.out.weight.zero_()
        net.unet.out.bias.fill_(level)
    return net


def _base_bundle(path, config, level=0.6, version="t"):
    net = _constant_unet(config, level)
    manifest = patch_manifest(config, name="dunet", version=version, sources=[], command="test", history=[],
                              pretraining=None, training={},
                              calibration={"method": "platt", "slope": 2.0, "intercept": -6.0})
    return save_bundle(path, manifest, net.state_dict())


def test_the_node_model_runs_the_stage_from_its_bundle(tmp_path):
    config = DUNetConfig(input_shape=(32, 32), channels=(4, 8, 16), pixel_spacing_mm=0.8)
    base = _base_bundle(tmp_path / "base", config)
    pixels = np.zeros((500, 300), dtype=np.float32)
    pixels[100:400, :200] = 0.4
    pixels[150:170, 40:60] = 0.95  # two bright spots: the constant U-Net's candidate regions
    pixels[300:330, 100:130] = 0.9
    m = mammogram_from_array(pixels, "L", "CC", (0.2, 0.2))
    rescore = MassRescoreNet(RescoreConfig(pixel_spacing_mm=0.8))
    out = attach_rescore(base, rescore, tmp_path / "rescored", {"note": "test"}, floor=1e-4, version="t2")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["thresholds"]["mass"] == 1e-4 and "calibration" not in manifest
    assert manifest["rescore"]["unet_calibration"]["slope"] == 2.0 and manifest["version"] == "t2"

    model = DUNetModel.from_bundle(load_bundle(out))
    assert model.rescore is not None and model.threshold == 1e-4
    pmap = model.predict(m).maps[0].probability
    # The map's regions carry the stage's scores, computed here directly on the working grid.
    geo, image, _ = working_grid(m, 0.8, config.multiple)
    raw = image - 0.6
    allowed = geo.forward((m.breast_mask & ~m.pectoral_mask).astype(np.float32)) > 0.5
    regions = candidate_regions(raw, allowed, 0.1)
    expected = rescore_regions(rescore, regions, raw, image, allowed)
    assert len(regions) == 2
    peaks = sorted(float(pmap[r0:r1, c0:c1].max()) for r0, r1, c0, c1 in ((150, 170, 40, 60), (300, 330, 100, 130)))
    assert peaks == pytest.approx(sorted(expected.tolist()), rel=0.05)
    assert pmap[:100].max() == 0 and pmap[420:].max() == 0  # nothing outside the candidate regions

    # The plain bundle keeps its calibrated map; rescore tensors without a manifest entry are refused.
    plain = DUNetModel.from_bundle(load_bundle(base))
    assert plain.rescore is None and plain.predict(m).maps[0].probability.max() < 1
    b = load_bundle(out)
    b.manifest = {k: v for k, v in b.manifest.items() if k != "rescore"}
    with pytest.raises(BundleError, match="no 'rescore' entry"):
        DUNetModel.from_bundle(b)
    assert any(k.startswith(RESCORE_PREFIX) for k in b.state_dict)


def test_train_dunet_stage_rescore_writes_a_bundle_from_out_of_fold_candidates(tmp_path):
    for seed in (1, 2, 4):
        write_study(generate_study(seed, shape=(256, 192)), tmp_path / "studies" / f"s{seed}")
    config = DUNetConfig(input_shape=(32, 32), channels=(4, 8, 16), pixel_spacing_mm=0.8)
    folds = tmp_path / "folds"
    for k in range(3):
        _base_bundle(folds / f"fold{k}", config, level=0.45, version=f"cv-fold{k}")
    args = ["train", "dunet", "--stage", "rescore", "--dataset", f"phantom={tmp_path / 'studies'}", "--k-folds", "3",
            "--cv-folds", str(folds), "--epochs", "2", "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match="--cv-folds"):
        main(["train", "dunet", "--stage", "rescore", "--dataset", f"phantom={tmp_path / 'studies'}",
              "--init", str(folds / "fold0"), "--out", str(tmp_path / "x")])
    out = tmp_path / "bundle"
    assert main(args + ["--folds", "1,2", "--init", str(folds / "fold0"), "--rescore-features-only",
                        "--version", "r0", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (source,) = manifest["rescore"]["sources"]
    assert source["folds"] == [1, 2] and source["on_a_mass"] >= 1 and source["candidates"] > source["on_a_mass"]
    assert manifest["rescore"]["config"]["use_patch"] is False and "<folder>" in manifest["rescore"]["command"]
    study = generate_study(4, shape=(256, 192))
    findings = Pipeline.from_bundles([str(out)], device="cpu").run([im.dataset for im in study.images])
    assert all(np.isfinite(f.maps[0].probability).all() for f in findings)


def test_config_choices_are_checked_and_scores_combine_monotonically():
    with pytest.raises(ModelError, match="features"):
        RescoreConfig(features=("peak", "colour"))
    with pytest.raises(ModelError, match="unet_weight"):
        RescoreConfig(unet_weight=1.5)
    cfg = RescoreConfig(features=("peak", "contrast"), use_patch=False, members=1)
    net = MassRescoreNet(cfg)
    assert net.members[0].head[0].in_features == 2
    assert RescoreConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    stage, unet = np.array([0.9, 0.2, 0.5]), np.array([0.1, 0.1, 0.5])
    assert np.allclose(combine(stage, unet, 0.0), stage)
    mid = combine(stage, unet, 0.5)  # the geometric mean of the two odds: 0.2 and 0.1 -> odds 1/6 -> 1/7
    assert mid[0] == pytest.approx(0.5) and mid[1] == pytest.approx(1 / 7, abs=1e-4) and mid[2] == pytest.approx(0.5)
