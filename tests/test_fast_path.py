"""The CPU fast path gives what the reference path gives.

ONNX Runtime vs torch (the reference engine) for the microcalcification cascade, the
per-value intensity table vs the pixel-by-pixel computation, the bounding-box connected
components vs the full-grid ones, and the GPU benchmark's CPU smoke run.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydicom.dataset import Dataset

from dicom_ai.core.findings import ModelIdentity, ModelOutput, ProbabilityMap
from dicom_ai.imaging import intensity, mammogram_from_array
from dicom_ai.networks.microcalc_clusters import components
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.engine import resolve_engine
from dicom_ai.networks.microcalc import MicrocalcModel
from dicom_ai.networks.pipeline import allowed_region, restrict_to_breast

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engines():
    bundle = load_bundle("microcalc")
    return (MicrocalcModel.from_bundle(bundle, "cpu", engine="torch"),
            MicrocalcModel.from_bundle(bundle, "cpu", engine="onnxruntime"))


def _calcified_image(rng, shape=(700, 560)):
    """A smooth breast-like background with 3 clusters of bright 2-4 px specks (0.05 mm grid)."""
    noise = torch.from_numpy(rng.normal(size=(1, 1, shape[0] // 16 + 2, shape[1] // 16 + 2)).astype(np.float32))
    image = 0.45 + 0.08 * torch.nn.functional.interpolate(noise, size=shape, mode="bilinear")[0, 0].numpy()
    rr, cc = np.mgrid[:shape[0], :shape[1]]
    for centre in ((150, 150), (400, 300), (560, 430)):
        for _ in range(6):
            r, c = np.array(centre) + rng.integers(-40, 40, 2)
            image[(rr - r) ** 2 + (cc - c) ** 2 <= rng.uniform(1.5, 3.0) ** 2] += 0.3
    mask = (rr - shape[0] / 2) ** 2 / (0.48 * shape[0]) ** 2 + (cc / (0.95 * shape[1])) ** 2 <= 1
    return np.clip(image, 0, 1).astype(np.float32), mask


def test_auto_engine_is_onnxruntime_on_the_cpu_and_torch_on_a_gpu():
    assert resolve_engine("auto", "cpu") == "onnxruntime"
    assert resolve_engine("auto", "cuda:0") == "torch"
    with pytest.raises(Exception, match="CPU only"):
        resolve_engine("onnxruntime", "cuda:0")
    with pytest.raises(Exception, match="engine must be one of"):
        resolve_engine("tensorrt", "cpu")


@pytest.mark.parametrize("role,stride", [("detector", 4), ("segmentator", 1)])
@pytest.mark.parametrize("shape", [(49, 49), (97, 130), (161, 150)])
def test_onnx_patch_probabilities_match_torch(engines, role, stride, shape):
    # Dynamic shapes: the exported graph crops like dense_logits for any region size.
    reference, fast = engines
    regions = np.random.default_rng(sum(shape)).random((2, *shape), dtype=np.float32)
    a = reference.patch_probability(role, regions, stride)
    b = fast.patch_probability(role, regions, stride)
    patch = reference.config.patch_size  # the shipped bundle's (39 px at 0.07 mm)
    assert a.shape == b.shape == (2, (shape[0] - patch) // stride + 1, (shape[1] - patch) // stride + 1)
    np.testing.assert_allclose(b, a, atol=2e-5)


def test_fast_cascade_gives_the_same_marks(engines):
    reference, fast = engines
    image, mask = _calcified_image(np.random.default_rng(3))
    prob_ref, visited_ref = reference.dense_cascade(image, mask)
    prob_fast, visited_fast = fast.dense_cascade(image, mask)
    assert visited_ref == visited_fast > 0  # the same Detector decisions, the same tiles
    assert np.abs(prob_fast - prob_ref).max() < 1e-4
    threshold = reference.calcification_threshold
    assert (prob_ref >= threshold).sum() > 20  # something was found, so the check means something
    np.testing.assert_array_equal(prob_fast >= threshold, prob_ref >= threshold)


def test_fast_whole_image_analysis_gives_the_same_clusters(engines):
    reference, fast = engines
    image, _ = _calcified_image(np.random.default_rng(5))
    # The image as a 0.05 mm mammogram (the working grid is then the stored grid).
    mammogram = mammogram_from_array(image, "L", "CC", (0.05, 0.05))
    a, b = reference.analyse(mammogram), fast.analyse(mammogram)
    assert len(a.clusters) == len(b.clusters) >= 1
    for x, y in zip(a.clusters, b.clusters):
        assert x.count == y.count
        np.testing.assert_allclose(x.centroid, y.centroid, atol=1e-6)
        assert abs(x.score - y.score) < 1e-4
    np.testing.assert_array_equal(a.cluster_map > 0, b.cluster_map > 0)


def _voi(photometric="MONOCHROME2", bits=12, signed=False, slope=None, intercept=None, **voi):
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.BitsStored, ds.PixelRepresentation = bits, int(signed)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for keyword, value in voi.items():
        setattr(ds, keyword, value)
    return ds


def _lut_item():
    item = Dataset()
    item.LUTDescriptor = [256, 1000, 12]
    item.LUTData = [round(4095 * (i / 255) ** 2) for i in range(256)]
    return item


@pytest.mark.parametrize("case", ["linear", "sigmoid-mono1", "rescaled-signed", "voi-lut", "linear-exact"])
def test_intensity_table_gives_the_same_bits_as_every_pixel(case):
    rng = np.random.default_rng(0)
    if case == "rescaled-signed":
        ds = _voi(signed=True, slope=2.0, intercept=-1000.0, WindowCenter=-1000.0, WindowWidth=800.0)
        stored = rng.integers(-2048, 2048, (300, 200)).astype(np.int16)
    else:
        kwargs = {"linear": dict(WindowCenter=2048.0, WindowWidth=4096.0, VOILUTFunction="LINEAR"),
                  "sigmoid-mono1": dict(photometric="MONOCHROME1", WindowCenter=1500.0, WindowWidth=900.0,
                                        VOILUTFunction="SIGMOID"),
                  "voi-lut": dict(slope=1.0, intercept=-24.0, WindowCenter=0, WindowWidth=1),
                  "linear-exact": dict(WindowCenter=1000.5, WindowWidth=333.0, VOILUTFunction="LINEAR_EXACT")}[case]
        ds = _voi(**kwargs)
        if case == "voi-lut":
            ds.VOILUTSequence = [_lut_item()]
        stored = rng.integers(0, 4096, (300, 200)).astype(np.uint16)
    table = intensity.normalise_intensities(ds, stored)
    direct = intensity._to_unit(stored, intensity._voi_dataset(ds, stored), str(ds.PhotometricInterpretation), False)
    assert table.dtype == direct.dtype == np.float32
    np.testing.assert_array_equal(table, direct)


def _restrict_full_grid(output, mammogram):
    """restrict_to_breast as it was: components of the whole image."""
    allowed = allowed_region(mammogram)
    out = []
    for m in output.maps:
        prob = np.where(allowed, m.probability, 0.0).astype(np.float32)
        binary = prob >= m.threshold
        if binary.any():
            labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(binary.astype(np.uint8)), True))
            n = int(labels.max())
            rr, cc = np.nonzero(labels)
            lab = labels[rr, cc]
            count = np.bincount(lab, minlength=n + 1)
            r_mean = np.bincount(lab, rr, minlength=n + 1) / np.maximum(count, 1)
            c_mean = np.bincount(lab, cc, minlength=n + 1) / np.maximum(count, 1)
            outside = [k for k in range(1, n + 1) if not allowed[int(round(r_mean[k])), int(round(c_mean[k]))]]
            if outside:
                prob[np.isin(labels, outside)] = 0.0
        out.append(prob)
    return out


def test_restrict_to_breast_on_the_bounding_box_equals_the_whole_image():
    rows, cols = 240, 180
    r, c = np.mgrid[:rows, :cols]
    pixels = (((r - rows / 2) ** 2 + c**2) < (0.45 * rows) ** 2).astype(np.float32) * 0.7
    mammogram = mammogram_from_array(pixels, "L", "CC")
    rng = np.random.default_rng(1)
    identity = ModelIdentity("m", "1")
    blobs = np.zeros((rows, cols), dtype=np.float32)
    for _ in range(12):  # blobs inside, across the skin line and outside the breast
        y, x, rad = rng.integers(0, rows), rng.integers(0, cols), rng.uniform(3, 15)
        blobs = np.maximum(blobs, np.clip(1 - ((r - y) ** 2 + (c - x) ** 2) / rad**2, 0, 1))
    output = ModelOutput(maps=[ProbabilityMap("mass", blobs, 0.3, identity),
                               ProbabilityMap("calcification", np.zeros_like(blobs), 0.5, identity)])
    kept = [m.probability.copy() for m in output.maps]
    fast = restrict_to_breast(output, mammogram)
    expected = _restrict_full_grid(output, mammogram)
    for got, want in zip(fast.maps, expected):
        np.testing.assert_array_equal(got.probability, want)
    assert fast.maps[0].probability.any()
    for m, before in zip(output.maps, kept):  # the caller's maps are left as they were
        np.testing.assert_array_equal(m.probability, before)
    # In place (the pipeline, which owns the model's fresh maps): the same values, in the
    # maps' own arrays; two maps on one array are not restricted in it (each has its own
    # threshold, so its own components to remove).
    shared = ModelOutput(maps=[ProbabilityMap("mass", blobs.astype(np.float32), 0.3, identity),
                               ProbabilityMap("calcification", np.zeros(blobs.shape, np.float32), 0.5, identity)])
    arrays = [m.probability for m in shared.maps]
    inplace = restrict_to_breast(shared, mammogram, in_place=True)
    for got, array, want in zip(inplace.maps, arrays, expected):
        assert got.probability is array
        np.testing.assert_array_equal(got.probability, want)
    one = blobs.astype(np.float32)
    twice = ModelOutput(maps=[ProbabilityMap("mass", one, 0.3, identity), ProbabilityMap("mass", one[:], 0.9, identity)])
    got = restrict_to_breast(twice, mammogram, in_place=True)
    np.testing.assert_array_equal(one, blobs.astype(np.float32))
    np.testing.assert_array_equal(got.maps[0].probability, expected[0])
    np.testing.assert_array_equal(got.maps[1].probability,
                                  _restrict_full_grid(ModelOutput(maps=[twice.maps[1]]), mammogram)[0])


def _components_full_grid(binary, probability, min_px):
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(binary.astype(np.uint8)), True))
    out = []
    for k in range(1, int(labels.max()) + 1):
        rr, cc = np.nonzero(labels == k)
        if len(rr) >= min_px:
            out.append(((rr.mean(), cc.mean()), float(probability[rr, cc].max()), np.stack([rr, cc], 1)))
    return out


def test_components_on_the_bounding_box_equal_the_whole_grid():
    rng = np.random.default_rng(2)
    probability = np.zeros((300, 260), dtype=np.float32)
    probability[rng.integers(40, 260, 60), rng.integers(30, 240, 60)] = rng.uniform(0.5, 1, 60)
    probability = np.maximum(probability, np.roll(probability, 1, 0))
    binary = probability >= 0.5
    got = components(probability, 0.5, 2)
    expected = _components_full_grid(binary, probability, 2)
    assert len(got) == len(expected) > 5
    for g, (ce, pe, xe) in zip(got, expected):
        assert g.centroid == ce and g.peak == pe
        np.testing.assert_array_equal(g.pixels, xe)


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["bf16_vs_fp32"]) == {"glam", "dunet", "microcalc"}
    for name, row in result["per_model"].items():
        assert row["gflop_per_study"] > 0 and row["floor_s"] > 0 and row["ratio"] > 0, name
    assert isinstance(result["all_within_tolerance"], bool)
    assert result["matmul_tflops"]["fp32"] > 0
    # GLAM keeps fp32 on the CPU in both variants (glam.py enables autocast on a GPU only).
    assert result["bf16_vs_fp32"]["glam"]["max_abs_probability"] == 0.0


class _Counting:
    """A model that counts its calls; ``scores`` and ``off`` as given."""

    def __init__(self, name, off, scores):
        from dicom_ai.networks.bundle import OperatingIdentity

        self.identity = OperatingIdentity(name=name, version="1", operating_point="fp1", off=off)
        self.findings, self.scores, self.calls = ("calcification", "calcification_cluster"), scores, 0

    def predict(self, mammogram):
        from dicom_ai.core.findings import ImageScore

        self.calls += 1
        zero = np.zeros(mammogram.shape, dtype=np.float32)
        return ModelOutput(maps=[ProbabilityMap(k, zero, 0.5, self.identity) for k in self.findings],
                           scores=[ImageScore(s, 0.5, self.identity) for s in self.scores])


def test_a_model_whose_every_finding_is_off_is_not_run():
    from dicom_ai.networks.pipeline import Pipeline
    from node_harness import make_mg

    off = _Counting("all-off", ("calcification", "calcification_cluster"), ())
    partly = _Counting("one-on", ("calcification",), ())
    scored = _Counting("scores", ("calcification", "calcification_cluster"), ("malignant",))
    pipeline = Pipeline([off, partly, scored])
    assert pipeline.skipped == [off]
    (findings,) = pipeline.run([make_mg("L", "CC", "1.2.3", "1.2.3.4", 1, shape=(120, 90))])
    assert (off.calls, partly.calls, scored.calls) == (0, 1, 1)
    assert [m.finding for m in findings.maps] == ["calcification_cluster"]  # only what is on
    assert [s.name for s in findings.scores] == ["malignant"]  # a model with scores runs for them
    assert "all-off" not in pipeline.take_model_seconds()
