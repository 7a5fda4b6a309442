"""Photometric and VOI handling: any MG data set to float32 in [0, 1], dense tissue bright.

The convention is the MONOCHROME2 sense whatever the source's Photometric Interpretation.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dicom_ai.core.errors import ImagingError

__all__ = ["normalise_intensities"]


def normalise_intensities(ds: pydicom.Dataset, stored: np.ndarray | None = None) -> np.ndarray:
    """Return the image as float32 in [0, 1], dense tissue bright.

    Applies the Modality LUT (rescale), then the first VOI window or VOI LUT when present
    (For Presentation images), or a 0.5-99.5 percentile stretch when not (For Processing);
    a linear (``LIN``) pixel intensity relationship is log-transformed first; MONOCHROME1 is
    inverted last.
    """
    arr = ds.pixel_array if stored is None else stored
    if arr.ndim != 2:
        raise ImagingError(f"expected a single-frame grayscale image, got pixel array shape {arr.shape}")
    x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImagingError(f"Photometric Interpretation {photometric} is not supported for mammograms")

    window_center = ds.get("WindowCenter")
    has_voi_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    if str(ds.get("PixelIntensityRelationship", "")).upper() == "LIN":
        # Linear detector signal: attenuation is -log(signal); larger = denser.
        x = -np.log(np.maximum(x, 1.0))
        # Attenuation already reads dense-bright, so the photometric sense does not apply.
        return _percentile_stretch(x)
    if has_voi_lut:
        x = np.asarray(apply_voi_lut(x, ds, index=0), dtype=np.float32)
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2]) if "LUTDescriptor" in lut else 16
        x = np.clip(x / float(2**bits - 1), 0.0, 1.0)
    elif window_center is not None and ds.get("WindowWidth") is not None:
        center = float(_first(window_center))
        width = max(float(_first(ds.WindowWidth)), 1.0)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if function == "SIGMOID":
            x = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        else:
            x = (x - (center - 0.5)) / (width - 1.0) + 0.5
        x = np.clip(x, 0.0, 1.0)
    else:
        x = _percentile_stretch(x)
    if photometric == "MONOCHROME1":
        x = 1.0 - x
    return x.astype(np.float32, copy=False)


def _first(value: object) -> object:
    return value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value


def _percentile_stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [0.5, 99.5])
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
