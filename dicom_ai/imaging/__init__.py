"""imaging: from a received MG data set to the pixels every model reads, and back.

Owns decoding (any transfer syntax pydicom's plugins decode), the photometric and VOI
handling (float32 in [0, 1], dense tissue bright), orientation (chest wall at column 0), the
breast mask (computed once per image, cached on the :class:`Mammogram`), resampling, and the
:class:`Geometry` that maps a model's input grid back onto the stored source pixels.

May import: :mod:`dicom_ai.core`; numpy, pydicom, SimpleITK, torch (resampling only).
"""

from dicom_ai.imaging.geometry import Geometry, geometry_for
from dicom_ai.imaging.intensity import normalise_intensities
from dicom_ai.imaging.mammogram import Mammogram, faces_left_by_content, mammogram_from_array, read_mammogram
from dicom_ai.imaging.mask import breast_mask
from dicom_ai.imaging.resample import resize

__all__ = [
    "Mammogram",
    "Geometry",
    "read_mammogram",
    "mammogram_from_array",
    "faces_left_by_content",
    "normalise_intensities",
    "breast_mask",
    "geometry_for",
    "resize",
]
