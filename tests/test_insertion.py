"""Lesions inserted into (synthetic stand-ins for) real mammograms: source model, ground truth, determinism."""

import numpy as np
import pytest
from PIL import Image

from dicom_ai.core.errors import DatasetError
from dicom_ai.data.datasets import open_dataset
from dicom_ai.data.insertion import HybridDataset, InsertionConfig, estimate_source, gaussian_blur, insert_lesions
from dicom_ai.data.phantom import power_law_field
from dicom_ai.data.sample import MASK_KEYS, Sample
from dicom_ai.imaging import mammogram_from_array

ROWS, COLS, SPACING = 320, 240, 0.2


def _background(seed=0, blur=1.0, noise=0.02, bits=8, faces_left=False) -> np.ndarray:
    """A breast-like image: half ellipse at the chest wall, power-law texture, blurred noise, quantised."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:ROWS, 0:COLS]
    x = COLS - 1 - c if faces_left else c
    inside = ((r - ROWS / 2) / (0.46 * ROWS)) ** 2 + (x / (0.85 * COLS)) ** 2 < 1
    tex = power_law_field(rng, (ROWS, COLS), SPACING, 3.0)
    img = 0.45 + 0.08 * tex + rng.standard_normal((ROWS, COLS)).astype(np.float32) * noise
    img = gaussian_blur(img, blur)
    img = np.where(inside, np.clip(img, 0.05, 0.95), 0.0)
    q = 2 ** bits - 1
    return (np.round(img * q) / q).astype(np.float32)


def _sample(pixels, laterality="L", view="CC") -> Sample:
    image = mammogram_from_array(pixels, laterality, view, (SPACING, SPACING))
    masks = {k: np.zeros(pixels.shape, bool) for k in MASK_KEYS}
    return Sample(image, masks, {"benign": False, "malignant": False}, view, laterality, "woman-1", "test")


def test_source_model_recovers_blur_noise_and_grey_levels():
    src = estimate_source(_sample(_background(blur=1.0, noise=0.03)).image)
    assert abs(src.psf_sigma_px - 1.0) <= 0.3
    assert 0.02 <= src.noise_sigma <= 0.045
    assert abs(src.quantum - 1 / 255) < 1e-6 and src.levels is not None
    sharp = estimate_source(_sample(_background(blur=0.0, noise=0.03, bits=16)).image)
    assert sharp.psf_sigma_px <= 0.3
    assert 0.2 < src.tissue_range < 0.35 and src.spacing_mm == SPACING  # 3.3 sd of the 0.08 texture


def test_source_model_needs_a_breast():
    empty = np.zeros((ROWS, COLS), np.float32)
    empty[150:160, :20] = 0.5  # a sliver: no 6 mm patch fits
    with pytest.raises(DatasetError, match="breast interior"):
        estimate_source(_sample(empty).image)


def test_inserted_masses_have_exact_truth_and_stay_in_the_breast():
    bg = _sample(_background(seed=1))
    before = bg.image.pixels.copy()
    out = insert_lesions(bg, seed=(7, 1), masses=2, clusters=0, malignant=[True, False])
    assert np.array_equal(bg.image.pixels, before)  # the background is not modified
    inserted = [l for l in out.lesions if l.label.startswith("inserted")]
    assert [l.severity for l in inserted] == ["malignant", "benign"]
    assert out.labels == {"benign": True, "malignant": True}
    for lesion in inserted:
        assert lesion.kind == "mass" and lesion.mask.any() and lesion.outline == "mask"
        assert not (lesion.mask & ~bg.image.breast_mask).any()
        # The mass is brighter than the same pixels before (attenuation added, dense bright).
        assert out.image.pixels[lesion.mask].mean() > before[lesion.mask].mean() + 0.01
        assert out.masks[f"mass_{lesion.severity}"][lesion.mask].all()
    assert not (inserted[0].mask & inserted[1].mask).any()
    # Nothing changes far from the lesions, and every value is one the source uses.
    near = np.zeros_like(before, bool)
    for lesion in inserted:
        rr, cc = np.nonzero(lesion.mask)
        reach = int(3 * lesion.radius_px) + 10
        near[max(rr.min() - reach, 0):rr.max() + reach, max(cc.min() - reach, 0):cc.max() + reach] = True
    assert np.array_equal(out.image.pixels[~near], before[~near])
    assert np.isin(out.image.pixels, np.unique(before)).all()
    assert out.image.sop_instance_uid != bg.image.sop_instance_uid


def test_insertion_is_deterministic_per_seed():
    bg = _sample(_background(seed=2))
    a = insert_lesions(bg, seed=11, masses=1, clusters=1)
    b = insert_lesions(bg, seed=11, masses=1, clusters=1)
    c = insert_lesions(bg, seed=12, masses=1, clusters=1)
    assert np.array_equal(a.image.pixels, b.image.pixels)
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in MASK_KEYS)
    assert not np.array_equal(a.image.pixels, c.image.pixels)


def test_clusters_mark_each_speck_inside_the_cluster_region():
    bg = _sample(_background(seed=3, blur=0.5))
    out = insert_lesions(bg, seed=5, masses=0, clusters=2, malignant=True)
    clusters = [l for l in out.lesions if l.kind == "calcification_cluster"]
    assert len(clusters) == 2 and all(l.severity == "malignant" for l in clusters)
    specks = out.masks["calcification_malignant"]
    assert specks.any() and not (specks & ~out.masks["cluster_malignant"]).any()
    assert out.image.pixels[specks].mean() > bg.image.pixels[specks].mean()


def test_lesions_avoid_the_pectoral_muscle_and_annotated_lesions():
    bg = _sample(_background(seed=4), view="MLO")
    muscle = np.zeros((ROWS, COLS), bool)
    muscle[:ROWS // 2, :COLS // 2] = True
    bg.image._pectoral_mask = muscle & bg.image.breast_mask
    annotated = np.zeros((ROWS, COLS), bool)
    annotated[ROWS // 2:, :] = True
    bg.masks["mass_benign"] = annotated & bg.image.breast_mask
    for seed in range(4):
        out = insert_lesions(bg, seed=seed, masses=1, clusters=1, config=InsertionConfig(mass_radius_mm=(2.0, 3.0)))
        for lesion in out.lesions:
            if lesion.label.startswith("inserted"):
                assert not (lesion.mask & muscle).any()
                assert not (lesion.mask & annotated).any()


def test_no_room_skips_the_lesion():
    bg = _sample(_background(seed=5))
    out = insert_lesions(bg, seed=1, masses=1, config=InsertionConfig(mass_radius_mm=(60.0, 61.0)))
    assert out.lesions == [] and out.labels == {"benign": False, "malignant": False}
    with pytest.raises(DatasetError, match="severities"):
        insert_lesions(bg, seed=1, masses=2, malignant=[True])


def _write_real_pngs(folder):
    folder.mkdir()
    for n, name in enumerate(("1_L_CC", "1_R_CC", "2_L_CC", "3_R_CC")):
        img = _background(seed=10 + n, bits=16, faces_left=name[2] == "R")
        Image.fromarray((img * 65535).round().astype(np.uint16)).save(folder / f"{name}.png")


def test_hybrid_dataset_from_any_adapter(tmp_path):
    _write_real_pngs(tmp_path / "real")
    data = open_dataset("hybrid:real-png-normals", tmp_path / "real", seed=3, copies=3,
                        lesion_counts={0: 1, 1: 2}, spacing_mm=(SPACING, SPACING))
    assert isinstance(data, HybridDataset)
    assert len(data) == 9  # three normal backgrounds (1_R_CC holds a known finding) x three copies
    assert sorted(set(data.patients())) == ["exam-1", "exam-2", "exam-3"]
    assert [s["name"] for s in data.sources] == ["real-png", "dicom_ai-phantom-lesions"]
    again = open_dataset("hybrid:real-png-normals", tmp_path / "real", seed=3, copies=3,
                         lesion_counts={0: 1, 1: 2}, spacing_mm=(SPACING, SPACING))
    seen = 0
    for i in range(len(data)):
        s = data[i]
        assert s.study == data.patient(i)
        assert s.labels == data.records[i].labels  # the index promises what the sample holds
        assert np.array_equal(s.image.pixels, again[i].image.pixels)
        seen += sum(l.label.startswith("inserted") for l in s.lesions)
    assert seen >= 3
    everything = open_dataset("hybrid:real-png", tmp_path / "real", spacing_mm=(SPACING, SPACING))
    assert len(everything) == 4
    with pytest.raises(DatasetError, match="kinds"):
        HybridDataset(everything.background, kinds={"tumour": 1.0})


def test_given_centre_size_and_shape():
    bg = _sample(_background(seed=6))
    cfg = InsertionConfig(mass_radius_mm=(4.0, 4.0), mass_shapes=("round",))
    out = insert_lesions(bg, seed=2, masses=1, config=cfg, at=[(160.0, 60.0)])
    lesion = out.lesions[0]
    assert lesion.label.startswith("inserted round") and lesion.radius_px == 4.0 / SPACING
    assert abs(lesion.centre_rc[0] - 160) < 3 and abs(lesion.centre_rc[1] - 60) < 3
    # Equivalent radius of the round mask close to the asked 20 pixels.
    assert abs(np.sqrt(lesion.mask.sum() / np.pi) - 20) < 3
    assert insert_lesions(bg, seed=2, masses=1, config=cfg, at=[(5.0, 235.0)]).lesions == []  # outside the breast
    with pytest.raises(DatasetError, match="unknown mass shape"):
        insert_lesions(bg, seed=2, masses=1, config=InsertionConfig(mass_shapes=("star",)))


def test_grain_follows_the_level_like_film():
    """Noise that falls with brightness (film) is measured, and a bright mass gets the smoother grain."""
    rng = np.random.default_rng(8)
    r, c = np.mgrid[0:ROWS, 0:COLS]
    inside = ((r - ROWS / 2) / (0.46 * ROWS)) ** 2 + (c / (0.85 * COLS)) ** 2 < 1
    level = 0.3 + 0.4 * c / COLS + 0.02 * power_law_field(rng, (ROWS, COLS), SPACING, 3.0)
    grain = rng.standard_normal((ROWS, COLS)).astype(np.float32) * (0.03 * (1.0 - level))
    img = np.where(inside, np.clip(level + grain, 0.05, 0.95), 0.0).astype(np.float32)
    bg = _sample(np.round(img * 65535) / 65535)
    src = estimate_source(bg.image)
    levels, sds = src.noise_curve
    assert sds[0] > 1.5 * sds[-1] and levels[0] < levels[-1]
    cfg = InsertionConfig(mass_radius_mm=(5.0, 5.0), mass_contrast=(0.6, 0.6), margin_blur=(0.0, 0.0),
                          mass_texture=(0.0, 0.0), mass_shapes=("round",))
    out = insert_lesions(bg, seed=3, masses=1, config=cfg, source=src, at=[(160.0, 60.0)])
    core = out.lesions[0].mask.copy()
    core[:, :] &= (r - 160) ** 2 + (c - 60) ** 2 < 15 ** 2
    fine = lambda a: a - gaussian_blur(a, 1.0)  # noqa: E731
    assert fine(out.image.pixels)[core].std() < 0.9 * fine(bg.image.pixels)[core].std()  # 1.0 without the curve


def test_bright_lesions_follow_the_sources_shoulder_not_a_clip():
    bg = _sample(_background(seed=9))
    src = estimate_source(bg.image)
    knee, top = src.shoulder
    assert knee < top <= float(bg.image.pixels[bg.image.breast_mask].max())
    cfg = InsertionConfig(mass_radius_mm=(6.0, 6.0), mass_contrast=(3.0, 3.0), dense_reduction=0.0)
    out = insert_lesions(bg, seed=4, masses=1, config=cfg, source=src)
    lesion = out.lesions[0]
    assert out.image.pixels[lesion.mask].max() <= top + 1e-6  # approaches the source's top, never 1.0
    assert out.image.pixels[lesion.mask].mean() > knee
