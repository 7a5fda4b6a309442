"""Cluster stage of microcalc >= 0.3: sized calcifications, cluster features, cluster model,
per pixel-size calibration, and its use by MicrocalcModel."""

import json

import numpy as np
import pytest
import torch

from dicom_ai.core.errors import ModelError
from dicom_ai.core.findings import ModelIdentity
from dicom_ai.networks.bundle import load_bundle, save_bundle
from dicom_ai.networks.microcalc import MicrocalcConfig, MicrocalcModel, PatchCNN
from dicom_ai.networks.pipeline import model_from_bundle
from dicom_ai.training.microcalc import INTENDED_USE
from dicom_ai.networks.microcalc_clusters import (FEATURES, ClusterConfig, calibrated, candidate_clusters,
                                                  cluster_score, components, local_contrast)
from dicom_ai.training.microcalc_clusters import fit_logistic, spacing_calibration, write_cluster_bundle


def drawn(spots, shape=(400, 400), noise=0.01, seed=0):
    """Working-grid (0.05 mm) probability map and image with square spots (row, col, half-size px, prob, brightness)."""
    rng = np.random.default_rng(seed)
    prob = np.zeros(shape, np.float32)
    image = (0.4 + rng.normal(0, noise, shape)).astype(np.float32)
    for r, c, h, p, b in spots:
        prob[r - h:r + h + 1, c - h:c + h + 1] = p
        image[r - h:r + h + 1, c - h:c + h + 1] += b
    return prob, image


def test_calcifications_are_sized_in_millimetres():
    # half-size 0 -> 1 px (0.056 mm), 2 -> 5x5 px (0.28 mm), 12 -> 25x25 px (1.4 mm)
    prob, _ = drawn([(50, 50, 0, 0.9, 0.2), (100, 100, 2, 0.9, 0.2), (200, 200, 12, 0.9, 0.2)])
    comps = components(prob, 0.5)
    assert sorted(c.area_px for c in comps) == [1, 25, 625]
    d = sorted(c.diameter_mm(0.05) for c in comps)
    assert d[0] < 0.1 and 0.1 < d[1] < 1.0 and d[2] > 1.0
    cfg = ClusterConfig(min_diameter_mm=0.1, max_diameter_mm=1.0, min_count=1)
    found = candidate_clusters(prob, _, 0.05, cfg)
    assert [len(g) for g, _, _ in found] == [1] and found[0][0][0].area_px == 25


def test_contrast_over_local_noise_and_nan_windows():
    prob, image = drawn([(100, 100, 1, 0.9, 0.3), (300, 300, 1, 0.9, 0.02)], noise=0.01)
    comps = sorted(components(prob, 0.5), key=lambda c: c.centroid[0])
    local_contrast(comps, image, prob < 0.2)
    assert comps[0].cnr > 15 > 4 > comps[1].cnr > 0
    # Pixels without image (NaN, as in the offline dumps) are ignored, not propagated.
    holes = image.copy()
    holes[:, 110:] = np.nan
    again = sorted(components(prob, 0.5), key=lambda c: c.centroid[0])
    local_contrast(again, holes, prob < 0.2)
    assert np.isfinite(again[0].cnr) and again[0].cnr == pytest.approx(comps[0].cnr, rel=0.3)


def test_candidate_clusters_follow_count_and_linking():
    group = [(100 + 20 * k, 100 + 15 * (k % 2), 2, 0.8, 0.2) for k in range(5)]  # 5 calcs 1 mm apart
    pair = [(300, 300, 2, 0.9, 0.2), (300, 330, 2, 0.9, 0.2)]
    prob, image = drawn(group + pair)
    found = candidate_clusters(prob, image, 0.05, ClusterConfig(min_count=3, min_diameter_mm=0.1, max_diameter_mm=1.0))
    assert [len(g) for g, _, _ in found] == [5]
    feats, score = found[0][1], found[0][2]
    assert feats.shape == (len(FEATURES),) and np.all(np.isfinite(feats))
    assert feats[FEATURES.index("count")] == pytest.approx(np.log1p(5))
    assert score == pytest.approx(0.8)  # no cluster model: the mean of the three highest peaks
    assert candidate_clusters(prob, image, 0.05, ClusterConfig(min_count=6)) == []
    # 15 px = 0.75 mm links at 1 mm, not at 0.5 mm (the spots 20 px apart stay apart too)
    assert candidate_clusters(prob, image, 0.05, ClusterConfig(min_count=3, link_mm=0.5)) == []


def test_cluster_model_fit_separates_and_scores():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, len(FEATURES)))
    y = (x[:, 0] + 0.5 * x[:, 5] + 0.3 * rng.normal(size=300)) > 1.0
    fitted = fit_logistic(x, y, l2=1.0)
    cfg = ClusterConfig(**fitted)
    assert fitted["weights"][0] > 0 and fitted["weights"][5] > 0
    s = np.array([cluster_score(v, cfg) for v in x])
    assert s[y].mean() > 0.7 > 0.3 > s[~y].mean()
    with pytest.raises(ModelError):
        fit_logistic(x, np.zeros(300, bool))
    with pytest.raises(ModelError):
        ClusterConfig(weights=[1.0], mean=[0.0], std=[1.0])


def test_sharp_calibration_matches_false_rates():
    # Sharp backgrounds give many more high-scoring false candidates than film ones.
    rng = np.random.default_rng(2)
    film = rng.uniform(0.0, 0.8, 40)      # 40 false candidates on 80 film images
    sharp = rng.uniform(0.3, 1.0, 200)    # 200 on 20 sharp images
    cal = spacing_calibration((film, 80), (sharp, 20))
    cfg = ClusterConfig(sharp_calibration=cal)
    assert np.all(np.diff(cal["raw"]) > 0) and np.all(np.diff(cal["mapped"]) >= 0)
    for t in (0.5, 0.6, 0.7):
        film_rate = (film >= t).sum() / 80
        sharp_rate = sum(calibrated(v, 0.07, cfg) >= t for v in sharp) / 20
        assert sharp_rate <= film_rate + 0.35  # about the same rate, not 10 times more
        assert (sharp >= t).sum() / 20 > 3 * film_rate + 1
    # film images (coarser than 0.1 mm) keep their raw score
    assert calibrated(0.9, 0.2, cfg) == 0.9 and calibrated(0.9, 0.07, cfg) < 0.9
    with pytest.raises(ModelError):
        ClusterConfig(sharp_calibration={"raw": [0.0, 0.5, 0.4], "mapped": [0.0, 0.1, 0.2]})


def test_model_uses_the_cluster_stage_and_the_pixel_size_class():
    cfg = MicrocalcConfig(patch_size=29)
    cal = {"raw": [0.0, 0.5, 1.0], "mapped": [0.0, 0.1, 1.0]}
    clusters = ClusterConfig(min_diameter_mm=0.1, max_diameter_mm=1.0, min_count=3, sharp_calibration=cal)
    model = MicrocalcModel(PatchCNN(cfg), PatchCNN(cfg), ModelIdentity("t", "0"), clusters=clusters)
    spots = [(100, 100, 2, 0.9, 0.2), (120, 130, 2, 0.8, 0.2), (140, 100, 2, 0.7, 0.2),
             (300, 300, 0, 0.95, 0.2), (310, 300, 0, 0.95, 0.2), (300, 310, 0, 0.95, 0.2)]  # 1-px specks: too small
    prob, image = drawn(spots)
    film = model._clusters(prob, (0.2, 0.2), (10, 20), image)
    assert len(film) == 1 and film[0].count == 3 and film[0].score == pytest.approx(0.8, abs=1e-6)
    assert film[0].centroid[0] == pytest.approx(10 + 120 / 4, abs=0.5)
    sharp = model._clusters(prob, (0.07, 0.07), (10, 20), image)
    assert sharp[0].score == pytest.approx(0.1 + 0.9 * 0.3 / 0.5, abs=1e-6)  # 0.8 mapped: 0.64
    # without the image the 0.2 stage runs (1-px specks count there, but are < 3 px)
    assert len(model._clusters(prob, (0.2, 0.2), (10, 20))) == 1


def test_cluster_bundle_keeps_the_weights_and_sets_the_points(tmp_path):
    cfg = MicrocalcConfig(patch_size=29, widths=(8, 8, 8), fc_units=16)
    model = MicrocalcModel(PatchCNN(cfg), PatchCNN(cfg), ModelIdentity("microcalc", "0.2.0"))
    manifest = {"name": "microcalc", "version": "0.2.0", "architecture": {"kind": "microcalc", **cfg.to_dict()},
                "input": {"pixel_spacing_mm": 0.05}, "intended_use": INTENDED_USE, "training": {"data": "x"},
                "thresholds": {"calcification": 0.5, "calcification_cluster": 0.5}}
    save_bundle(tmp_path / "src", manifest, model.state_dict())
    point = {"threshold": 0.9, "mias_rate_target": 0.125,
             "mias_cv": {"sensitivity": 0.2, "false_clusters_per_image": 0.1}, "B_sharp_all": {"x": 1}}
    evaluation = {"final": {"points": {"fp0.25": point, "fp1": dict(point, threshold=0.6)},
                            "mias_froc": {}, "B_sharp_froc": {}}}
    clusters = ClusterConfig(min_diameter_mm=0.1, max_diameter_mm=1.0, sharp_calibration={"raw": [0, 1], "mapped": [0, 1]})
    write_cluster_bundle(tmp_path / "src", tmp_path / "new", clusters, "0.3.0", evaluation)
    bundle = load_bundle(tmp_path / "new")
    loaded = model_from_bundle(bundle, "cpu")
    assert bundle.identity.version == "0.3.0" and loaded.clusters == clusters
    assert loaded.cluster_threshold == 0.9 and bundle.identity.operating_point == "fp0.25"
    assert "calcification" in bundle.identity.off  # single specks are not findings
    assert model_from_bundle(load_bundle(tmp_path / "new", operating_point="fp1"), "cpu").cluster_threshold == 0.6
    demo = model_from_bundle(load_bundle(tmp_path / "new", operating_point="phantom"), "cpu")
    assert demo.cluster_threshold == 0.5 and demo.calcification_threshold == 0.5 and not demo.identity.off
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(ModelError):
        write_cluster_bundle(tmp_path / "src", tmp_path / "bad", clusters, "0.3.0", evaluation, default="fp0.5")
    # A cross-validation variant says which mini-MIAS fold its choices left out.
    write_cluster_bundle(tmp_path / "src", tmp_path / "fold2", clusters, "0.3.0-fold2", evaluation, mias_held_out=2)
    fold = json.loads((tmp_path / "fold2" / "manifest.json").read_text())
    assert "fold 2" in fold["training"]["cluster_stage"]["mias_held_out_fold"]
    assert all("but fold 2" in pt["data"] for pt in fold["operating_points"]["findings"]["calcification_cluster"]
               if pt["name"] != "phantom")
    assert "mias_held_out_fold" not in json.loads((tmp_path / "new" / "manifest.json").read_text())["training"]["cluster_stage"]
    # The manifest says which image the cluster features were computed on (0.3.0: the dumps'
    # 2 mm windows, not the node's working image).
    assert "windows" in json.loads((tmp_path / "new" / "manifest.json").read_text())["training"]["cluster_stage"]["features_from"]
    write_cluster_bundle(tmp_path / "src", tmp_path / "exact", clusters, "0.4.0", dict(evaluation, scoring="working image"))
    assert json.loads((tmp_path / "exact" / "manifest.json").read_text())["training"]["cluster_stage"]["features_from"] == "working image"
