import math

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_ai.core.errors import ImagingError
from dicom_ai.imaging import breast_mask, geometry_for, mammogram_from_array, normalise_intensities


def _half_disc(rows=200, cols=160, faces_left=False):
    """A bright half-disc whose flat side (the chest wall) is at column 0 or the last column."""
    r, c = np.mgrid[0:rows, 0:cols]
    x = c if not faces_left else cols - 1 - c
    img = ((r - rows / 2) ** 2 + x**2 < (0.45 * rows) ** 2).astype(np.float32) * 0.8
    return img


def test_breast_mask_excludes_background_marker():
    img = _half_disc()
    img[5:12, 140:155] = 1.0  # burned-in label, not connected to the breast
    mask = breast_mask(img)
    assert mask[100, 10]
    assert not mask[8, 150]
    assert not mask[199, 159]


@pytest.mark.parametrize("faces_left", [False, True])
def test_geometry_round_trip_puts_map_back_on_source_pixels(faces_left):
    img = _half_disc(faces_left=faces_left)
    m = mammogram_from_array(img, laterality="R" if faces_left else "L", view="CC")
    geo = geometry_for(m, (64, 48))
    model_in = geo.forward(img)
    assert model_in.shape == (64, 48)
    # In canonical orientation the chest wall (breast) is at column 0.
    assert model_in[:, :4].mean() > model_in[:, -4:].mean()
    # A small lesion on the source comes back at the same place.
    lesion = np.zeros_like(img)
    lesion[95:105, (20 if not faces_left else 130):(30 if not faces_left else 140)] = 1
    back = geo.inverse(geo.forward(lesion, mode="nearest"), mode="nearest")
    assert back.shape == img.shape
    ys, xs = np.nonzero(back > 0.5)
    assert abs(ys.mean() - 99.5) < 3 and abs(xs.mean() - (24.5 if not faces_left else 134.5)) < 3


def test_monochrome1_is_inverted_and_window_applied():
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    stored = np.array([[0, 4095]], dtype=np.uint16)
    out = normalise_intensities(ds, stored)
    assert out[0, 0] == pytest.approx(1.0, abs=1e-3)
    assert out[0, 1] == pytest.approx(0.0, abs=1e-3)


# --------------------------------------------------------------------------- VOI (PS3.3 C.11.2)


def _voi_ds(photometric="MONOCHROME2", bits=12, signed=False, slope=None, intercept=None, **voi):
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.BitsStored, ds.PixelRepresentation = bits, int(signed)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for keyword, value in voi.items():
        setattr(ds, keyword, value)
    return ds


def _window_fraction(x: float, center: float, width: float, function: str) -> float:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID), as the
    fraction ``(y - y_min) / (y_max - y_min)`` of the output range, one value at a time."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + math.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        if x <= center - 0.5 - (width - 1) / 2:
            return 0.0
        if x > center - 0.5 + (width - 1) / 2:
            return 1.0
        return (x - (center - 0.5)) / (width - 1) + 0.5
    if x <= center - width / 2:
        return 0.0
    if x > center + width / 2:
        return 1.0
    return (x - center) / width + 0.5


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_functions_follow_ps3_3(function, photometric):
    stored = np.arange(80, 121, dtype=np.uint16).reshape(1, -1)
    ds = _voi_ds(photometric, WindowCenter=100, WindowWidth=10, VOILUTFunction=function)
    out = normalise_intensities(ds, stored)
    expected = np.array([[_window_fraction(float(v), 100.0, 10.0, function) for v in stored[0]]])
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    assert out.dtype == np.float32 and out.shape == stored.shape
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_linear_and_linear_exact_differ():
    stored = np.array([[97, 100, 103]], dtype=np.uint16)
    linear = normalise_intensities(_voi_ds(WindowCenter=100, WindowWidth=10, VOILUTFunction="LINEAR"), stored)
    exact = normalise_intensities(_voi_ds(WindowCenter=100, WindowWidth=10, VOILUTFunction="LINEAR_EXACT"), stored)
    assert exact[0, 1] == pytest.approx(0.5, abs=1e-6)
    assert linear[0, 1] == pytest.approx(0.5 / 9 + 0.5, abs=1e-6)


@pytest.mark.parametrize("slope,intercept", [(2.0, -1000.0), (-1.0, 0.0)])
def test_window_on_a_signed_rescaled_image(slope, intercept):
    # Signed 12-bit stored values; the window is in rescaled (Modality LUT output) units.
    stored = np.array([[-2048, -300, -10, 0, 10, 300, 2047]], dtype=np.int16)
    center, width = -1000.0 if slope > 0 else 0.0, 800.0
    ds = _voi_ds(signed=True, slope=slope, intercept=intercept, WindowCenter=center, WindowWidth=width,
                 VOILUTFunction="LINEAR")
    out = normalise_intensities(ds, stored)
    expected = [[_window_fraction(float(v) * slope + intercept, center, width, "LINEAR") for v in stored[0]]]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert 0.0 < out[0, 3] < 1.0


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_lut_sequence_is_applied_to_the_rescaled_values(photometric):
    # 256 entries of 12 bits from input value 1000; the rescale shifts stored 1024 to 1000.
    lut = [round(4095 * (i / 255) ** 2) for i in range(256)]
    item = Dataset()
    item.LUTDescriptor = [256, 1000, 12]
    item.LUTData = lut
    ds = _voi_ds(photometric, slope=1.0, intercept=-24.0, WindowCenter=0, WindowWidth=1)
    ds.VOILUTSequence = [item]
    stored = np.array([[900, 1024, 1100, 1200, 1279, 1400]], dtype=np.uint16)
    out = normalise_intensities(ds, stored)
    # PS3.3 C.11.2.1.1: inputs below the first mapped value take the first entry, above the
    # last the last entry; output is the entry over 2**bits - 1 (the LUT wins over the window).
    expected = np.array([[lut[min(max(int(v) - 24 - 1000, 0), 255)] / 4095 for v in stored[0]]])
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_linear_window_keeps_the_float32_bits_of_the_pre_layout_formula():
    # tests/test_golden_results.py depends on these bits (phantoms: 12 bits, window 2048/4096).
    stored = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    ds = _voi_ds(slope=1.0, intercept=0.0, WindowCenter=2048.0, WindowWidth=4096.0, VOILUTFunction="LINEAR")
    before = np.clip((stored.astype(np.float32) - (2048 - 0.5)) / (4096 - 1.0) + 0.5, 0.0, 1.0)
    np.testing.assert_array_equal(normalise_intensities(ds, stored), before.astype(np.float32))


def test_the_source_data_set_is_left_as_it_was():
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    normalise_intensities(ds, np.array([[0, 4095]], dtype=np.uint16))
    assert "BitsStored" not in ds and "PixelRepresentation" not in ds


def test_invalid_window_is_an_imaging_error():
    with pytest.raises(ImagingError, match="Window Width"):
        normalise_intensities(_voi_ds(WindowCenter=100, WindowWidth=0.5, VOILUTFunction="LINEAR"),
                              np.zeros((2, 2), dtype=np.uint16))


def test_for_processing_and_linear_detector_images_are_stretched_dense_bright():
    stored = np.linspace(100, 4000, 400).astype(np.uint16).reshape(20, 20)
    processing = normalise_intensities(_voi_ds(), stored)  # no VOI: percentile stretch
    assert processing.min() == 0.0 and processing.max() == 1.0
    assert processing[0, 0] < processing[-1, -1]
    ds = _voi_ds()
    ds.PixelIntensityRelationship = "LIN"  # detector signal: more signal = less attenuation
    linear = normalise_intensities(ds, stored)
    assert linear.min() == 0.0 and linear.max() == 1.0
    assert linear[0, 0] > linear[-1, -1]


def test_voi_lut_inputs_far_outside_the_lut_take_its_end_entries():
    item = Dataset()
    item.LUTDescriptor = [4, 10, 16]
    item.LUTData = [0, 1000, 30000, 65535]
    ds = _voi_ds(bits=16, slope=3.0, intercept=0.0)
    ds.VOILUTSequence = [item]
    # rescaled 0, 12, 65547: the last is 65537 past the first mapped value (wraps in uint16 arithmetic)
    out = normalise_intensities(ds, np.array([[0, 4, 21849]], dtype=np.uint16))
    np.testing.assert_allclose(out, [[0.0, 30000 / 65535, 1.0]], atol=1e-6)
