"""The microcalcification cascade's candidate pass: the exact Detector where it may fire, same marks."""

import numpy as np
import torch

from dicom_ai.core.findings import ModelIdentity
from dicom_ai.networks import microcalc
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.microcalc import (CANDIDATE_MARGIN, DetectorEstimate, MicrocalcConfig, MicrocalcModel, PatchCNN,
                                         fire_logit)

from test_microcalc import synthetic_image


def test_head_at_equals_dense_logits():
    torch.manual_seed(3)
    net = PatchCNN(MicrocalcConfig(patch_size=29)).eval()
    region = torch.rand(1, 1, 29 + 40, 29 + 33)
    with torch.no_grad():
        for stride in (1, 4):
            dense = torch.softmax(net.dense_logits(region, stride), 1)[0, 1]
            feats, dilation = net.dense_features(region, stride)
            rr, cc = torch.nonzero(torch.ones_like(dense, dtype=torch.bool), as_tuple=True)
            got = net.head_at(feats[0], rr, cc, dilation).reshape(dense.shape)
            torch.testing.assert_close(got, dense, atol=1e-6, rtol=1e-5)


def test_estimate_is_exact_at_full_rank_and_not_below():
    torch.manual_seed(4)
    cfg = MicrocalcConfig(patch_size=29, detector_stride=4)
    net = PatchCNN(cfg).eval()
    region = torch.rand(1, 1, 29 + 64, 29 + 64)
    with torch.no_grad():
        logits = net.dense_logits(region, 4)
        exact = (logits[:, 1] - logits[:, 0])[0]
        n_r, n_c = exact.shape
        full = DetectorEstimate(net, 4, rank=cfg.fc_units).eval()(region)[0, -1, :n_r, :n_c]
        low = DetectorEstimate(net, 4, rank=2).eval()(region)[0, -1, :n_r, :n_c]
    torch.testing.assert_close(full, exact, atol=1e-4, rtol=1e-4)
    assert (low - exact).abs().max() > 1e-3  # a rank-2 layer is only an estimate


def _cascade(model, image, mask, margin):
    model.candidate_margin = margin
    det = model.detector_map(image, mask)
    prob, _ = model.dense_cascade(image, mask)
    return det, prob, dict(model.last_stats)


def test_candidate_cascade_gives_the_dense_marks(monkeypatch):
    """The shipped bundle on a synthetic image with bright dots: with the node's margin the
    Detector computes only its candidate patches, and fires on exactly the same ones, so the
    Segmentator's map is the same; a margin that keeps nothing changes it (the check can fail).

    The shipped networks (microcalc >= 0.2) keep most patches of this image as candidates, where
    the cascade would fall back to the dense Detector for the whole image; the fallback is
    switched off here so that the candidate path itself is what is compared."""
    monkeypatch.setattr(microcalc, "CANDIDATE_DENSE_FRACTION", 1.0)
    model = MicrocalcModel.from_bundle(load_bundle("microcalc"), "cpu")
    rng = np.random.default_rng(5)
    image, _ = synthetic_image(rng, shape=(700, 560), n_dots=40)
    mask = np.ones(image.shape, dtype=bool)
    mask[:, :40] = False
    thr = model.config.detector_threshold
    det_dense, prob_dense, _ = _cascade(model, image, mask, None)
    det_cand, prob_cand, stats = _cascade(model, image, mask, CANDIDATE_MARGIN)
    grid_mask = mask[::model.config.detector_stride, ::model.config.detector_stride]
    fired = (det_dense >= thr) & grid_mask  # outside the breast the cascade ignores the Detector
    assert fired.sum() > 20 and (prob_dense >= model.calcification_threshold).sum() > 20
    assert 0 < stats["candidates"] < stats["detector_points"]
    np.testing.assert_array_equal((det_cand >= thr) & grid_mask, fired)
    np.testing.assert_allclose(det_cand[fired], det_dense[fired], atol=1e-5)
    np.testing.assert_array_equal(prob_cand, prob_dense)
    _, prob_none, _ = _cascade(model, image, mask, -50.0)
    assert not np.array_equal(prob_none, prob_dense)


def test_fire_logit():
    assert fire_logit(0.5) == 0.0
    assert fire_logit(0.0) == -np.inf and fire_logit(1.0) == np.inf
    assert abs(torch.sigmoid(torch.tensor(fire_logit(0.8))).item() - 0.8) < 1e-6
