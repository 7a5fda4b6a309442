"""GLAM network, patch selection, preprocessing geometry and inference interface."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_ai.core.errors import BundleError
from dicom_ai.networks.bundle import Bundle
from dicom_ai.core.findings import ModelIdentity
from dicom_ai.networks.glam import CONFIGS, CamClassifier, Glam, GlamConfig, GlamModel, fuse, glam_geometry, glam_input, mask_to_grid, optimal_window, select_patches, top_t_pool
from dicom_ai.imaging import mammogram_from_array


#: A miniature of the same structure, for fast tests.
TINY = GlamConfig(name="tiny", input_shape=(192, 128), pixel_spacing_mm=0.5,
                  global_channels=(4, 4, 8, 8, 8), patch_size=32, train_num_patches=2,
                  local_channels=(4, 4, 4, 4), local_blocks=(1, 1, 1, 1), crop_noise_px=5,
                  crop_size_noise_px=5)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_config_matches_published_architecture():
    cfg = CONFIGS["paper"]
    assert cfg.input_shape == (2944, 1920)
    assert cfg.cam_shape == (184, 120)
    assert cfg.patch_window == (32, 32)
    assert cfg.local_map_size == 128
    net = Glam(cfg)
    assert _count(net.global_net) == pytest.approx(2.80e6, rel=0.005)
    assert _count(net.local_net) == pytest.approx(21.29e6, rel=0.002)
    assert _count(net) == pytest.approx(24.09e6, rel=0.002)


def test_config_round_trips_through_manifest_dict():
    cfg = CONFIGS["compact"]
    assert GlamConfig.from_dict({"kind": "glam", **cfg.to_dict()}) == cfg


@pytest.mark.parametrize("name", ["compact", "tiny"])
def test_output_shapes_and_value_ranges(name):
    cfg = TINY if name == "tiny" else CONFIGS["compact"]
    torch.manual_seed(0)
    net = Glam(cfg).eval()
    x = torch.randn(2, 1, *cfg.input_shape)
    with torch.no_grad():
        out = net(x, num_patches=2)
        fused = fuse(out, cfg)
    ch, cw = cfg.cam_shape
    g = out.global_
    for m in (g.s1, g.s2, g.s3, g.saliency):
        assert m.shape == (2, 2, ch, cw)
        assert float(m.min()) >= 0 and float(m.max()) <= 1
    assert g.prediction.shape == (2, 2) and out.local_prediction.shape == (2, 2)
    assert out.patch_maps.shape == (2, 2, 2, cfg.local_map_size, cfg.local_map_size)
    assert fused.shape == (2, 2, *cfg.input_shape)
    assert float(fused.min()) >= 0 and float(fused.max()) <= 1
    # Outside the selected patches the fused map is half the upsampled global map.
    r, c = out.patch_corners[0, 0].tolist()
    mask = torch.ones(cfg.input_shape, dtype=torch.bool)
    for rr, cc in out.patch_corners[0].tolist():
        mask[rr:rr + cfg.patch_size, cc:cc + cfg.patch_size] = False
    up = torch.nn.functional.interpolate(g.saliency, size=cfg.input_shape, mode="nearest")
    assert torch.allclose(fused[0][:, mask], up[0][:, mask] / 2)
    cam = CamClassifier(cfg)
    pred, logits = cam(x)
    assert pred.shape == (2, 2) and logits.shape[:2] == (2, 2)


def test_top_t_pool_takes_the_mean_of_the_largest_values():
    maps = torch.zeros(1, 1, 10, 10)
    maps[0, 0, 0, :3] = torch.tensor([1.0, 0.5, 0.3])
    assert top_t_pool(maps, 0.03).item() == pytest.approx(0.6)
    assert top_t_pool(maps, 0.0).item() == pytest.approx(1.0)  # at least one value


def test_patch_selection_on_a_hand_made_saliency_map():
    s = torch.zeros(1, 2, 24, 16)
    # Malignant hot spot, and a much fainter benign one: min-max normalisation makes them equal.
    s[0, 1, 10:14, 5:9] = 0.9
    s[0, 0, 2:6, 10:14] = 0.01
    corners = select_patches(s, k=3, window=(4, 4))
    # Equal scores: row-major order first; the chosen window is zeroed before the next pick.
    assert corners[0, 0].tolist() == [2, 10]
    assert corners[0, 1].tolist() == [10, 5]
    # Third pick overlaps neither zeroed window completely and is not a repeat.
    assert corners[0, 2].tolist() not in ([2, 10], [10, 5])
    # Partial overlap scores less than a full hot window.
    s2 = torch.zeros(1, 2, 24, 16)
    s2[0, 0, 0:2, 0:2] = 1.0
    s2[0, 0, 20:24, 12:16] = 0.8
    assert select_patches(s2, 1, (4, 4))[0, 0].tolist() == [20, 12]


def test_background_is_never_pooled_selected_or_drawn():
    torch.manual_seed(0)
    cfg = TINY
    net = Glam(cfg).eval()
    x = torch.randn(1, 1, *cfg.input_shape)
    mask = torch.zeros(1, 1, *cfg.input_shape, dtype=torch.bool)
    mask[..., :, :70] = True  # breast: the chest-wall side only, not on a map-cell boundary
    # A bright background corner that an unmasked network may well prefer.
    x[..., :40, -40:] = 8.0
    with torch.no_grad():
        out = net(x, num_patches=2, mask=mask)
        fused = fuse(out, cfg)
    inside = mask_to_grid(mask, cfg.cam_shape)[0, 0].bool()
    g = out.global_
    for m in (g.s1, g.s2, g.s3, g.saliency):
        assert float(m[0][:, ~inside].abs().max()) == 0.0
    # The pooled prediction is the mean of in-breast values only.
    k = max(1, round(cfg.top_t_global * inside.numel()))
    expected = torch.stack([g.s1, g.s2, g.s3])[:, 0][..., inside].topk(k, dim=-1).values.mean(-1).mean(0)
    assert torch.allclose(g.prediction[0], expected, atol=1e-6)
    # Every selected patch overlaps the breast; nothing is drawn outside it.
    for r, c in out.patch_corners[0].tolist():
        assert mask[0, 0, r:r + cfg.patch_size, c:c + cfg.patch_size].any()
    assert float(fused[0][:, ~mask[0, 0]].abs().max()) == 0.0
    assert float(fused[0][:, mask[0, 0]].max()) > 0.0


def test_optimal_window_holds_most_breast_and_keeps_chest_wall():
    mask = np.zeros((100, 80), dtype=bool)
    mask[30:70, 0:25] = True
    r0, c0 = optimal_window(mask, (60, 40))
    assert c0 == 0 and r0 <= 30 and r0 + 60 >= 70
    # Too small an image: CC centred, MLO kept at the top, chest wall at column 0.
    assert optimal_window(mask, (120, 100), "CC") == (-10, 0)
    assert optimal_window(mask, (120, 100), "MLO") == (0, 0)


def _right_breast(rows=300, cols=200):
    """A stored R-CC: chest wall at the last column, nipple towards column 0."""
    r, c = np.mgrid[0:rows, 0:cols]
    x = cols - 1 - c
    img = ((r - rows / 2) ** 2 + (1.6 * x) ** 2 < (0.42 * rows) ** 2).astype(np.float32) * 0.7
    img += 0.05 * np.random.default_rng(0).random(img.shape).astype(np.float32)
    lesion = np.zeros_like(img, dtype=bool)
    lesion[140:160, 150:170] = True  # near the chest wall, in the stored image's right half
    img[lesion] = 1.0
    return img, lesion


@pytest.mark.parametrize("augment", [False, True])
def test_right_breast_mask_round_trips_to_the_same_source_pixels(augment):
    img, lesion = _right_breast()
    m = mammogram_from_array(img, laterality="R", view="CC", spacing_mm=(0.4, 0.4))
    assert m.faces_left
    rng = np.random.default_rng(1) if augment else None
    x, window_mask, geo = glam_input(m, TINY, rng=rng)
    assert window_mask.shape == TINY.input_shape and window_mask.dtype == bool
    assert x.shape == TINY.input_shape
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    assert geo.flip
    canon = geo.forward(lesion.astype(np.float32), mode="nearest") > 0.5
    # Canonical orientation: the lesion sits next to the chest wall, now at the left columns.
    ys, xs = np.nonzero(canon)
    assert xs.mean() < TINY.input_shape[1] / 2
    back = geo.inverse(canon.astype(np.float32), mode="nearest") > 0.5
    assert back.shape == lesion.shape
    iou = (back & lesion).sum() / (back | lesion).sum()
    assert iou > 0.7


def test_training_noise_moves_the_window_reproducibly():
    img, _ = _right_breast()
    m = mammogram_from_array(img, laterality="R", view="CC", spacing_mm=(0.4, 0.4))
    plain = glam_geometry(m, TINY)
    a = glam_geometry(m, TINY, rng=np.random.default_rng(5))
    b = glam_geometry(m, TINY, rng=np.random.default_rng(5))
    assert a == b and a.box != plain.box


def test_glam_model_predicts_maps_on_the_source_grid():
    torch.manual_seed(0)
    net = Glam(TINY)
    manifest = {"name": "glam-test", "version": "0", "architecture": {"kind": "glam", **TINY.to_dict()},
                "thresholds": {"benign_lesion": 0.3, "malignant_lesion": 0.4}}
    bundle = Bundle(path=None, manifest=manifest, state_dict=net.state_dict())
    model = GlamModel.from_bundle(bundle, "cpu")
    assert model.identity == ModelIdentity("glam-test", "0")
    img, _ = _right_breast()
    out = model.predict(mammogram_from_array(img, laterality="R", view="CC", spacing_mm=(0.4, 0.4)))
    assert {m.finding for m in out.maps} == {"benign_lesion", "malignant_lesion"}
    for m in out.maps:
        assert m.probability.shape == img.shape and m.probability.dtype == np.float32
        assert 0 <= m.probability.min() and m.probability.max() <= 1
        # Nothing in the background: the breast is the bright half-ellipse.
        assert m.probability[img < 0.3].max() == 0.0
    assert {s.name for s in out.scores} == {"benign", "malignant"}
    assert all(0 <= s.value <= 1 for s in out.scores)
    assert [m.threshold for m in out.maps] == [0.3, 0.4]


def test_bundle_with_wrong_architecture_is_refused():
    net = Glam(TINY)
    other = GlamConfig.from_dict({**TINY.to_dict(), "local_channels": [8, 8, 8, 8]})
    manifest = {"name": "x", "version": "0", "architecture": {"kind": "glam", **other.to_dict()},
                "thresholds": {}}
    with pytest.raises((ValueError, RuntimeError)):
        GlamModel.from_bundle(Bundle(path=None, manifest=manifest, state_dict=net.state_dict()), "cpu")


def test_bundle_with_wrong_architecture_or_kind_is_a_bundle_error():
    net = Glam(TINY)
    other = GlamConfig.from_dict({**TINY.to_dict(), "local_channels": [8, 8, 8, 8]})
    manifest = {"name": "x", "version": "0", "architecture": {"kind": "glam", **other.to_dict()},
                "thresholds": {}}
    with pytest.raises(BundleError, match=r"<in memory> do not match its glam architecture: .*shape"):
        GlamModel.from_bundle(Bundle(path=None, manifest=manifest, state_dict=net.state_dict()), "cpu")
    manifest = dict(manifest, architecture={"kind": "dunet", **TINY.to_dict()})
    with pytest.raises(BundleError, match=r"bundle /x/y is a 'dunet' bundle, not a 'glam' bundle"):
        GlamModel.from_bundle(Bundle(path=Path("/x/y"), manifest=manifest, state_dict=net.state_dict()), "cpu")
