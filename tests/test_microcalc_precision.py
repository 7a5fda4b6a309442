"""The microcalcification cascade's cheaper paths give the reference's marks: Segmentator strips
(the node's path, bit for bit the tiled map) and the gated bf16 path (bf16 networks, every
decision the marks read taken again in float32)."""

import numpy as np
import pytest
import torch

from dicom_ai.networks import engine, microcalc
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.microcalc import MicrocalcModel

from test_microcalc import synthetic_image


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(5)
    image, _ = synthetic_image(rng, shape=(700, 560), n_dots=40)
    mask = np.ones(image.shape, dtype=bool)
    mask[:, :40] = False
    return image, mask


@pytest.mark.skipif(not engine.onnxruntime_available(), reason="strips are the ONNX Runtime path")
def test_strips_give_the_tiled_maps_bit_for_bit(scene):
    image, mask = scene
    model = MicrocalcModel.from_bundle(load_bundle("microcalc"), "cpu", engine="onnxruntime")
    tiled, fired_tiles = model.dense_cascade(image, mask, seg_strip=0)
    computed_tiles = model.last_stats["segmentator_pixels"]
    strips, fired_strips = model.dense_cascade(image, mask)
    assert (tiled >= model.calcification_threshold).sum() > 20
    np.testing.assert_array_equal(strips, tiled)
    assert fired_strips == fired_tiles > 0
    assert fired_strips * image.size <= model.last_stats["segmentator_pixels"] < computed_tiles
    # Strips that miss fired columns would leave zeros where the tiles have values (can fail).
    fired = tiled > 0
    short = model._segmentator_strips(image, fired & (np.arange(image.shape[1]) % 64 < 60), 16)[0]
    assert not np.array_equal(short, tiled)
    # The Detector's strips: the tiles' values on every breast grid point, bit for bit.
    s = model.config.detector_stride
    grid = mask[::s, ::s]
    np.testing.assert_array_equal(model.detector_map(image, mask, breast_only=True)[grid],
                                  model.detector_map(image, mask)[grid])
    # The torch engine (GPU, or no ONNX Runtime) keeps its tiles: its values are the reference's.
    torch_model = MicrocalcModel.from_bundle(load_bundle("microcalc"), "cpu", engine="torch")
    reference, _ = torch_model.dense_cascade(image, mask, seg_strip=0)
    np.testing.assert_array_equal(torch_model.dense_cascade(image, mask)[0], reference)


def test_gated_bf16_takes_every_decision_in_float32(scene, monkeypatch):
    """Same fired Detector patches, the map bit for bit at and above the floor the marks read,
    the same clusters; below the floor the bf16 values (so the bf16 path really ran); with no
    margin the bf16 decisions alone are taken and the map changes (the check can fail)."""
    image, mask = scene
    model = MicrocalcModel.from_bundle(load_bundle("microcalc"), "cpu")
    s, thr = model.config.detector_stride, model.config.detector_threshold
    grid = mask[::s, ::s]
    det_ref = model.detector_map(image, mask)
    ref, _ = model.dense_cascade(image, mask)
    model.set_precision("bf16-gated")
    det_low = model.detector_map(image, mask)
    low, _ = model.dense_cascade(image, mask)
    stats = dict(model.last_stats)
    np.testing.assert_array_equal((det_low >= thr) & grid, (det_ref >= thr) & grid)
    floor = model.exact_floor
    above = (ref >= floor) | (low >= floor)
    assert above.sum() > 20
    np.testing.assert_array_equal(low[above], ref[above])
    assert 0 < np.abs(low - ref).max() < 0.05
    assert 0 < stats["fp32_points"] < stats["bf16_points"]
    assert 0 < stats["seg_fp32_tiles"] <= stats["seg_tiles"]
    spacing = (0.05, 0.05)
    a, b = model._clusters(ref, spacing, (0, 0), image), model._clusters(low, spacing, (0, 0), image)
    assert [(c.score, c.count) for c in a] == [(c.score, c.count) for c in b]
    monkeypatch.setattr(microcalc, "BF16_DETECTOR_MARGIN", -1.0)
    monkeypatch.setattr(microcalc, "BF16_SEGMENTATOR_MARGIN", -50.0)
    ungated, _ = model.dense_cascade(image, mask)
    # The float32 re-checks changed values the marks read (0.4.0's networks on this scene may
    # keep the pixels above the floor, so the control is the gated map itself).
    assert not np.array_equal(ungated, low)
    with pytest.raises(Exception, match="precision"):
        model.set_precision("int8")


def test_plan_switches_an_accepted_microcalc_bundle_to_its_gated_path():
    model = MicrocalcModel.from_bundle(load_bundle("microcalc"), "cpu")
    version = model.identity.version
    chosen, why = engine.cpu_bf16_plan([model], "bf16", "cpu", accepted={}, native=True)
    assert chosen == set() and model.precision == "fp32" and "microcalc" in why
    chosen, why = engine.cpu_bf16_plan([model], "bf16", "cpu", accepted={"microcalc": version}, native=True)
    assert chosen == {id(model)} and why == {} and model.precision == "bf16-gated"
    # Under the pipeline's autocast the float32 decisions stay float32 (same map as without it).
    rng = np.random.default_rng(1)
    image, _ = synthetic_image(rng, shape=(300, 300), n_dots=10)
    plain, _ = model.dense_cascade(image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped, _ = model.dense_cascade(image)
    np.testing.assert_array_equal(plain, wrapped)
