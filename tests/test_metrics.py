"""Each metric against values computed by hand (see the comments)."""

import math

import numpy as np
import pytest

from dicom_ai.data import metrics as M


def test_dice_iou_soft_dice():
    p = np.array([1, 1, 0, 0], bool)
    g = np.array([1, 0, 1, 0], bool)
    assert M.dice(p, g) == pytest.approx(0.5)  # 2*1 / (2+2)
    assert M.iou(p, g) == pytest.approx(1 / 3)  # 1 / 3
    assert math.isnan(M.dice(np.zeros(4, bool), np.zeros(4, bool)))
    assert M.dice(np.array([0.2, 0.6, 0.5, 0.1]), g) == pytest.approx(0.5)  # p >= 0.5 -> [0,1,1,0]
    assert M.soft_dice(np.array([0.5, 1.0, 0.0]), np.array([1, 1, 0])) == pytest.approx(3 / 3.5)
    with pytest.raises(ValueError, match="shape"):
        M.dice(p, g[:3])


def test_segmentation_summary_averages_over_images_with_the_class():
    preds = [np.array([1, 1, 0, 0], bool), np.array([1, 1, 1, 0], bool), np.array([1, 1, 0, 0], bool)]
    truths = [np.array([1, 0, 1, 0], bool), np.zeros(4, bool), np.array([1, 1, 0, 0], bool)]
    s = M.segmentation_summary(preds, truths)
    assert s.n_images == 2 and s.n_negative_images == 1
    assert s.mean_dice == pytest.approx(0.75)  # (0.5 + 1) / 2
    assert s.mean_iou == pytest.approx((1 / 3 + 1) / 2)
    assert s.pooled_dice == pytest.approx(6 / 11)  # 2*(1+0+2) / ((2+2) + (3+0) + (2+2))
    assert s.false_positive_area_px == 3


def test_average_precision_and_roc_auc():
    scores, labels = [0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]
    # P@R: 1@0.5, 1/2@0.5, 2/3@1, 2/4@1 -> 0.5*1 + 0.5*2/3
    assert M.average_precision(scores, labels) == pytest.approx(0.5 + 1 / 3)
    assert M.pr_auc(scores, labels) == M.average_precision(scores, labels)
    # pairs (pos > neg): 0.9>0.8, 0.9>0.6, 0.7>0.6 -> 3 of 4
    assert M.roc_auc(scores, labels) == pytest.approx(0.75)
    assert M.roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    # ties enter together: thresholds 0.5 (tp1 fp1) and 0.2 (tp2 fp1)
    assert M.average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    fpr, tpr, thr = M.roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
    assert math.isnan(M.roc_auc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="labels"):
        M.roc_auc([0.1, 0.2], [1])


def test_pixel_average_precision_pools_pixels():
    probs = [np.array([[0.95, 0.15], [0.55, 0.05]]), np.array([[0.55, 0.95]])]
    truths = [np.array([[1, 0], [0, 0]], bool), np.array([[1, 0]], bool)]
    # pooled: 0.95 -> tp1 fp1 (P 0.5, R 0.5); 0.55 -> tp2 fp2 (P 0.5, R 1) -> AP 0.5
    assert M.pixel_average_precision(probs, truths) == pytest.approx(0.5)
    flat_s = np.concatenate([p.ravel() for p in probs])
    flat_y = np.concatenate([t.ravel() for t in truths])
    assert M.pixel_average_precision(probs, truths) == pytest.approx(M.average_precision(flat_s, flat_y))


def test_bootstrap_ci_and_breast_level():
    ci = M.bootstrap_ci(M.roc_auc, [0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0], n=200)
    assert (ci.value, ci.low, ci.high) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = y * 0.5 + rng.random(200)
    a = M.bootstrap_ci(M.roc_auc, s, y, n=300, seed=1)
    b = M.bootstrap_ci(M.roc_auc, s, y, n=300, seed=1)
    assert a.low < a.value < a.high and (a.low, a.high) == (b.low, b.high) and a.replicates == 300
    keys = [("s1", "L"), ("s1", "L"), ("s1", "R"), ("s1", "R")]
    names, bs, bl = M.breast_level(keys, [0.2, 0.4, 0.9, 0.7], [0, 0, 1, 0])
    assert names == [("s1", "L"), ("s1", "R")]
    assert bs == pytest.approx([0.3, 0.8]) and list(bl) == [False, True]


def test_froc_hand_computed():
    truth1 = np.zeros((20, 20), bool)
    truth1[2:6, 2:6] = True  # region A
    truth1[12:16, 12:16] = True  # region B
    truth2 = np.zeros((20, 20), bool)  # normal image
    dets1 = [(0.9, 3, 3), (0.8, 4, 4), (0.7, 10, 2), (0.6, 13, 13)]  # A hit, A again (ignored), FP, B hit
    dets2 = [(0.95, 5, 5), (0.5, 18, 18)]  # two FPs
    r = M.froc([dets1, dets2], [truth1, truth2])
    # events by score: .95 FP, .9 TP, .7 FP, .6 TP, .5 FP over 2 images and 2 regions
    assert r.n_regions == 2 and r.n_images == 2
    assert list(r.fp_per_image) == [0, 0.5, 0.5, 1.0, 1.0, 1.5]
    assert list(r.sensitivity) == [0, 0, 0.5, 0.5, 1.0, 1.0]
    assert r.sensitivity_at == {0.25: 0.0, 0.5: 0.5, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0}
    assert r.mean_sensitivity == pytest.approx(0.7)


def test_detections_from_map():
    prob = np.zeros((10, 10), np.float32)
    prob[1:3, 1:3] = 0.6
    prob[2, 2] = 0.9
    prob[7:9, 6:9] = 0.7
    dets = sorted(M.detections_from_map(prob, 0.5), key=lambda d: -d[0])
    assert len(dets) == 2
    assert dets[0] == pytest.approx((0.9, 1.5, 1.5))
    assert dets[1] == pytest.approx((0.7, 7.5, 7.0))


def test_evaluate_report_on_phantom_truth(tmp_path):
    """Perfect maps give Dice 1; scores equal to the labels give AUC 1; the report and plots exist."""
    import json

    from dicom_ai.data.datasets import Sample
    from dicom_ai.data.evaluate import Prediction, evaluate, write_report
    from dicom_ai.data.phantom import generate_study
    from dicom_ai.imaging import read_mammogram

    pairs = []
    for seed in (6, 1, 3):  # 6 and 1 hold malignant and benign findings, 3 is normal
        st = generate_study(seed, shape=(104, 80), normal=seed == 3)
        for im in st.images:
            sample = Sample(read_mammogram(im.dataset), im.masks, im.labels, im.view, im.laterality, f"s{seed}")
            m = im.masks
            maps = {"malignant_lesion": (m["mass_malignant"] | m["cluster_malignant"]).astype(np.float32),
                    "benign_lesion": np.zeros(im.breast_mask.shape, np.float32),
                    "calcification_cluster": (m["cluster_benign"] | m["cluster_malignant"]) * np.float32(0.9)}
            scores = {"malignant": float(im.labels["malignant"]), "benign": 0.5}
            pairs.append((sample, Prediction(maps, scores)))
    ev = evaluate(iter(pairs), bootstrap=50, progress=False, examples=2)
    assert ev.n_images == 12
    mal = ev.segmentation["malignant_lesion"]
    assert mal.n_images > 0 and mal.mean_dice == 1.0 and mal.pooled_dice == 1.0 and ev.pixel_ap["malignant_lesion"] == 1.0
    assert ev.segmentation["benign_lesion"].mean_dice == 0.0 or ev.segmentation["benign_lesion"].n_images == 0
    assert ev.classification["malignant (image)"]["ROC AUC"].value == 1.0
    assert ev.classification["benign (image)"]["ROC AUC"].value == 0.5
    if ev.froc.n_regions:
        assert ev.froc.sensitivity_at[0.25] == 1.0
    path = write_report(ev, tmp_path / "report")
    text = path.read_text()
    assert "| malignant_lesion |" in text and "ROC AUC" in text
    for name in ("roc.png", "dice.png", "overlays.png", "froc.png", "metrics.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["n_images"] == 12


def test_lesion_froc_hand_computed():
    from dicom_ai.data.metrics import LESION_FROC_RATES, lesion_froc, marks_outside

    shape = (10, 10)
    a = np.zeros(shape, bool); a[0:4, 0:4] = True  # lesion A (image 0)
    b = np.zeros(shape, bool); b[2:6, 2:6] = True  # lesion B overlaps A
    other = np.zeros(shape, bool); other[8:10, 8:10] = True  # a lesion of another type
    c = np.zeros(shape, bool); c[5:8, 5:8] = True  # lesion C (image 1)
    marks = [
        [(0.9, 3, 3),   # in A and B: hits A (first not-yet-hit)
         (0.8, 3, 3),   # in A and B, A hit: hits B
         (0.7, 1, 1),   # in A only, already hit: ignored
         (0.6, 9, 9),   # on the other-type lesion: ignored
         (0.5, 9, 0)],  # false mark
        [(0.4, 6, 6),   # hits C
         (0.3, 0, 9),   # false mark
         (0.2, 6.4, 6.6)],  # C again (rounded to 6, 7): ignored
        [],             # a normal image counts in the denominator
    ]
    lesions = [[a, b], [c], []]
    f = lesion_froc(marks, lesions, ignore=[[other], [], []])
    assert f.n_regions == 3 and f.n_images == 3
    # Events by score: TP .9, TP .8, FP .5, TP .4, FP .3 -> (FP/image, sens) points:
    # (0, 1/3), (0, 2/3), (1/3, 2/3), (1/3, 1), (2/3, 1)
    np.testing.assert_allclose(f.fp_per_image, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_allclose(f.sensitivity, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert tuple(f.sensitivity_at) == LESION_FROC_RATES
    assert f.sensitivity_at[0.125] == pytest.approx(2 / 3) and f.sensitivity_at[0.5] == 1.0
    # Without the ignore region the mark at (9, 9) is a third false mark.
    g = lesion_froc(marks, lesions)
    assert g.fp_per_image[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lesion_froc(marks, lesions[:2])
    region = np.zeros(shape, bool); region[:, :5] = True
    assert marks_outside(marks[0], region) == 1 and marks_outside([(1.0, -1, 2)], region) == 1
