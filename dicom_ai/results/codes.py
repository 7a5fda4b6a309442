"""Coded concepts for every finding key: SEG segment descriptions, SR findings, labels, colours.

One table, :data:`FINDINGS`, maps each key of :data:`dicom_ai.core.findings.FINDING_KEYS` to the
standard concepts the SEG writer, the TID 1500 writer and the Mammography CAD SR writer use.
A new finding key needs a row here before any writer accepts it.

Choices (see /work/shared/research/dicom-codes-and-anchors.md for the CID membership):

* SEG category: SCT 49755003 "Morphologically Abnormal Structure" (CID 7150) for all keys.
* SEG type: SCT 4147007 "Mass" (CID 7151/7159/7194) for lesions, with SCT 21594007 "Malignant"
  or SCT 30807003 "Benign" as Segmented Property Type Modifier; SCT 129770007 "Individual
  Calcification" and SCT 129769006 "Calcification Cluster" for calcifications. The two
  calcification codes are in no SEG CID; CID 7151 is baseline, so they are allowed (they come
  from the mammography CIDs 6014-6016 and are what a breast imager reads).
* TID 1500 finding type: the same type code (the modifier is carried by the label and by the
  probability concept, see below).
* Mammography CAD SR Single Image Finding (CID 6014): lesions as SCT 129793001 "Mammography
  breast density", the concept classic mammography CAD uses for masses (CID 6014 has no Mass);
  calcifications as Individual Calcification / Calcification Cluster.
* Probability concept of a region or image: DCM 111047 "Probability of cancer" for the
  malignant key, DCM 111012 "Certainty of Finding" for the others (the probability that the
  finding is what its finding type says). Both are in CID 6048; no private codes are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from dicom_ai.core.errors import ResultError
from dicom_ai.core.findings import FINDING_KEYS

__all__ = [
    "FindingCodes",
    "FINDINGS",
    "finding_codes",
    "display_rgb",
    "BREAST",
    "LATERALITY",
    "BREAST_SIDE",
    "PERCENT",
    "SQUARE_MM",
    "algorithm_family",
]

#: Anatomic region of every segment and finding site of every SR finding.
BREAST = codes.SCT.Breast
#: Laterality of a finding site (TID 1500 Finding Site / Laterality, CID 244).
LATERALITY = {"L": Code("7771000", "SCT", "Left"), "R": Code("24028007", "SCT", "Right"),
              "B": Code("51440002", "SCT", "Bilateral")}
#: Image laterality in the Mammography CAD SR (CID 6022 Side).
BREAST_SIDE = {"L": Code("80248007", "SCT", "Left breast"), "R": Code("73056007", "SCT", "Right breast"),
               "B": Code("63762007", "SCT", "Both breasts")}
PERCENT = Code("%", "UCUM", "Percent")
SQUARE_MM = Code("mm2", "UCUM", "Square millimeter")

_MASS = Code("4147007", "SCT", "Mass")
_INDIVIDUAL_CALCIFICATION = Code("129770007", "SCT", "Individual Calcification")
_CALCIFICATION_CLUSTER = Code("129769006", "SCT", "Calcification Cluster")
_BREAST_DENSITY = Code("129793001", "SCT", "Mammography breast density")
_PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")
_CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")


@dataclass(frozen=True)
class FindingCodes:
    """All coded concepts and display hints for one finding key.

    ``rgb`` is the recommended display colour (sRGB, 0-255) of the first segment of this
    finding in a SEG; later segments of the same finding (from another model) get a lighter
    shade, see :func:`display_rgb`.
    """

    key: str
    label: str
    category: Code
    property_type: Code
    modifier: Code | None
    sr_finding: Code
    cad_finding: Code
    probability: Code
    rgb: tuple[int, int, int]


FINDINGS: dict[str, FindingCodes] = {
    "malignant_lesion": FindingCodes(
        key="malignant_lesion", label="Malignant lesion",
        category=codes.SCT.MorphologicallyAbnormalStructure, property_type=_MASS,
        modifier=codes.SCT.Malignant, sr_finding=_MASS, cad_finding=_BREAST_DENSITY,
        probability=_PROBABILITY_OF_CANCER, rgb=(230, 30, 30)),
    "benign_lesion": FindingCodes(
        key="benign_lesion", label="Benign lesion",
        category=codes.SCT.MorphologicallyAbnormalStructure, property_type=_MASS,
        modifier=codes.SCT.Benign, sr_finding=_MASS, cad_finding=_BREAST_DENSITY,
        probability=_CERTAINTY_OF_FINDING, rgb=(40, 200, 60)),
    "mass": FindingCodes(
        key="mass", label="Mass",
        category=codes.SCT.MorphologicallyAbnormalStructure, property_type=_MASS,
        modifier=None, sr_finding=_MASS, cad_finding=_BREAST_DENSITY,
        probability=_CERTAINTY_OF_FINDING, rgb=(230, 60, 200)),
    "calcification": FindingCodes(
        key="calcification", label="Calcification",
        category=codes.SCT.MorphologicallyAbnormalStructure, property_type=_INDIVIDUAL_CALCIFICATION,
        modifier=None, sr_finding=_INDIVIDUAL_CALCIFICATION, cad_finding=_INDIVIDUAL_CALCIFICATION,
        probability=_CERTAINTY_OF_FINDING, rgb=(255, 220, 0)),
    "calcification_cluster": FindingCodes(
        key="calcification_cluster", label="Calcification cluster",
        category=codes.SCT.MorphologicallyAbnormalStructure, property_type=_CALCIFICATION_CLUSTER,
        modifier=None, sr_finding=_CALCIFICATION_CLUSTER, cad_finding=_CALCIFICATION_CLUSTER,
        probability=_CERTAINTY_OF_FINDING, rgb=(255, 140, 0)),
}

assert set(FINDINGS) == set(FINDING_KEYS), "every finding key needs a row in dicom_ai.results.codes.FINDINGS"


def finding_codes(key: str) -> FindingCodes:
    """The coded concepts of a finding key; ``KeyError`` with the known keys otherwise."""
    try:
        return FINDINGS[key]
    except KeyError:
        raise KeyError(f"no codes for finding key {key!r}; known keys: {sorted(FINDINGS)}") from None


def display_rgb(key: str, occurrence: int = 0) -> tuple[int, int, int]:
    """Display colour of the ``occurrence``-th segment (0-based) of finding ``key`` in one SEG.

    Each further occurrence is blended 35 % towards white so that two models' segments of
    the same finding stay distinguishable.
    """
    r, g, b = finding_codes(key).rgb
    t = 1.0 - 0.65 ** occurrence
    return tuple(int(round(c + (255 - c) * t)) for c in (r, g, b))  # type: ignore[return-value]


def algorithm_family(name: str) -> Code:
    """CID 7162 code for a ModelIdentity family string (matched on code meaning, case-insensitive).

    Unknown families raise :class:`~dicom_ai.core.errors.ResultError` listing the allowed meanings, so that a bundle
    manifest with a typo is caught before any object is written.
    """
    cid = codes.cid7162
    wanted = name.strip().lower()
    for keyword in cid.dir():
        code = getattr(cid, keyword)
        if code.meaning.lower() == wanted or keyword.lower() == wanted.replace(" ", ""):
            return code
    meanings = sorted(getattr(cid, k).meaning for k in cid.dir())
    raise ResultError(f"model family {name!r} is not in CID 7162; use one of {meanings}")
