"""Ground truth of one mammogram, whatever it came from (a phantom or a published data set)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dicom_ai.imaging import Mammogram

__all__ = ["MASK_KEYS", "LESION_KINDS", "Lesion", "Sample"]

#: Ground-truth mask keys of every sample (all zeros when a data set has no such annotation).
MASK_KEYS = ("mass_benign", "mass_malignant", "calcification_benign", "calcification_malignant",
             "cluster_benign", "cluster_malignant")

#: Lesion kinds of :class:`Lesion`; lesion-level metrics are reported per kind.
LESION_KINDS = ("mass", "calcification_cluster", "architectural_distortion", "asymmetry")


@dataclass
class Lesion:
    """One annotated abnormality of an image, for lesion-level (FROC) scoring.

    Attributes
    ----------
    kind
        One of :data:`LESION_KINDS`.
    severity
        ``"benign"`` or ``"malignant"``.
    mask
        ``(rows, columns)`` boolean region on the stored grid of the image (a mark is a hit
        when its centroid lies in it), or None when the data set gives no location (such a
        lesion counts for image-level labels only).
    outline
        How ``mask`` was drawn: ``"circle"`` (centre and radius), ``"mask"`` (a pixel mask),
        ``"polygon"``, ``"box"`` or ``"component"`` (a connected region of a mask), or ``""``.
    centre_rc
        Centre of the annotation in pixels, (row, column) with (0, 0) the centre of the
        top-left stored pixel; None without location.
    radius_px
        Radius of the enclosing circle in pixels when the annotation is a circle, else None.
    label
        The data set's own class code (MIAS ``CIRC``, ``SPIC``, ...), for reports.
    """

    kind: str
    severity: str
    mask: np.ndarray | None = None
    outline: str = ""
    centre_rc: tuple[float, float] | None = None
    radius_px: float | None = None
    label: str = ""


@dataclass
class Sample:
    """One mammogram with ground truth on its stored pixel grid.

    ``lesions`` lists the annotated abnormalities one by one (adapters that know them, e.g.
    MIAS); when empty, lesion-level evaluation derives them from the connected regions of
    ``masks`` (:func:`dicom_ai.data.evaluate.lesions_of`).
    """

    image: Mammogram
    masks: dict[str, np.ndarray]
    labels: dict[str, bool]
    view: str
    laterality: str
    study: str = ""
    source: str = ""
    lesions: list[Lesion] = field(default_factory=list)
