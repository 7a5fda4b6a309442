"""The modified Models-Genesis distortions of the discriminative U-Net's stage 1."""

import dataclasses

import numpy as np
import pytest

from dicom_ai.training.genesis import GenesisConfig, distort, flip, gamma_transform, inpaint, outpaint, random_shape


def _breast(rows=96, cols=72):
    """A half-disc breast at column 0 with some texture, and its mask."""
    r, c = np.mgrid[0:rows, 0:cols]
    mask = (r - rows / 2) ** 2 + c**2 < (0.45 * rows) ** 2
    rng = np.random.default_rng(0)
    image = np.where(mask, 0.3 + 0.4 * rng.random((rows, cols)), 0.0).astype(np.float32)
    return image, mask


def test_transform_probabilities_match_the_configuration():
    image, mask = _breast(48, 36)
    rng = np.random.default_rng(1)
    n = 1500
    applied = [distort(image, mask, rng).applied for _ in range(n)]
    gamma = np.mean(["gamma" in a for a in applied])
    inpainted = np.mean(["inpaint" in a for a in applied])
    outpainted = np.mean(["outpaint" in a for a in applied])
    flipped = np.mean(["flip" in a for a in applied])
    # Binomial standard error at n=1500 is at most 0.013; 4 sigma bounds.
    assert gamma == pytest.approx(0.9, abs=0.05)
    assert inpainted == pytest.approx(0.9 * 0.2, abs=0.05)
    assert outpainted == pytest.approx(0.9 * 0.8, abs=0.05)
    assert flipped == pytest.approx(0.4, abs=0.05)
    assert not any("inpaint" in a and "outpaint" in a for a in applied)
    assert not any("shuffle" in s for a in applied for s in a)  # local shuffling is dropped


def test_gamma_stays_in_range_and_keeps_order():
    image, _ = _breast()
    rng = np.random.default_rng(2)
    cfg = GenesisConfig()
    gammas = []
    for _ in range(400):
        out, g = gamma_transform(image, rng, cfg)
        gammas.append(g)
        assert out.min() >= 0.0 and out.max() <= 1.0
        # x ** gamma is monotone: brighter stays brighter.
        flat_in, flat_out = image.ravel(), out.ravel()
        order = np.argsort(flat_in, kind="stable")
        assert np.all(np.diff(flat_out[order]) >= -1e-6)
    gammas = np.array(gammas)
    assert gammas.min() >= 0.5 and gammas.max() <= 2.0
    # log-uniform: about half below 1
    assert 0.4 < np.mean(gammas < 1.0) < 0.6
    assert gammas.min() < 0.55 and gammas.max() > 1.8


def test_inpainting_is_non_rectangular_and_inside_the_breast():
    image, mask = _breast()
    rng = np.random.default_rng(3)
    non_rect = 0
    for _ in range(50):
        out, region = inpaint(image, mask, rng)
        assert region.any()
        assert not (region & ~mask).any()
        assert np.array_equal(out[~region], image[~region])
        rows, cols = np.nonzero(region)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        non_rect += region.sum() < 0.95 * box
    assert non_rect >= 45


def test_outpainting_keeps_shapes_inside_the_breast_and_background_untouched():
    image, mask = _breast()
    rng = np.random.default_rng(4)
    for _ in range(30):
        out, painted = outpaint(image, mask, rng)
        assert not (painted & ~mask).any()
        assert np.array_equal(out[~mask], image[~mask])  # background untouched
        kept = mask & ~painted
        assert kept.any() and painted.any()
        assert np.array_equal(out[kept], image[kept])


def test_random_shape_diameter():
    rng = np.random.default_rng(5)
    areas = [random_shape((200, 200), (100.0, 100.0), 60.0, rng).sum() for _ in range(40)]
    disc = np.pi * 30**2
    assert 0.6 * disc < np.mean(areas) < 1.4 * disc


def test_flip_moves_input_target_and_mask_together():
    image, mask = _breast()
    rng = np.random.default_rng(6)
    cfg = dataclasses.replace(GenesisConfig(), flip_rate=1.0, max_flips=1)
    x, y, m, count = flip(image, image.copy(), mask, rng, cfg)
    assert count == 1
    assert np.array_equal(x, image[::-1]) and np.array_equal(y, image[::-1]) and np.array_equal(m, mask[::-1])
    # Default flips are up-down only, so the chest wall stays at column 0.
    assert m[:, 0].any() and not m[:, -1].any()


def test_distort_target_is_the_clean_flipped_image():
    image, mask = _breast()
    rng = np.random.default_rng(7)
    for _ in range(20):
        d = distort(image, mask, rng)
        flipped = image[::-1] if d.applied.count("flip") % 2 else image
        assert np.array_equal(d.target, flipped)
        assert d.image.shape == image.shape and d.image.dtype == np.float32
        assert d.image.min() >= 0.0 and d.image.max() <= 1.0


def test_shape_mismatch_is_refused():
    image, mask = _breast()
    with pytest.raises(ValueError, match="breast mask"):
        distort(image, mask[:-1], np.random.default_rng(0))
