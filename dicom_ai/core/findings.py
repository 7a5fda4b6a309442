"""What a model hands to the result writers: probability maps and scores per source image.

Every model of the node (GLAM, the discriminative U-Net, the microcalcification CNNs)
produces exactly these objects, and the SEG and SR writers consume nothing else.

Coordinate convention: every map is on the *stored* pixel grid of its source image,
``(rows, columns)`` as the DICOM Pixel Data is laid out, before any flip or crop the
model applied internally. Row 0 is the first stored row, column 0 the first stored column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dicom_ai.core.errors import ModelError

__all__ = ["FINDING_KEYS", "SCORE_KEYS", "ModelIdentity", "ProbabilityMap", "ImageScore", "ModelOutput", "ImageFindings"]

#: Finding keys a map may carry. The SEG/SR writers map each to its coded concepts
#: (see ``dicom_ai.results.codes``); a new key needs codes there first.
FINDING_KEYS: tuple[str, ...] = (
    "malignant_lesion",  # malignant mass or lesion (GLAM malignant, U-Net malignancy)
    "benign_lesion",  # benign mass or lesion (GLAM benign)
    "mass",  # mass of either severity (the U-Net fine-tuned on real masses, benign and malignant)
    "calcification",  # individual microcalcification pixels
    "calcification_cluster",  # cluster region; value inside = the cluster's score
)

#: Image-level score names.
SCORE_KEYS: tuple[str, ...] = ("malignant", "benign")


@dataclass(frozen=True)
class ModelIdentity:
    """Who produced a map: copied from the model bundle manifest.

    ``family`` is the algorithm family written to the SEG Algorithm Identification
    Sequence (CID 7162); deep-learning models are "Artificial Intelligence".
    """

    name: str
    version: str
    family: str = "Artificial Intelligence"


@dataclass
class ProbabilityMap:
    """One finding type's per-pixel probability on the source image grid.

    ``probability`` is float32 of shape ``(Rows, Columns)`` of the source image with
    values in [0, 1]. ``threshold`` is the operating point from the model bundle at
    which the map is binarised for a BINARY SEG and for SR regions.
    """

    finding: str
    probability: np.ndarray
    threshold: float
    model: ModelIdentity

    def __post_init__(self) -> None:
        if self.finding not in FINDING_KEYS:
            raise ModelError(f"unknown finding key {self.finding!r}; expected one of {FINDING_KEYS}")
        if self.probability.ndim != 2:
            raise ModelError(f"probability map must be 2-D (rows, columns), got shape {self.probability.shape}")
        if not 0.0 < self.threshold < 1.0:
            raise ModelError(f"threshold must lie in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class ImageScore:
    """An image-level probability (``name`` in SCORE_KEYS), in [0, 1], with its model."""

    name: str
    value: float
    model: ModelIdentity

    def __post_init__(self) -> None:
        if self.name not in SCORE_KEYS:
            raise ModelError(f"unknown score name {self.name!r}; expected one of {SCORE_KEYS}")
        if not 0.0 <= self.value <= 1.0:
            raise ModelError(f"score {self.name} must lie in [0, 1], got {self.value}")


@dataclass
class ModelOutput:
    """What one model returns for one image."""

    maps: list[ProbabilityMap] = field(default_factory=list)
    scores: list[ImageScore] = field(default_factory=list)


@dataclass
class ImageFindings:
    """All model outputs for one source image, identified by its SOP Instance UID."""

    sop_instance_uid: str
    maps: list[ProbabilityMap] = field(default_factory=list)
    scores: list[ImageScore] = field(default_factory=list)
    #: Where the image's orientation (which way the nipple points) came from, as the pipeline
    #: decided it (``dicom_ai.imaging.mammogram.orient``: header, pixels, ...); "" if unknown.
    orientation: str = ""

    def add(self, output: ModelOutput) -> None:
        """Append one model's maps and scores."""
        self.maps.extend(output.maps)
        self.scores.extend(output.scores)
