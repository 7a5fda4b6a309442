"""Phantom studies: API, determinism, orientation, ground truth consistency."""

import numpy as np
import pytest

from dicom_ai.data.phantom import MASK_KEYS, generate_study
from dicom_ai.imaging import breast_mask, read_mammogram

SHAPE = (208, 160)


@pytest.fixture(scope="module")
def study():
    return generate_study(11, shape=SHAPE, normal=False)


def test_four_views_with_masks_and_labels(study):
    assert [(im.laterality, im.view) for im in study.images] == [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
    for im in study.images:
        assert im.dataset.Modality == "MG"
        assert (im.dataset.Rows, im.dataset.Columns) == SHAPE
        assert set(im.masks) == set(MASK_KEYS)
        for m in im.masks.values():
            assert m.dtype == bool and m.shape == SHAPE
            assert not (m & ~im.breast_mask).any(), "ground truth outside the breast"
        assert set(im.labels) == {"benign", "malignant"}
    assert any(v["benign"] or v["malignant"] for v in study.breast_labels.values())


def test_deterministic_for_a_seed():
    a = generate_study(5, shape=SHAPE)
    b = generate_study(5, shape=SHAPE)
    for x, y in zip(a.images, b.images):
        assert x.dataset.PixelData == y.dataset.PixelData
        assert x.dataset.SOPInstanceUID == y.dataset.SOPInstanceUID
        for k in MASK_KEYS:
            assert np.array_equal(x.masks[k], y.masks[k])
    c = generate_study(6, shape=SHAPE)
    assert c.images[0].dataset.PixelData != a.images[0].dataset.PixelData


def test_stored_orientation_matches_real_modalities(study):
    for im in study.images:
        m = read_mammogram(im.dataset)
        assert m.faces_left == (im.laterality == "R")
        cols = im.breast_mask.shape[1]
        chest = im.breast_mask[:, -3:] if im.laterality == "R" else im.breast_mask[:, :3]
        far = im.breast_mask[:, :3] if im.laterality == "R" else im.breast_mask[:, -3:]
        assert chest.sum() > 0.3 * SHAPE[0] and far.sum() == 0
        # The preprocessing breast mask finds the same breast.
        bm = breast_mask(m.pixels)
        iou = (bm & im.breast_mask).sum() / (bm | im.breast_mask).sum()
        assert iou > 0.95, (im.laterality, im.view, iou)


def test_findings_consistent_across_views():
    for seed in range(20, 24):
        st = generate_study(seed, shape=SHAPE, normal=False)
        for lat in ("L", "R"):
            cc, mlo = st.image(lat, "CC"), st.image(lat, "MLO")
            assert cc.labels == mlo.labels == st.breast_labels[lat]
            for key in ("mass_benign", "mass_malignant", "cluster_benign", "cluster_malignant"):
                assert cc.masks[key].any() == mlo.masks[key].any(), (seed, lat, key)
            # Same finding, same depth behind the nipple (columns) within a few mm in both views.
            for a, b in zip(cc.findings, mlo.findings):
                assert (a["kind"], a["shape"]) == (b["kind"], b["shape"])
                if a["kind"] == "mass":
                    ratio = a["area_px"] / max(b["area_px"], 1)
                    assert 0.5 < ratio < 2.0


def test_normal_study_has_no_findings():
    st = generate_study(3, shape=SHAPE, normal=True)
    for im in st.images:
        assert not any(m.any() for m in im.masks.values())
        assert im.labels == {"benign": False, "malignant": False}


def test_cluster_regions_are_filled_and_hold_their_specks():
    from dicom_ai.data.metrics import label_regions

    seen = 0
    for seed in range(40, 60):
        st = generate_study(seed, shape=SHAPE, normal=False)
        for im in st.images:
            for cls in ("benign", "malignant"):
                cluster, calc = im.masks["cluster_" + cls], im.masks["calcification_" + cls]
                if not cluster.any():
                    continue
                seen += 1
                labels = label_regions(cluster)
                for region in range(1, labels.max() + 1):
                    rr, cc = np.nonzero(labels == region)
                    assert labels[int(round(rr.mean())), int(round(cc.mean()))] == region  # filled, not a ring
                # Specks of a cluster lie inside its region (isolated macrocalcifications have none).
                if not any(f["kind"] == "macrocalcification" for f in im.findings):
                    assert (calc & ~cluster).sum() == 0
        if seen >= 4:
            break
    assert seen >= 4
