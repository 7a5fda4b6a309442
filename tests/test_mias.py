"""The mini-MIAS adapter and the lesion-level evaluation on a tiny fixture in the MIAS layout.

The fixture is generated here (random-texture PGMs, an Info.txt, one crop/mask pair); it is
not MIAS data.
"""

import numpy as np
import pytest
from PIL import Image

from dicom_ai.core.findings import ImageScore, ModelIdentity, ModelOutput, ProbabilityMap
from dicom_ai.data.datasets import (MIAS_LICENCE_NOTE, DatasetError, MIASDataset, locate_crop, mias_folds,
                                    open_dataset, read_mias_info)
from dicom_ai.data.evaluate import ModelMarks, evaluate_lesions, predict_marks, write_lesion_report
from dicom_ai.networks import Pipeline

N = 64  # fixture images are N x N (MIAS: 1024 x 1024)

INFO = """header lines are ignored
mdb001 G CIRC B 20 10 5
mdb002 F NORM
mdb003 D CALC M 30 40 4
mdb003 D SPIC M 10 50 3
mdb004 F NORM
mdb005 F CALC M *NOTE 3*
mdb006 F NORM
mdb007 G CIRC B
mdb008 G NORM
"""


def _texture(seed: int) -> np.ndarray:
    """Random texture inside a half-disc breast at the chest-wall side (right for odd, i.e.
    right-breast, references, as MIAS), dark noise outside: the node's breast mask keeps the
    marks and lesions of the tests."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 10, size=(N, N), dtype=np.uint8)
    rr, cc = np.mgrid[0:N, 0:N]
    wall = N - 1 if seed % 2 else 0
    inside = (rr - N // 2) ** 2 + (cc - wall) ** 2 <= 60 ** 2
    image[inside] = rng.integers(30, 220, size=int(inside.sum()), dtype=np.uint8)
    return image


@pytest.fixture
def mias_root(tmp_path):
    rows = INFO.splitlines()
    for i in range(9, 21):  # women 5..10: normals
        rows.append(f"mdb{i:03d} F NORM")
    (tmp_path / "Info.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "Licence.txt").write_text("research purposes ONLY\n")
    for i in range(1, 21):
        Image.fromarray(_texture(i)).save(tmp_path / f"mdb{i:03d}.pgm")
    # One drawn mass mask for mdb001, as a crop of rows 48..59, columns 14..25.
    (tmp_path / "masks").mkdir()
    crop = _texture(1)[48:60, 14:26]
    drawn = np.zeros(crop.shape, dtype=bool)
    drawn[3:9, 4:9] = True  # rows 51..56, columns 18..22 of the full image
    Image.fromarray(crop).save(tmp_path / "masks" / "mdb001.bmp")
    Image.fromarray(drawn).save(tmp_path / "masks" / "mdb001_bin.bmp")
    return tmp_path


def _by_ref(data):
    return {rec.extra["reference"]: i for i, rec in enumerate(data.records)}


def test_info_rows(mias_root):
    rows = read_mias_info(mias_root / "Info.txt")
    assert len(rows) == 21
    assert rows[0].x == 20 and rows[0].y == 10 and rows[0].radius == 5
    assert [r.x for r in rows if r.reference == "mdb005"] == [None]
    (mias_root / "bad.txt").write_text("mdb001 G CIRC X 1 2 3\n")
    with pytest.raises(DatasetError, match="severity"):
        read_mias_info(mias_root / "bad.txt")


def test_circle_is_flipped_to_rows_and_drawn_mask_replaces_it(mias_root):
    data = open_dataset("mias", mias_root)
    assert len(data) == 20
    s = data[_by_ref(data)["mdb001"]]
    (lesion,) = s.lesions
    # y = 10 from the bottom of a 64-row image is row 53.
    assert lesion.centre_rc == (53.0, 20.0) and lesion.radius_px == 5
    assert lesion.outline == "mask" and lesion.kind == "mass" and lesion.severity == "benign"
    expected = np.zeros((N, N), dtype=bool)
    expected[51:57, 18:23] = True
    np.testing.assert_array_equal(lesion.mask, expected)
    np.testing.assert_array_equal(s.masks["mass_benign"], expected)
    assert s.laterality == "R" and s.image.faces_left and s.view == "MLO"
    assert s.image.spacing_mm == (0.2, 0.2)
    assert s.labels == {"benign": True, "malignant": False}
    assert s.study == "mias-woman-001"


def test_several_rows_norm_and_rows_without_location(mias_root):
    data = open_dataset("mias", mias_root)
    idx = _by_ref(data)
    s3 = data[idx["mdb003"]]
    assert [(l.kind, l.label, l.outline) for l in s3.lesions] == [
        ("calcification_cluster", "CALC", "circle"), ("mass", "SPIC", "circle")]
    calc, mass = s3.lesions
    assert calc.mask[N - 1 - 40, 30] and calc.mask[N - 1 - 40, 34] and not calc.mask[N - 1 - 40, 35]
    assert s3.masks["cluster_malignant"].sum() == calc.mask.sum()
    assert s3.masks["mass_malignant"][N - 1 - 50, 10]
    assert s3.labels["malignant"] and s3.laterality == "R"
    s2 = data[idx["mdb002"]]
    assert s2.lesions == [] and not any(s2.labels.values()) and s2.laterality == "L" and not s2.image.faces_left
    assert not any(m.any() for m in s2.masks.values())
    s5 = data[idx["mdb005"]]
    assert [(l.kind, l.mask) for l in s5.lesions] == [("calcification_cluster", None)] and s5.labels["malignant"]
    assert not any(m.any() for m in s5.masks.values())
    s7 = data[idx["mdb007"]]
    assert s7.lesions[0].mask is None and s7.labels["benign"]


def test_locate_crop_exact_near_exact_and_foreign():
    image = _texture(3)
    assert locate_crop(image, image[10:30, 5:17]) == (10, 5)
    noisy = image[10:30, 5:17].astype(int)
    noisy[::3, ::2] += 2  # re-quantised by a few grey levels: no exact match
    assert locate_crop(image, np.clip(noisy, 0, 255).astype(np.uint8)) == (10, 5)
    with pytest.raises(DatasetError, match="not a region"):
        locate_crop(image, _texture(4)[:20, :12])
    with pytest.raises(DatasetError, match="larger"):
        locate_crop(image[:10, :10], image)


def test_folds_are_patient_level_stratified_and_fixed(mias_root):
    data = MIASDataset(mias_root)
    refs = [rec.extra["reference"] for rec in data.records]
    folds = data.fold_of
    for w in range(1, 11):
        assert folds[f"mdb{2 * w - 1:03d}"] == folds[f"mdb{2 * w:03d}"]
    # Strata: malignant mass (woman 2), benign mass (woman 1), other abnormal (3, 4), normals.
    assert folds["mdb003"] == 0 and folds["mdb001"] == 1 and folds["mdb005"] == 2 and folds["mdb007"] == 3
    assert mias_folds(refs, data.rows) == folds
    test = MIASDataset(mias_root, folds=[1])
    train = MIASDataset(mias_root, folds=[0, 2, 3, 4])
    test_women = {r.study for r in test.records}
    assert test_women and not test_women & {r.study for r in train.records}
    assert len(test) + len(train) == 20
    with pytest.raises(DatasetError, match="fold 5"):
        MIASDataset(mias_root, folds=[5])


def test_licence_and_layout_errors(mias_root, tmp_path_factory):
    data = MIASDataset(mias_root)
    assert data.licence == MIAS_LICENCE_NOTE and "research" in data.licence
    assert "research purposes ONLY" in data.licence_text
    with pytest.raises(DatasetError, match="Info.txt"):
        MIASDataset(tmp_path_factory.mktemp("empty"))


class _SpotModel:
    """Marks a fixed spot on every image: row 53, column 20 (the mass of mdb001)."""

    identity = ModelIdentity("spot", "1")

    def __init__(self):
        self.calls = 0

    def predict(self, mammogram):
        self.calls += 1
        prob = np.zeros(mammogram.shape, dtype=np.float32)
        prob[52:55, 19:22] = 0.8
        return ModelOutput([ProbabilityMap("benign_lesion", prob, 0.5, self.identity)],
                           [ImageScore("malignant", 0.3, self.identity)])


def test_lesion_evaluation_on_fixture(mias_root, tmp_path):
    data = MIASDataset(mias_root)
    model = _SpotModel()
    pipeline = Pipeline([model])
    cache = tmp_path / "cache"
    pairs = list(predict_marks(data, pipeline, cache=cache))
    assert model.calls == 20
    list(predict_marks(data, pipeline, cache=cache))
    assert model.calls == 20  # second pass read the cache
    ev = evaluate_lesions(pairs, bootstrap=50, progress=False,
                          reference_mask=lambda s: np.ones(s.image.shape, dtype=bool))
    # 3 located lesions (mdb001 mass, mdb003 cluster + mass); 2 masses. The spot hits mdb001's
    # mass; on the 19 other images it is a false mark, except on mdb003 where it lands in no
    # lesion either (mass at row 13, column 10), so 19 false marks over 20 images.
    f = ev.froc["spot"]["mass"]
    assert f.n_regions == 2 and ev.n_lesions["all"] == 3
    assert f.sensitivity_at[1.0] == 0.5 and f.sensitivity_at[0.5] == 0.0
    assert ev.operating["spot"]["mass"] == {"sensitivity": 0.5, "false_marks_per_image": 0.95, "false_marks": 19}
    assert "calcification_cluster" not in ev.froc["spot"]
    assert ev.n_normal == 16
    assert ev.robustness["spot"]["false_marks_per_normal_image"] == 1.0
    assert ev.robustness["spot"]["marks_outside_breast"] == 0
    # Same score on every image: AUC 0.5. Dice: 9 predicted pixels, 30 drawn, 9 shared.
    assert ev.auc["spot"]["abnormal (image)"].value == 0.5
    assert ev.mass_dice["spot"]["mean"] == round(2 * 9 / (9 + 30), 4) and ev.mass_dice["spot"]["n_images"] == 1
    assert set(ev.froc) == {"spot", "union"}
    path = write_lesion_report(ev, tmp_path / "report")
    assert "spot" in path.read_text() and (tmp_path / "report" / "lesions.json").is_file()


def test_model_marks_round_trip(tmp_path):
    from dicom_ai.data.evaluate import Prediction

    prob = np.zeros((20, 30), dtype=np.float32)
    prob[2:4, 2:5] = 0.9
    prob[10, 20] = 0.2
    marks = ModelMarks.from_prediction(Prediction({"malignant_lesion": prob}, {"malignant": 0.4}, {"malignant_lesion": 0.5}))
    assert marks.candidates["malignant_lesion"].shape == (2, 4) and marks.operating["malignant_lesion"].shape == (1, 4)
    marks.save(tmp_path / "m.npz")
    back = ModelMarks.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(back.binary["malignant_lesion"], prob >= 0.5)
    np.testing.assert_allclose(back.operating["malignant_lesion"], [[0.9, 2.5, 3.0, 6.0]], rtol=1e-6)
    assert back.scores == {"malignant": 0.4} and back.peaks["malignant_lesion"] == pytest.approx(0.9)


def test_cli_evaluate_mias_fold(mias_root, tmp_path, capsys):
    from dicom_ai.cli import main

    out = tmp_path / "report"
    rc = main(["evaluate", "--dataset", "mias", "--root", str(mias_root), "--fold", "1", "--bundle", "dunet",
               "--out", str(out), "--bootstrap", "20", "--cache", str(tmp_path / "cache")])
    assert rc == 0
    text = (out / "lesions.md").read_text()
    assert "folds 1" in text and "research use only" in text and "| dunet |" in text
    assert main(["evaluate", "--format", "phantom", "--truth", str(mias_root), "--fold", "1", "--bundle", "dunet",
                 "--out", str(out)]) == 2
