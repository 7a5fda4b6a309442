"""The discriminative U-Net: block structure, heads, training steps, bundle round trip."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from dicom_ai.networks.bundle import load_bundle, save_bundle
from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig, DUNetModel, ResidualBlock, SeparableConv2d, top_k_score
from dicom_ai.training.dunet import ImageSet, evaluate_segmentation, load_checkpoint, masked_mse, pretrain, save_checkpoint, seed_everything, segmentation_loss, soft_dice_loss, train_segmentation
from dicom_ai.networks.pipeline import model_from_bundle
from dicom_ai.imaging import mammogram_from_array


TINY = DUNetConfig.compact(input_shape=(32, 32), channels=(4, 8, 8, 16), top_levels_without_skip=2)


def _half_disc(rows=120, cols=90, faces_left=False, lesion=True):
    r, c = np.mgrid[0:rows, 0:cols]
    x = c if not faces_left else cols - 1 - c
    img = ((r - rows / 2) ** 2 + x**2 < (0.45 * rows) ** 2).astype(np.float32) * 0.5
    if lesion:
        img[(r - 55) ** 2 + (x - 20) ** 2 < 36] = 0.9
    return img


def _toy_set(n=8, size=32, seed=0):
    """Images with bright discs (the 'lesions') on textured half-disc breasts."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:size, 0:size]
    breast = (r - size / 2) ** 2 + c**2 < (0.45 * size) ** 2
    images, lesions = [], []
    for i in range(n):
        img = np.where(breast, 0.3 + 0.2 * rng.random((size, size)), 0.0).astype(np.float32)
        les = np.zeros((size, size), bool)
        if i % 2 == 0:
            cy, cx = rng.integers(8, 24), rng.integers(3, 10)
            les = ((r - cy) ** 2 + (c - cx) ** 2 < 9) & breast
            img[les] = 0.9
        images.append(img)
        lesions.append(les)
    lesions = np.array(lesions)
    malignant = lesions.any(axis=(1, 2))
    return ImageSet(np.array(images), lesions, np.repeat(breast[None], n, 0), ~malignant, malignant,
                    [f"toy:{i}" for i in range(n)])


def test_configs():
    paper = DUNetConfig.paper()
    assert paper.input_shape == (1536, 1536) and paper.head == "subtraction"
    compact = DUNetConfig.compact()
    assert compact.input_shape[0] % 2 ** (len(compact.channels) - 1) == 0
    assert DUNetConfig.from_dict(json.loads(json.dumps(compact.to_dict()))) == compact
    with pytest.raises(ValueError, match="divisible"):
        DUNetConfig.compact(input_shape=(100, 100))
    with pytest.raises(ValueError, match="head"):
        DUNetConfig.compact(head="softmax")


def test_blocks_are_separable_residual_instance_norm_leaky_relu():
    net = DiscriminativeUNet(DUNetConfig.paper())
    convs3 = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs3 and all(m.groups == m.in_channels == m.out_channels for m in convs3)  # depthwise
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in net.modules())
    blocks = [m for m in net.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 2 * len(net.config.channels) - 1
    for b in blocks:
        assert isinstance(b.conv1, SeparableConv2d) and isinstance(b.conv2, SeparableConv2d)
        assert isinstance(b.norm1, nn.InstanceNorm2d) and isinstance(b.act, nn.LeakyReLU)
    # The short skip is really added: with the main path zeroed, the block passes its input through.
    block = ResidualBlock(8, 8)
    nn.init.zeros_(block.norm2.weight)
    nn.init.zeros_(block.norm2.bias)
    x = torch.randn(1, 8, 16, 16)
    assert torch.allclose(block(x), nn.functional.leaky_relu(x, 0.01))
    params = sum(p.numel() for p in net.parameters())
    assert 0.3e6 < params < 2e6  # models.md 2.1: roughly 0.5-1 M


def test_no_long_skips_at_the_top_levels():
    cfg = DUNetConfig.compact()
    net = DiscriminativeUNet(cfg)
    assert net.unet.has_long_skip[:2] == (False, False) and all(net.unet.has_long_skip[2:])
    seen = {}
    hooks = [net.unet.decoder[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].shape[1]))
             for i in range(len(net.unet.decoder))]
    net(torch.rand(1, 1, *cfg.input_shape))
    for h in hooks:
        h.remove()
    ch = cfg.channels
    assert seen[0] == ch[1] and seen[1] == ch[2]  # top two levels: upsampled features only
    assert seen[2] == ch[3] + ch[2]  # deeper levels concatenate the encoder features


def test_top_level_features_reach_the_output_only_through_the_bottom():
    """Without top skips, a one-pixel input change cannot stay a one-pixel output change."""
    torch.manual_seed(0)
    net = DiscriminativeUNet(TINY).eval()
    x = torch.rand(1, 1, 32, 32, requires_grad=True)
    net.unet(x)[0, 0, 16, 16].backward()
    g = x.grad[0, 0].abs()
    # Receptive field spans the bottleneck: gradient reaches far from the pixel.
    assert g[:, :8].sum() > 0 and g[:, 24:].sum() > 0


def test_subtraction_and_standard_heads():
    torch.manual_seed(0)
    sub = DiscriminativeUNet(TINY).eval()
    std = DiscriminativeUNet(DUNetConfig.from_dict(dict(TINY.to_dict(), head="sigmoid"))).eval()
    std.load_state_dict(sub.state_dict())
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        f = sub.reconstruct(x)
        assert torch.allclose(sub(x), x - f)
        assert torch.allclose(std(x), f)
        p = sub.probability(sub(x))
        assert torch.allclose(p, (x - f).clamp(0, 1))
        assert torch.allclose(std.probability(std(x)), torch.sigmoid(f))
    # The subtraction layer is parameter-free: both heads have the same weights.
    assert sub.state_dict().keys() == std.state_dict().keys()


def test_losses():
    p = torch.zeros(2, 1, 8, 8)
    g = torch.zeros(2, 1, 8, 8)
    g[0, 0, 2:4, 2:4] = 1
    assert float(soft_dice_loss(g, g)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_dice_loss(p, g)) > 0.7
    assert float(soft_dice_loss(p, torch.zeros_like(g))) == 0.0  # empty targets: Dice undefined
    m = torch.zeros_like(g)
    m[:, :, :4] = 1
    assert float(masked_mse(torch.ones_like(g), torch.zeros_like(g), m)) == pytest.approx(1.0)


def test_a_few_pretraining_steps_reduce_the_restoration_loss():
    data = _toy_set(4)
    seed_everything(0)
    net = DiscriminativeUNet(TINY)
    history = pretrain(net, data, epochs=25, batch_size=4, lr=3e-3, seed=0, progress=False)
    first = np.mean([h["train_mse"] for h in history[:3]])
    last = np.mean([h["train_mse"] for h in history[-3:]])
    assert last < 0.7 * first


@pytest.mark.parametrize("head", ["subtraction", "sigmoid"])
def test_a_few_segmentation_steps_reduce_the_loss(head):
    data = _toy_set(4)
    seed_everything(0)
    net = DiscriminativeUNet(DUNetConfig.from_dict(dict(TINY.to_dict(), head=head)))
    x = torch.from_numpy(data.images)[:, None]
    y = torch.from_numpy(data.lesions)[:, None].float()
    with torch.no_grad():
        before = float(segmentation_loss(net, net(x), y))
    train_segmentation(net, data, epochs=20, batch_size=4, lr=3e-3, seed=0, progress=False)
    with torch.no_grad():
        after = float(segmentation_loss(net.eval(), net(x), y))
    assert after < 0.9 * before


def test_fixed_seed_reproduces_training():
    data = _toy_set(4)
    states = []
    for _ in range(2):
        seed_everything(3)
        net = DiscriminativeUNet(TINY)
        pretrain(net, data, epochs=1, batch_size=2, seed=3, progress=False)
        train_segmentation(net, data, epochs=1, batch_size=2, seed=3, progress=False)
        states.append(net.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_evaluation_protocol():
    data = _toy_set(4)
    net = DiscriminativeUNet(TINY)
    for p in net.unet.parameters():
        nn.init.zeros_(p)
    # f(x) = 0, so the subtraction head returns the image: lesions (0.9) >= 0.5 > breast (<= 0.5).
    scores = evaluate_segmentation(net, data)
    assert scores["dice"] == pytest.approx(1.0)
    assert scores["fp_fraction"] == pytest.approx(0.0)


def test_checkpoint_round_trip(tmp_path):
    net = DiscriminativeUNet(TINY)
    path = save_checkpoint(tmp_path / "c.safetensors", net, {"stage": "pretrain"})
    config, state, info = load_checkpoint(path)
    assert config == TINY and info == {"stage": "pretrain"}
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="safetensors"):
        load_checkpoint(tmp_path / "c.pt")


def _manifest(config):
    return {"name": "dunet-test", "version": "0.0.1", "architecture": {"kind": "dunet", **config.to_dict()},
            "input": {}, "thresholds": {"malignant_lesion": 0.4}, "intended_use": "test", "training": {}}


@pytest.mark.parametrize("faces_left", [False, True])
def test_bundle_round_trip_and_prediction_on_the_source_grid(tmp_path, faces_left):
    torch.manual_seed(0)
    net = DiscriminativeUNet(TINY)
    save_bundle(tmp_path / "b", _manifest(TINY), net.state_dict())
    bundle = load_bundle(tmp_path / "b")
    model = model_from_bundle(bundle, torch.device("cpu"))
    assert isinstance(model, DUNetModel) and model.identity.name == "dunet-test"
    img = _half_disc(faces_left=faces_left)
    mammo = mammogram_from_array(img, laterality="R" if faces_left else "L", view="CC")
    out = model.predict(mammo)
    (pmap,) = out.maps
    (score,) = out.scores
    assert pmap.finding == "malignant_lesion" and pmap.threshold == pytest.approx(0.4)
    assert pmap.probability.shape == img.shape and pmap.probability.dtype == np.float32
    assert 0.0 <= pmap.probability.min() and pmap.probability.max() <= 1.0
    assert score.name == "malignant" and 0.0 <= score.value <= 1.0
    with torch.no_grad():
        direct = DUNetModel(net, model.identity).run(mammo)["probability"]
    assert np.allclose(model.run(mammo)["probability"], direct, atol=1e-6)
    _, recon = model.predict_with_reconstruction(mammo)
    assert recon.shape == img.shape


@pytest.mark.parametrize("faces_left", [False, True])
def test_map_lands_on_the_source_pixels(faces_left):
    """With f = 0 the subtraction map is the input itself, so it must reproduce the source."""
    net = DiscriminativeUNet(DUNetConfig.compact(input_shape=(64, 64), channels=(4, 8, 8)))
    for p in net.unet.parameters():
        nn.init.zeros_(p)
    model = DUNetModel(net, _identity())
    img = _half_disc(faces_left=faces_left)
    mammo = mammogram_from_array(img, laterality="R" if faces_left else "L", view="CC")
    (pmap,) = model.predict(mammo).maps
    lesion = img > 0.8
    assert pmap.probability[lesion].mean() > 0.75
    assert pmap.probability[(img > 0) & ~lesion].mean() == pytest.approx(0.5, abs=0.1)
    assert pmap.probability[img == 0].mean() < 0.1
    assert model.predict(mammo).scores[0].value > 0.8  # top 0.5 % of the map is the lesion


def _identity():
    from dicom_ai.core.findings import ModelIdentity

    return ModelIdentity("dunet-test", "0")


def test_wrong_bundle_kind_and_mismatched_weights_are_refused(tmp_path):
    net = DiscriminativeUNet(TINY)
    save_bundle(tmp_path / "b", dict(_manifest(TINY), architecture={"kind": "glam"}), net.state_dict())
    with pytest.raises(ValueError, match="not a 'dunet' bundle"):
        DUNetModel.from_bundle(load_bundle(tmp_path / "b"), "cpu")
    other = dict(TINY.to_dict(), channels=[4, 8, 16, 16])
    save_bundle(tmp_path / "c", dict(_manifest(TINY), architecture={"kind": "dunet", **other}), net.state_dict())
    with pytest.raises(ValueError, match="do not match"):
        DUNetModel.from_bundle(load_bundle(tmp_path / "c"), "cpu")


def test_top_k_score():
    p = torch.zeros(1, 1, 10, 10)
    p[0, 0, 0, :2] = 1.0
    assert float(top_k_score(p, 0.02)[0]) == pytest.approx(1.0)
    assert float(top_k_score(p, 0.04)[0]) == pytest.approx(0.5)


def test_shipped_bundle_loads_and_predicts():
    bundle = load_bundle("dunet")
    assert "not for clinical use" in bundle.manifest["intended_use"]
    # Since issue 26 the shipped U-Net works at 0.8 mm, is trained on mini-MIAS masses (all
    # five folds, Genesis-pretrained) and its region scores are Platt-calibrated.
    assert bundle.manifest["architecture"]["pixel_spacing_mm"] == 0.8
    assert [d["dataset"] for d in bundle.manifest["training"]["data"]] == ["mias"]
    assert bundle.manifest["calibration"]["method"] == "platt"
    assert "Suckling" in bundle.manifest["licence"] and bundle.manifest["operating_points"]["default"]
    model = DUNetModel.from_bundle(bundle, "cpu")
    img = _half_disc(rows=200, cols=150)
    out = model.predict(mammogram_from_array(img, laterality="L", view="MLO"))
    assert out.maps[0].probability.shape == img.shape
    assert np.isfinite(out.maps[0].probability).all() and 0.0 <= out.scores[0].value <= 1.0


def test_phantom_image_set_cache_is_keyed_by_the_generator_code(tmp_path):
    from dicom_ai.data.cache import generator_version
    from dicom_ai.training.dunet import image_set_cache_folder, phantom_image_set

    first = phantom_image_set([3], (32, 32), (128, 96), tmp_path)
    (folder,) = tmp_path.iterdir()
    assert folder == image_set_cache_folder(tmp_path, (32, 32), (128, 96))
    assert folder.name == f"p128x96-m32x32-v2-{generator_version()}"
    again = phantom_image_set([3], (32, 32), (128, 96), tmp_path)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.lesions, again.lesions)


def test_test_time_scales_config():
    cfg = DUNetConfig.compact(input_shape=(32, 32), channels=(4, 8, 8), pixel_spacing_mm=0.8, test_time_scales_mm=(0.7,))
    assert DUNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # A manifest written before the field existed runs one pass, as it always did.
    old = {k: v for k, v in cfg.to_dict().items() if k != "test_time_scales_mm"}
    assert DUNetConfig.from_dict(old).test_time_scales_mm == ()
    with pytest.raises(ValueError, match="needs pixel_spacing_mm"):
        DUNetConfig.compact(input_shape=(32, 32), channels=(4, 8, 8), test_time_scales_mm=(0.7,))
    with pytest.raises(ValueError, match="positive"):
        DUNetConfig.compact(input_shape=(32, 32), channels=(4, 8, 8), pixel_spacing_mm=0.8, test_time_scales_mm=(0.0,))


def test_test_time_scales_average_the_passes_on_the_working_grid():
    from dicom_ai.networks.dunet import multiscale_output, working_grid

    torch.manual_seed(0)
    one = DUNetConfig.compact(input_shape=(32, 32), channels=(4, 8, 8), pixel_spacing_mm=0.8)
    two = DUNetConfig.from_dict(dict(one.to_dict(), test_time_scales_mm=[0.6]))
    net = DiscriminativeUNet(one).eval()
    img = _half_disc(rows=160, cols=120)
    mammo = mammogram_from_array(img, laterality="L", view="CC", spacing_mm=(0.2, 0.2))
    plain = DUNetModel(net, _identity()).run(mammo)
    net2 = DiscriminativeUNet(two).eval()
    net2.load_state_dict(net.state_dict())
    both = DUNetModel(net2, _identity()).run(mammo)
    # Independently: the 0.6 mm pass, back to the source grid and onto the 0.8 mm grid.
    geo, x8, _ = working_grid(mammo, 0.8, one.multiple)
    g6, x6, _ = working_grid(mammo, 0.6, one.multiple)
    assert x6.shape[0] > x8.shape[0]  # a finer grid: the breast is more pixels there
    with torch.no_grad():
        o8 = net(torch.from_numpy(x8)[None, None])[0, 0].numpy()
        o6 = net(torch.from_numpy(x6)[None, None])[0, 0].numpy()
    expect = np.clip((o8 + geo.forward(g6.inverse(o6))) / 2, 0, 1)
    assert both["probability"].shape == plain["probability"].shape == x8.shape
    assert np.allclose(both["probability"], expect, atol=1e-5)
    assert not np.allclose(both["probability"], plain["probability"], atol=1e-3)
    assert np.allclose(plain["probability"], np.clip(o8, 0, 1), atol=1e-5)
    # No scales: the output is returned as it is.
    t = torch.ones(1, 1, 4, 4)
    assert multiscale_output(net, mammo, geo, t, ()) is t


def test_test_time_scales_keep_a_lesion_where_it_is():
    """With f = 0 every pass is the input itself: the averaged map still reproduces the source."""
    cfg = DUNetConfig.compact(input_shape=(32, 32), channels=(4, 8, 8), pixel_spacing_mm=0.4, test_time_scales_mm=(0.3, 0.5))
    net = DiscriminativeUNet(cfg)
    for p in net.unet.parameters():
        nn.init.zeros_(p)
    img = _half_disc(rows=160, cols=120)
    mammo = mammogram_from_array(img, laterality="L", view="CC", spacing_mm=(0.2, 0.2))
    (pmap,) = DUNetModel(net, _identity()).predict(mammo).maps
    lesion = img > 0.8
    assert pmap.probability[lesion].mean() > 0.75
    assert pmap.probability[(img > 0) & ~lesion].mean() == pytest.approx(0.5, abs=0.1)
