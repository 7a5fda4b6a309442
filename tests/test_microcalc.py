"""Microcalcification CNNs: dense = patch-by-patch, taxonomy, clusters, training, bundle."""

import numpy as np
import pytest
import torch

from dicom_ai.networks.bundle import load_bundle, save_bundle
from dicom_ai.core.findings import ModelIdentity
from dicom_ai.networks.microcalc import C1, C2, C3, C4, MicrocalcConfig, MicrocalcModel, PatchCNN, group_clusters, patch_class, patch_classes, sliding_window_logits
from dicom_ai.networks.pipeline import model_from_bundle
from dicom_ai.imaging import mammogram_from_array
from dicom_ai.data.cache import generator_version
from dicom_ai.training.microcalc import INTENDED_USE, PatchSet, extract_patches, patch_cache_folder, phantom_patches, train_network



def synthetic_image(rng, shape=(200, 200), n_dots=12):
    """Smooth background with small bright disks (radius 1-3 px); returns image, MC mask."""
    noise = torch.from_numpy(rng.normal(size=(1, 1, shape[0] // 8 + 2, shape[1] // 8 + 2)).astype(np.float32))
    background = torch.nn.functional.interpolate(noise, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    image = 0.45 + 0.08 * background + rng.normal(0, 0.01, shape)
    mask = np.zeros(shape, dtype=bool)
    rr, cc = np.mgrid[:shape[0], :shape[1]]
    for _ in range(n_dots):
        r, c, rad = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10), rng.uniform(1.0, 3.0)
        disk = (rr - r) ** 2 + (cc - c) ** 2 <= rad**2
        mask |= disk
        image[disk] += 0.25
    return np.clip(image, 0, 1).astype(np.float32), mask


@pytest.mark.parametrize("padding_size", [("valid", 29), ("valid", 49)])
def test_dense_equals_patch_by_patch(padding_size):
    padding, size = padding_size
    torch.manual_seed(0)
    net = PatchCNN(MicrocalcConfig(patch_size=size, padding=padding)).eval()
    region = torch.rand(2, 1, size + 21, size + 18)
    with torch.no_grad():
        for stride in (1, 4):
            dense = net.dense_logits(region, stride)
            naive = sliding_window_logits(net, region, stride)
            assert dense.shape == naive.shape == (2, 2, 21 // stride + 1, 18 // stride + 1)
            torch.testing.assert_close(dense, naive, atol=1e-5, rtol=1e-4)


def test_same_padding_dense_is_only_an_approximation():
    # Documented behaviour: "same" pads at every patch border in training but only at the
    # region border densely, so the two differ; the benchmark reports by how much.
    torch.manual_seed(0)
    net = PatchCNN(MicrocalcConfig(patch_size=29, padding="same")).eval()
    region = torch.rand(1, 1, 45, 45)
    with torch.no_grad():
        diff = (net.dense_logits(region, 1) - sliding_window_logits(net, region, 1)).abs().max()
    assert diff > 1e-6


def test_cascade_tiles_equal_sliding_window():
    """The tiled whole-image cascade gives the Segmentator's patch-by-patch output where the
    Detector fired (here everywhere: threshold 0)."""
    torch.manual_seed(1)
    cfg = MicrocalcConfig(patch_size=29, padding="valid", detector_threshold=0.0, tile=32)
    model = MicrocalcModel(PatchCNN(cfg), PatchCNN(cfg), ModelIdentity("t", "0"))
    image = np.random.default_rng(0).random((45, 70)).astype(np.float32)
    prob, visited = model.dense_cascade(image, seg_tile=24)
    padded = torch.from_numpy(np.pad(image, 14))[None, None]
    with torch.no_grad():
        ref = torch.softmax(sliding_window_logits(model.segmentator, padded, 1), 1)[0, 1].numpy()
        det = model.detector_map(image)
        det_ref = torch.softmax(sliding_window_logits(model.detector, padded, 4), 1)[0, 1].numpy()
    np.testing.assert_allclose(prob, ref, atol=1e-5)
    np.testing.assert_allclose(det, det_ref, atol=1e-5)
    assert visited == 1.0


def test_taxonomy_on_hand_made_masks():
    p = 49  # near window half-size 8
    empty = np.zeros((p, p), dtype=bool)
    assert patch_class(empty) == C4
    m = empty.copy(); m[24, 24] = True
    assert patch_class(m) == C1
    m = empty.copy(); m[24 + 3, 24 - 8] = True
    assert patch_class(m) == C2
    m = empty.copy(); m[24 + 9, 24] = True
    assert patch_class(m) == C3
    m = empty.copy(); m[0, 48] = True
    assert patch_class(m) == C3
    # Per-pixel classes on a larger mask: one MC at (50, 50).
    big = np.zeros((101, 101), dtype=bool); big[50, 50] = True
    cls = patch_classes(big, 29)  # near = 4, half patch = 14
    assert cls[50, 50] == C1 and cls[54, 46] == C2 and cls[55, 50] == C3
    assert cls[64, 36] == C3 and cls[65, 50] == C4 and cls[0, 0] == C4


def test_cached_patch_classes_agree_with_taxonomy():
    rng = np.random.default_rng(3)
    image, mask = synthetic_image(rng, (150, 150), n_dots=6)
    patches = extract_patches(image, mask, np.ones_like(mask), rng,
                              {"on": 10, "edge": 10, "near": 10, "periphery": 10, "far": 10})
    assert len(patches) > 20
    for size in (29, 49):
        _, masks = patches.crop(size)
        expected = [patch_class(m) for m in masks]
        assert list(patches.classes(size)) == expected
    assert set(patches.classes(49)) == {1, 2, 3, 4}


def test_cluster_grouping():
    # Three calcifications within 1 cm^2 form one cluster; a pair and a lone one do not.
    pts = np.array([[10.0, 10.0], [12.0, 11.0], [11.0, 14.0],  # cluster A
                    [40.0, 40.0], [43.0, 40.0],  # only two: no cluster
                    [80.0, 10.0]])
    groups = group_clusters(pts, min_count=3, link_mm=5.0)
    assert [sorted(g.tolist()) for g in groups] == [[0, 1, 2]]
    # A chain of neighbours 4 mm apart links; a 6 mm gap splits.
    chain = np.array([[0.0, 0.0], [4.0, 0.0], [8.0, 0.0], [14.0, 0.0], [18.0, 0.0], [22.0, 0.0]])
    assert [g.tolist() for g in group_clusters(chain)] == [[0, 1, 2], [3, 4, 5]]
    assert group_clusters(chain[:2]) == []


def test_model_clusters_on_a_drawn_map():
    cfg = MicrocalcConfig(patch_size=29)
    model = MicrocalcModel(PatchCNN(cfg), PatchCNN(cfg), ModelIdentity("t", "0"))
    prob = np.zeros((400, 400), dtype=np.float32)
    for r, c, v in [(100, 100, 0.9), (120, 130, 0.8), (140, 100, 0.7), (300, 300, 0.95)]:
        prob[r - 2:r + 2, c - 2:c + 2] = v
    # 0.05 mm working grid, source at 0.1 mm, crop origin (10, 20).
    clusters = model._clusters(prob, (0.1, 0.1), (10, 20))
    assert len(clusters) == 1
    cl = clusters[0]
    assert cl.count == 3 and cl.score == pytest.approx(0.8, abs=1e-6)
    assert cl.centroid[0] == pytest.approx(10 + 119.5 / 2, abs=0.5)
    assert cl.centroid[1] == pytest.approx(20 + 109.5 / 2, abs=0.5)


def test_training_reduces_the_loss():
    rng = np.random.default_rng(0)
    sets = []
    for k in range(4):
        image, mask = synthetic_image(rng, (160, 160), n_dots=10)
        sets.append(extract_patches(image, mask, np.ones_like(mask), rng,
                                    {"on": 40, "edge": 30, "near": 30, "periphery": 40, "far": 60}))
    patches = PatchSet.concat(sets)
    cfg = MicrocalcConfig(patch_size=29, widths=(8, 16, 16), fc_units=32)
    _, losses = train_network(cfg, "segmentator", patches, steps=80, batch=32, lr=2e-3, progress=False)
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])


def test_bundle_round_trip_and_predict(tmp_path):
    torch.manual_seed(2)
    cfg = MicrocalcConfig(patch_size=29, widths=(8, 8, 8), fc_units=16, detector_threshold=0.0)
    model = MicrocalcModel(PatchCNN(cfg), PatchCNN(cfg), ModelIdentity("microcalc", "0.0.1"))
    manifest = {"name": "microcalc", "version": "0.0.1", "architecture": {"kind": "microcalc", **cfg.to_dict()},
                "input": {"pixel_spacing_mm": 0.05}, "intended_use": INTENDED_USE, "training": {},
                "thresholds": {"calcification": 0.4, "calcification_cluster": 0.6}}
    save_bundle(tmp_path / "mc", manifest, model.state_dict())
    bundle = load_bundle(tmp_path / "mc")
    loaded = model_from_bundle(bundle, torch.device("cpu"))
    assert isinstance(loaded, MicrocalcModel) and loaded.config == cfg
    assert loaded.identity.name == "microcalc" and loaded.calcification_threshold == 0.4

    image, _ = synthetic_image(np.random.default_rng(5), (90, 70))
    image[:, 55:] = 0.0  # background beside the breast
    mg = mammogram_from_array(image, "L", "CC", spacing_mm=(0.07, 0.07))
    out = loaded.predict(mg)
    names = [m.finding for m in out.maps]
    assert names == ["calcification", "calcification_cluster"]
    for m in out.maps:
        assert m.probability.shape == image.shape and m.probability.dtype == np.float32
        assert 0.0 <= m.probability.min() and m.probability.max() <= 1.0
    np.testing.assert_array_equal(out.maps[0].probability, model.predict(mg).maps[0].probability)
    assert out.maps[1].threshold == 0.6


def test_shipped_bundle_loads():
    bundle = load_bundle("microcalc")
    model = MicrocalcModel.from_bundle(bundle, "cpu")
    assert "not for clinical use" in bundle.manifest["intended_use"]
    # 0.4.0: the seed-002 networks at a 0.07 mm working pixel (39 px = 2.7 mm of context).
    assert model.config.patch_size == 39 and model.config.padding == "valid"
    assert model.config.pixel_spacing_mm == 0.07
    assert set(bundle.manifest["thresholds"]) == {"calcification", "calcification_cluster"}


def test_patch_cache_folder_is_keyed_by_the_generator_code(tmp_path):
    folder = patch_cache_folder(tmp_path, 7, (3328, 2560))
    assert folder.name == f"seed7_3328x2560-{generator_version()}"
    assert patch_cache_folder(tmp_path, 7, (3328, 2560), {"on": 1}) != folder
    # phantom_patches reads that folder (complete once its marker is written), not an older one.
    folder.mkdir()
    np.save(folder / "images.npy", np.full((2, 49, 49), 0.5, np.float16))
    np.save(folder / "masks.npy", np.zeros((2, 49, 49), bool))
    np.save(folder / "source.npy", np.array([70, 71]))
    (folder / "meta.json").write_text('{"seed": 7, "shape": [3328, 2560], "count": 2}')
    patches = phantom_patches(7, tmp_path, (3328, 2560))
    assert len(patches) == 2 and patches.images.dtype == np.float32 and list(patches.source) == [70, 71]
