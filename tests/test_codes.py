"""dicom_ai.results.codes: every finding key has standard concepts, consistent with pydicom's tables."""

import pytest
from pydicom.sr._concepts_dict import concepts

from dicom_ai.results.codes import BREAST_SIDE, FINDINGS, LATERALITY, algorithm_family, display_rgb, finding_codes
from dicom_ai.core.views import VIEW_CODES as VIEW
from dicom_ai.core.findings import FINDING_KEYS


def _meanings(code):
    """pydicom's code meanings for a (scheme, value); empty when the code is not in its tables."""
    return {entry[code.value][0].lower() for entry in concepts.get(code.scheme_designator, {}).values()
            if code.value in entry}


def test_every_finding_key_has_codes():
    assert set(FINDINGS) == set(FINDING_KEYS)
    for key in FINDING_KEYS:
        fc = finding_codes(key)
        assert fc.key == key and fc.label and len(fc.label) <= 40
        assert fc.category.value == "49755003"  # Morphologically Abnormal Structure, CID 7150


@pytest.mark.parametrize("key", FINDING_KEYS)
def test_codes_exist_in_dicom_tables_with_their_meaning(key):
    fc = finding_codes(key)
    for code in [fc.category, fc.property_type, fc.sr_finding, fc.cad_finding, fc.probability] + (
            [fc.modifier] if fc.modifier else []):
        meanings = _meanings(code)
        assert meanings, f"{code} not in PS3.16 tables"
        assert code.meaning.lower() in meanings, (code, meanings)


def test_lesion_types_and_modifiers():
    assert finding_codes("malignant_lesion").property_type.value == "4147007"
    assert finding_codes("malignant_lesion").modifier.value == "21594007"
    assert finding_codes("benign_lesion").modifier.value == "30807003"
    assert finding_codes("calcification").property_type.value == "129770007"
    assert finding_codes("calcification_cluster").property_type.value == "129769006"
    assert finding_codes("malignant_lesion").probability.value == "111047"  # Probability of cancer


def test_display_colours_distinct():
    colours = {display_rgb(k) for k in FINDING_KEYS}
    assert len(colours) == len(FINDING_KEYS)
    assert display_rgb("malignant_lesion", 1) != display_rgb("malignant_lesion", 0)
    assert all(0 <= c <= 255 for c in display_rgb("calcification", 5))


def test_unknown_key_and_family_errors():
    with pytest.raises(KeyError, match="known keys"):
        finding_codes("architectural_distortion")
    with pytest.raises(ValueError, match="CID 7162"):
        algorithm_family("Deep Magic")
    assert algorithm_family("Artificial Intelligence").value == "123110"


def test_side_and_view_codes():
    assert LATERALITY["L"].value == "7771000" and BREAST_SIDE["R"].value == "73056007"
    assert VIEW["CC"].value == "399162004" and VIEW["MLO"].value == "399368009"
