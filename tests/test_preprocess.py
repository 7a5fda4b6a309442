import numpy as np
import pytest
from pydicom.dataset import Dataset

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
