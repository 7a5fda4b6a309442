"""Photometric and VOI handling: any MG data set to float32 in [0, 1], dense tissue bright.

Owns the one intensity convention every model reads: float32 in [0, 1] in the MONOCHROME2
sense (larger = denser) whatever the source's Photometric Interpretation. The DICOM grayscale
pipeline up to the VOI stage (Modality LUT or rescale, then VOI LUT Sequence or window with
``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``; PS3.3 C.11.1 and C.11.2) is pydicom's
(:func:`pydicom.pixels.apply_modality_lut`, :func:`pydicom.pixels.apply_voi_lut`); this module
only maps the VOI output range onto [0, 1], handles images without a VOI transform (linear
detector signal, For Processing images) and inverts MONOCHROME1.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dicom_ai.core.errors import ImagingError

__all__ = ["normalise_intensities"]

#: The elements pydicom's Modality LUT and VOI functions read.
_VOI_KEYWORDS = ("PhotometricInterpretation", "BitsStored", "PixelRepresentation",
                 "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
                 "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence")


def normalise_intensities(ds: pydicom.Dataset, stored: np.ndarray | None = None) -> np.ndarray:
    """Return the image as float32 in [0, 1], dense tissue bright, on the stored pixel grid.

    In order:

    1. the Modality LUT Sequence or Rescale Slope/Intercept (pydicom's
       :func:`~pydicom.pixels.apply_modality_lut`);
    2. a linear detector signal (Pixel Intensity Relationship ``LIN``) is turned into
       attenuation, ``-log(signal)``, and stretched between its 0.5 and 99.5 percentiles;
       attenuation already reads dense-bright, so steps 3-4 do not apply;
    3. the first VOI LUT Sequence item, else the first Window Center/Width with its VOI LUT
       Function (``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``), through pydicom's
       :func:`~pydicom.pixels.apply_voi_lut`; its output range (``[0, 2**n - 1]`` for a LUT of
       ``n``-bit entries; for a window the Modality LUT output range, i.e. the range of Bits
       Stored and Pixel Representation, rescaled when a rescale applies) is mapped onto [0, 1].
       Without any VOI transform (For Processing images) the 0.5-99.5 percentile stretch is
       used instead;
    4. MONOCHROME1 is inverted last.

    ``stored`` is the decoded Pixel Data, ``(rows, columns)``; ``ds.pixel_array`` when None.
    A data set without Bits Stored or Pixel Representation (a bare array with a window) is
    taken to use the full range of ``stored``'s integer dtype. Raises
    :class:`~dicom_ai.core.errors.ImagingError` for anything but a single-frame MONOCHROME1/2
    image or an invalid VOI transform.
    """
    arr = ds.pixel_array if stored is None else stored
    if arr.ndim != 2:
        raise ImagingError(f"expected a single-frame grayscale image, got pixel array shape {arr.shape}")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImagingError(f"Photometric Interpretation {photometric} is not supported for mammograms")
    voi = _voi_dataset(ds, arr)
    linear = str(ds.get("PixelIntensityRelationship", "")).upper() == "LIN"
    has_voi = bool(voi.get("VOILUTSequence")) or (voi.get("WindowCenter") is not None
                                                  and voi.get("WindowWidth") is not None)
    if has_voi and not linear and np.issubdtype(arr.dtype, np.integer) and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo < _MAX_TABLE and 4 * (hi - lo + 1) <= arr.size:
            # Every step is a function of the stored value alone: computed once per value in
            # use and looked up, the same bits at a fraction of the cost for a full-field
            # image (millions of pixels, a few thousand grey levels).
            table = _to_unit(np.arange(lo, hi + 1, dtype=arr.dtype).reshape(1, -1), voi, photometric, False)[0]
            if lo >= 0 and arr.dtype.itemsize <= 2:
                # Unsigned values index a table from 0 directly: no full-size array of offsets.
                return np.concatenate([np.zeros(lo, dtype=table.dtype), table])[arr]
            return table[np.subtract(arr, lo, dtype=np.int32)]
    return _to_unit(arr, voi, photometric, linear)


#: Largest span of stored values looked up in a table (Bits Stored is at most 16).
_MAX_TABLE = 1 << 17


def _to_unit(arr: np.ndarray, voi: Dataset, photometric: str, linear: bool) -> np.ndarray:
    """Steps 1-4 of :func:`normalise_intensities` on ``arr``."""
    modality = apply_modality_lut(arr, voi)
    if linear:
        # Linear detector signal: attenuation is -log(signal); larger = denser.
        x = -np.log(np.maximum(np.asarray(modality, dtype=np.float32), 1.0))
        return _percentile_stretch(x)
    if voi.get("VOILUTSequence"):
        x = _lut_to_unit(modality, voi)
    elif voi.get("WindowCenter") is not None and voi.get("WindowWidth") is not None:
        x = _window_to_unit(modality, voi)
    else:
        x = _percentile_stretch(np.asarray(modality, dtype=np.float32))
    if photometric == "MONOCHROME1":
        x = 1.0 - x
    return x.astype(np.float32, copy=False)


def _voi_dataset(ds: pydicom.Dataset, arr: np.ndarray) -> Dataset:
    """The elements pydicom's LUT functions read, in a data set of their own.

    :func:`pydicom.pixels.apply_windowing` assigns to Bits Stored and the rescale elements of
    the data set it is given; working on fresh elements leaves the caller's data set as it was.
    Bits Stored and Pixel Representation default to ``arr``'s integer dtype when absent.
    """
    out = Dataset()
    for keyword in _VOI_KEYWORDS:
        if keyword in ds:
            elem = ds[keyword]
            out.add_new(elem.tag, elem.VR, elem.value)
    if "PhotometricInterpretation" not in out:
        out.PhotometricInterpretation = "MONOCHROME2"
    if "BitsStored" not in out:
        out.BitsStored = arr.dtype.itemsize * 8 if np.issubdtype(arr.dtype, np.integer) else 16
    if "PixelRepresentation" not in out:
        out.PixelRepresentation = int(np.issubdtype(arr.dtype, np.signedinteger))
    # OW LUT Data is unpacked with the source's byte order.
    if getattr(ds, "file_meta", None) is not None:
        out.file_meta = ds.file_meta
    else:
        out.set_original_encoding(*ds.original_encoding)
    return out


def _lut_to_unit(modality: np.ndarray, voi: Dataset) -> np.ndarray:
    """The first VOI LUT Sequence item applied, its ``n``-bit output range mapped onto [0, 1]."""
    entries, first, bits = (int(v) for v in voi.VOILUTSequence[0].LUTDescriptor)
    entries = entries or 2**16
    # LUT inputs are integers (a rescale with a fractional slope rounds to the nearest); inputs
    # outside the LUT take its first or last entry (PS3.3 C.11.2.1.1), so clipping to the LUT's
    # domain first changes nothing and keeps pydicom's uint16 index arithmetic in range.
    modality = np.clip(np.rint(modality) if not np.issubdtype(modality.dtype, np.integer) else modality,
                       first, first + entries - 1).astype(np.int64)
    try:
        y = apply_voi_lut(modality, voi, index=0, prefer_lut=True)
    except (NotImplementedError, ValueError, AttributeError) as exc:
        raise ImagingError(f"cannot apply the VOI LUT Sequence: {exc}") from exc
    return np.clip(np.asarray(y, dtype=np.float64) / float(2**bits - 1), 0.0, 1.0).astype(np.float32)


def _window_to_unit(modality: np.ndarray, voi: Dataset) -> np.ndarray:
    """The first window applied (pydicom), its output range ``[y_min, y_max]`` mapped onto [0, 1].

    pydicom maps a window onto the Modality LUT output range (PS3.3 C.11.2.1.2): the range of
    the LUT's entries when a Modality LUT Sequence applies, else the range of Bits Stored and
    Pixel Representation, rescaled when Rescale Slope/Intercept apply.

    The fraction ``t`` of the output range (float64) is rounded to float32 as ``t - 1/2`` and
    then shifted back by ``1/2`` in float32, which is how the package's own formula
    ``(x - (c - 1/2)) / (w - 1) + 1/2`` in float32 rounded before pydicom did the windowing: a
    ``LINEAR`` window gives the same bits as before (``tests/test_golden_results.py`` depends on
    them). Rounding ``t`` directly would differ by one float32 step (at most 3e-8) in about a
    third of the grey levels of a 12-bit image.
    """
    if voi.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(voi.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        bits = int(voi.BitsStored)
        if int(voi.PixelRepresentation) == 0:
            y_min, y_max = 0.0, float(2**bits - 1)
        else:
            y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
        if "RescaleSlope" in voi and "RescaleIntercept" in voi:
            slope, intercept = float(voi.RescaleSlope), float(voi.RescaleIntercept)
            y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    if y_max == y_min:
        raise ImagingError("the Modality LUT output range is empty (Rescale Slope 0?); cannot apply the window")
    try:
        y = apply_voi_lut(np.asarray(modality), voi, index=0, prefer_lut=True)
    except ValueError as exc:  # widths out of range, unknown VOI LUT Function
        raise ImagingError(f"cannot apply the VOI window: {exc}") from exc
    t = (np.asarray(y, dtype=np.float64) - y_min) / (y_max - y_min)
    x = (t - 0.5).astype(np.float32) + np.float32(0.5)
    return np.clip(x, 0.0, 1.0)


def _percentile_stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [0.5, 99.5])
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
