"""Ground truth of one mammogram, whatever it came from (a phantom or a published data set)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_ai.imaging import Mammogram

__all__ = ["MASK_KEYS", "Sample"]

#: Ground-truth mask keys of every sample (all zeros when a data set has no such annotation).
MASK_KEYS = ("mass_benign", "mass_malignant", "calcification_benign", "calcification_malignant",
             "cluster_benign", "cluster_malignant")


@dataclass
class Sample:
    """One mammogram with ground truth on its stored pixel grid."""

    image: Mammogram
    masks: dict[str, np.ndarray]
    labels: dict[str, bool]
    view: str
    laterality: str
    study: str = ""
    source: str = ""
