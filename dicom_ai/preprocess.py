"""Decode a mammogram, normalise its intensities, orient it, crop it to the breast, and map back.

Every model of the node goes through this module, so that the photometric handling, the
orientation convention and the inverse mapping onto the source grid exist exactly once.

Conventions:

* Intensities: float32 in [0, 1] with dense tissue bright (the MONOCHROME2 sense), whatever
  the Photometric Interpretation of the source.
* Canonical orientation ("facing right"): the chest wall is at column 0 and the nipple points
  towards increasing columns, as an L-CC is stored by convention (Patient Orientation A\\R).
* Arrays are ``(rows, columns)``; boxes are half-open ``(r0, r1, c0, c1)`` in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dicom_ai.views import laterality_of, view_of

__all__ = [
    "Mammogram",
    "Geometry",
    "read_mammogram",
    "mammogram_from_array",
    "normalise_intensities",
    "breast_mask",
    "geometry_for",
    "resize",
]


class PreprocessError(ValueError):
    """A data set cannot be turned into a mammogram the models can read."""


@dataclass
class Mammogram:
    """One decoded mammographic view on its stored pixel grid.

    ``spacing_mm`` is (row, column) spacing in mm at the detector plane (Imager Pixel
    Spacing; Pixel Spacing only when no Imager Pixel Spacing is present). ``faces_left``
    is True when the nipple points to column 0 (an R-CC as stored by convention), i.e.
    when the image must be flipped to reach the canonical orientation.
    """

    pixels: np.ndarray
    laterality: str
    view: str
    spacing_mm: tuple[float, float]
    faces_left: bool
    sop_instance_uid: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]


def normalise_intensities(ds: pydicom.Dataset, stored: np.ndarray | None = None) -> np.ndarray:
    """Return the image as float32 in [0, 1], dense tissue bright.

    Applies the Modality LUT (rescale), then the first VOI window or VOI LUT when present
    (For Presentation images), or a 0.5-99.5 percentile stretch when not (For Processing);
    a linear (``LIN``) pixel intensity relationship is log-transformed first; MONOCHROME1 is
    inverted last.
    """
    arr = ds.pixel_array if stored is None else stored
    if arr.ndim != 2:
        raise PreprocessError(f"expected a single-frame grayscale image, got pixel array shape {arr.shape}")
    x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PreprocessError(f"Photometric Interpretation {photometric} is not supported for mammograms")

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


def _faces_left(ds: pydicom.Dataset, pixels: np.ndarray, laterality: str) -> bool:
    """Decide the nipple direction from Patient Orientation, then laterality, then content."""
    orientation = ds.get("PatientOrientation")
    if orientation and len(orientation) == 2 and str(orientation[0]):
        towards = str(orientation[0])[0].upper()
        if towards == "A":
            return False
        if towards == "P":
            return True
    if laterality:
        return laterality == "R"
    # Unlabelled: the chest wall side holds more breast.
    mask = breast_mask(pixels)
    half = mask.shape[1] // 2
    return mask[:, half:].sum() > mask[:, :half].sum()


def mammogram_from_array(
    pixels: np.ndarray,
    laterality: str,
    view: str,
    spacing_mm: tuple[float, float] = (0.1, 0.1),
    faces_left: bool | None = None,
) -> Mammogram:
    """Wrap a [0, 1] float array (for example a PNG scaled by the caller) as a Mammogram.

    When ``faces_left`` is None it is taken from the laterality (R faces left by convention).
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if faces_left is None:
        faces_left = laterality.upper() == "R"
    return Mammogram(pixels=pixels, laterality=laterality.upper(), view=view.upper(),
                     spacing_mm=(float(spacing_mm[0]), float(spacing_mm[1])), faces_left=faces_left)


def read_mammogram(source: pydicom.Dataset | str) -> Mammogram:
    """Decode a DICOM MG image (any transfer syntax pydicom's plugins decode) into a Mammogram."""
    ds = pydicom.dcmread(source) if isinstance(source, str) else source
    if "PixelData" not in ds:
        raise PreprocessError("data set has no Pixel Data")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise PreprocessError("only single-frame grayscale mammograms are supported")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoder plugins raise many types
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        raise PreprocessError(f"cannot decode Pixel Data (transfer syntax {ts}): {exc}") from exc
    pixels = normalise_intensities(ds, stored)
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing") or (0.1, 0.1)
    laterality = laterality_of(ds)
    return Mammogram(
        pixels=pixels,
        laterality=laterality,
        view=view_of(ds),
        spacing_mm=(float(spacing[0]), float(spacing[1])),
        faces_left=_faces_left(ds, pixels, laterality),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
    )


def breast_mask(pixels: np.ndarray, max_side: int = 512) -> np.ndarray:
    """Boolean breast mask on the grid of ``pixels`` ([0, 1], dense bright).

    Triangle threshold on a downsampled copy (it sits just above the background peak, so
    fatty tissue stays in, which Otsu would cut out), a small opening to detach markers,
    the largest connected component, holes filled: burned-in labels and skin markers in the
    background are excluded.
    """
    rows, cols = pixels.shape
    factor = max(1, int(np.ceil(max(rows, cols) / max_side)))
    small = resize(pixels, (int(np.ceil(rows / factor)), int(np.ceil(cols / factor))))
    image = sitk.GetImageFromArray(small.astype(np.float32))
    foreground = sitk.TriangleThreshold(image, 0, 1)
    foreground = sitk.BinaryMorphologicalOpening(foreground, [2, 2])
    if not np.any(sitk.GetArrayViewFromImage(foreground)):
        return np.zeros_like(pixels, dtype=bool)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(foreground), sortByObjectSize=True)
    largest = sitk.BinaryFillhole(sitk.Equal(components, 1))
    mask_small = sitk.GetArrayFromImage(largest).astype(np.float32)
    return resize(mask_small, (rows, cols), mode="nearest") > 0.5


def resize(array: np.ndarray, shape: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize a 2-D float array to ``shape`` (rows, columns); antialiased when shrinking."""
    if tuple(array.shape) == tuple(shape):
        return np.asarray(array, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if mode == "nearest":
        out = F.interpolate(t, size=shape, mode="nearest")
    else:
        shrinking = shape[0] < array.shape[0] or shape[1] < array.shape[1]
        out = F.interpolate(t, size=shape, mode=mode, align_corners=False, antialias=shrinking)
    return out[0, 0].numpy()


@dataclass(frozen=True)
class Geometry:
    """The map from a source image to a model's input grid, and back.

    Forward: flip to the canonical orientation (if ``flip``), take ``box`` (canonical
    coordinates, may extend past the image, where zeros are padded), resize to
    ``out_shape``. ``inverse`` undoes the three steps, so a model's map lands on the
    stored source pixels.
    """

    source_shape: tuple[int, int]
    flip: bool
    box: tuple[int, int, int, int]
    out_shape: tuple[int, int]

    def forward(self, image: np.ndarray, mode: str = "bilinear") -> np.ndarray:
        """Source grid -> model input grid."""
        if tuple(image.shape) != tuple(self.source_shape):
            raise ValueError(f"image shape {image.shape} differs from geometry source {self.source_shape}")
        canonical = image[:, ::-1] if self.flip else image
        r0, r1, c0, c1 = self.box
        rows, cols = self.source_shape
        crop = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
        sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
        crop[sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = canonical[sr0:sr1, sc0:sc1]
        return resize(crop, self.out_shape, mode=mode)

    def inverse(self, array: np.ndarray, mode: str = "bilinear", fill: float = 0.0) -> np.ndarray:
        """Model grid -> source grid; pixels outside the box get ``fill``."""
        r0, r1, c0, c1 = self.box
        rows, cols = self.source_shape
        crop = resize(np.asarray(array, dtype=np.float32), (r1 - r0, c1 - c0), mode=mode)
        canonical = np.full((rows, cols), fill, dtype=np.float32)
        sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
        canonical[sr0:sr1, sc0:sc1] = crop[sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0]
        return np.ascontiguousarray(canonical[:, ::-1]) if self.flip else canonical


def geometry_for(
    mammogram: Mammogram,
    out_shape: tuple[int, int],
    mask: np.ndarray | None = None,
    margin: int = 0,
) -> Geometry:
    """The breast-crop geometry of ``mammogram`` for a model input of ``out_shape``.

    The box is the breast bounding box (plus ``margin`` pixels) in canonical orientation,
    grown to the aspect ratio of ``out_shape`` so nothing is distorted: extra columns are
    added away from the chest wall, extra rows evenly above and below. With no breast found
    the whole image is used.
    """
    rows, cols = mammogram.shape
    if mask is None:
        mask = breast_mask(mammogram.pixels)
    canonical = mask[:, ::-1] if mammogram.faces_left else mask
    if canonical.any():
        r_idx = np.flatnonzero(canonical.any(axis=1))
        c_idx = np.flatnonzero(canonical.any(axis=0))
        r0, r1 = int(r_idx[0]) - margin, int(r_idx[-1]) + 1 + margin
        c0, c1 = 0, int(c_idx[-1]) + 1 + margin  # chest wall kept at column 0
    else:
        r0, r1, c0, c1 = 0, rows, 0, cols
    r0, r1, c1 = max(r0, 0), min(r1, rows), min(max(c1, 1), cols)
    height, width = r1 - r0, c1 - c0
    target = out_shape[0] / out_shape[1]
    if height / width > target:
        c1 = c0 + int(round(height / target))
    else:
        extra = int(round(width * target)) - height
        r0 -= extra // 2
        r1 = r0 + int(round(width * target))
    return Geometry(source_shape=(rows, cols), flip=mammogram.faces_left, box=(r0, r1, c0, c1),
                    out_shape=(int(out_shape[0]), int(out_shape[1])))
