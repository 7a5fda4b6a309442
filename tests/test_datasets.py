"""Each dataset adapter on a tiny fixture written in its published layout."""

import csv
import plistlib

import numpy as np
import pytest

from dicom_ai.data.datasets import MASK_KEYS, DatasetError, open_dataset
from dicom_ai.data.phantom import generate_study
from dicom_ai.data.mg import mg_dataset
from dicom_ai.data.phantom_folder import write_study

ROWS, COLS = 64, 48


def _breast(faces_left: bool) -> np.ndarray:
    r, c = np.mgrid[0:ROWS, 0:COLS]
    x = COLS - 1 - c if faces_left else c
    img = np.where((r - ROWS / 2) ** 2 + (1.3 * x) ** 2 < (0.45 * ROWS) ** 2, 2500, 40)
    return img.astype(np.uint16)


def _write_mg(path, laterality="L", view="CC", seed=1, orientation=True):
    ds = mg_dataset(_breast(laterality == "R"), seed=seed, laterality=laterality, view=view, spacing_mm=0.1)
    if not orientation:  # CBIS-DDSM style: a bare header
        for kw in ("PatientOrientation", "ImageLaterality", "ViewCodeSequence", "ViewPosition"):
            delattr(ds, kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_phantom_folder(tmp_path):
    study = generate_study(2, shape=(96, 72), normal=False)
    write_study(study, tmp_path / "s2")
    data = open_dataset("phantom", tmp_path)
    assert len(data) == 4
    for sample, im in zip(data, study.images):
        assert (sample.laterality, sample.view) == (im.laterality, im.view)
        assert sample.image.faces_left == (im.laterality == "R")
        assert sample.labels == im.labels
        for k in MASK_KEYS:
            assert np.array_equal(sample.masks[k], im.masks[k])


def test_inbreast_layout(tmp_path):
    _write_mg(tmp_path / "AllDICOMs" / "20586908_6c613a14b80a8591_MG_L_CC_ANON.dcm", "L", "CC", 1)
    _write_mg(tmp_path / "AllDICOMs" / "20586934_6c613a14b80a8591_MG_R_ML_ANON.dcm", "R", "MLO", 2)
    with (tmp_path / "INbreast.csv").open("w") as fh:
        fh.write("Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads\n")
        fh.write("removed;removed;L;CC;201001;20586908;2;5\n")
        fh.write("removed;removed;R;MLO;201001;20586934;2;1\n")
    rois = [
        {"Name": "Mass", "NumberOfPoints": 4, "Point_px": ["(10, 20)", "(20, 20)", "(20, 30)", "(10, 30)"]},
        {"Name": "Calcification", "NumberOfPoints": 1, "Point_px": ["(15.2, 40.7)"]},
        {"Name": "Cluster", "NumberOfPoints": 3, "Point_px": ["(12, 38)", "(20, 38)", "(16, 45)"]},
    ]
    (tmp_path / "AllXML").mkdir()
    (tmp_path / "AllXML" / "20586908.xml").write_bytes(plistlib.dumps(
        {"Images": [{"ImageIndex": 0, "NumberOfROIs": 3, "ROIs": rois}]}))
    data = open_dataset("inbreast", tmp_path)
    assert len(data) == 2
    s = data[0]
    assert (s.laterality, s.view, s.labels) == ("L", "CC", {"benign": False, "malignant": True})
    mass = s.masks["mass_malignant"]
    assert mass[25, 15] and not mass[35, 15] and 100 <= mass.sum() <= 121  # x 10-20, y 20-30
    assert s.masks["calcification_malignant"][41, 15] and s.masks["calcification_malignant"].sum() == 1
    assert s.masks["cluster_malignant"][40, 16]
    assert not s.masks["mass_benign"].any()
    r = data[1]
    assert (r.view, r.labels) == ("MLO", {"benign": False, "malignant": False})
    assert r.image.faces_left and not any(m.any() for m in r.masks.values())


def test_cbis_ddsm_layout(tmp_path):
    root = tmp_path / "CBIS-DDSM"
    _write_mg(root / "Mass-Training_P_00001_LEFT_CC" / "1.3.6.1" / "1.3.6.2" / "1-1.dcm", "L", "CC", 3, orientation=False)
    roi = mg_dataset(np.zeros((ROWS, COLS), np.uint16), seed=4, laterality="L", view="CC", spacing_mm=0.1)
    arr = np.zeros((ROWS, COLS), np.uint16)
    arr[20:30, 10:18] = 255
    roi.PixelData = arr.tobytes()
    (root / "Mass-Training_P_00001_LEFT_CC_1" / "1.3.6.3" / "1.3.6.4").mkdir(parents=True)
    roi.save_as(root / "Mass-Training_P_00001_LEFT_CC_1" / "1.3.6.3" / "1.3.6.4" / "1-2.dcm", enforce_file_format=True)
    crop = mg_dataset(np.full((10, 8), 900, np.uint16), seed=5, laterality="L", view="CC", spacing_mm=0.1)
    crop.save_as(root / "Mass-Training_P_00001_LEFT_CC_1" / "1.3.6.3" / "1.3.6.4" / "1-1.dcm", enforce_file_format=True)
    with (root / "mass_case_description_train_set.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
                    "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
                    "image file path", "cropped image file path", "ROI mask file path"])
        w.writerow(["P_00001", "3", "LEFT", "CC", "1", "mass", "IRREGULAR", "SPICULATED", "4", "MALIGNANT", "5",
                    "Mass-Training_P_00001_LEFT_CC/1.3.6.1/1.3.6.2/000000.dcm",
                    "Mass-Training_P_00001_LEFT_CC_1/1.3.6.3/1.3.6.4/000000.dcm",
                    "Mass-Training_P_00001_LEFT_CC_1/1.3.6.3/1.3.6.4/000001.dcm\n"])
    data = open_dataset("cbis-ddsm", root)
    assert len(data) == 1
    s = data[0]
    assert (s.laterality, s.view, s.labels) == ("L", "CC", {"benign": False, "malignant": True})
    assert s.masks["mass_malignant"].sum() == 80 and s.masks["mass_malignant"][25, 12]
    assert not s.image.faces_left  # decided from the content: chest wall at column 0


def test_vindr_layout(tmp_path):
    _write_mg(tmp_path / "images" / "st1" / "img1.dicom", "R", "CC", 6)
    _write_mg(tmp_path / "images" / "st1" / "img2.dicom", "L", "MLO", 7)
    with (tmp_path / "breast-level_annotations.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                    "breast_birads", "breast_density", "split"])
        w.writerow(["st1", "se1", "img1", "R", "CC", ROWS, COLS, "BI-RADS 4", "DENSITY C", "training"])
        w.writerow(["st1", "se1", "img2", "L", "MLO", ROWS, COLS, "BI-RADS 1", "DENSITY C", "test"])
    with (tmp_path / "finding_annotations.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                    "breast_birads", "breast_density", "finding_categories", "finding_birads",
                    "xmin", "ymin", "xmax", "ymax", "split"])
        w.writerow(["st1", "se1", "img1", "R", "CC", ROWS, COLS, "BI-RADS 4", "DENSITY C", "['Mass']",
                    "BI-RADS 4", 30.0, 10.0, 40.0, 20.0, "training"])
        w.writerow(["st1", "se1", "img1", "R", "CC", ROWS, COLS, "BI-RADS 4", "DENSITY C",
                    "['Suspicious Calcification']", "BI-RADS 3", 5.5, 40.2, 9.5, 44.0, "training"])  # rows 40-43, cols 5-9
        w.writerow(["st1", "se1", "img2", "L", "MLO", ROWS, COLS, "BI-RADS 1", "DENSITY C", "['No Finding']",
                    "", "", "", "", "", "test"])
    data = open_dataset("vindr", tmp_path)
    assert len(data) == 2
    s = data[0]
    assert (s.laterality, s.view, s.labels) == ("R", "CC", {"benign": False, "malignant": True})
    assert s.masks["mass_malignant"].sum() == 100 and s.masks["mass_malignant"][10, 30]
    assert s.masks["cluster_benign"].sum() == 4 * 5 and s.masks["cluster_benign"][40, 5]
    assert s.image.faces_left
    assert len(open_dataset("vindr", tmp_path, split="test")) == 1


def test_bad_layout_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="INbreast.csv"):
        open_dataset("inbreast", tmp_path)
    with pytest.raises(DatasetError, match="unknown data set format"):
        open_dataset("ddsm-old", tmp_path)


def test_mias_is_registered(tmp_path):
    from dicom_ai.data.datasets import FORMATS, MIASDataset

    assert "mias" in FORMATS
    with pytest.raises(DatasetError, match="mini-MIAS"):
        open_dataset("mias", tmp_path)
    (tmp_path / "Info.txt").write_text("mdb001 G NORM\n")
    with pytest.raises(DatasetError, match="no mdbNNN.pgm"):
        MIASDataset(tmp_path)


# --------------------------------------------------------------------------- small public sets


def _png(path, array, mode=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def _breast8(faces_left=False) -> np.ndarray:
    return (_breast(faces_left) // 10).astype(np.uint8)


def test_patient_folds_keep_women_together_and_are_stable():
    from dicom_ai.data.datasets import patient_folds

    patients = ["P1", "P2", "P1", "P3", "P4", "P2", "P5", "P6"]
    folds = patient_folds(patients, k=3)
    assert len(folds) == len(patients) and set(folds) <= {0, 1, 2}
    for p in set(patients):
        assert len({f for q, f in zip(patients, folds) if q == p}) == 1
    assert folds == patient_folds(patients, k=3)
    assert patient_folds(list(reversed(patients)), k=3) == list(reversed(folds))  # order of files does not matter
    with pytest.raises(DatasetError, match="k >= 2"):
        patient_folds(patients, k=1)


def test_cbis_squashed_layout(tmp_path):
    d = tmp_path / "sample" / "P_00007"
    _png(d / "Mass-Training_P_00007_RIGHT_MLO_FULL.png", _breast8(True))
    mask = np.zeros((ROWS, COLS), np.uint8)
    mask[30:36, 20:25] = 2
    _png(d / "Mass-Training_P_00007_RIGHT_MLO_MASK.png", mask)
    with pytest.raises(DatasetError, match="pathology of P_00007 unknown"):
        open_dataset("cbis-ddsm-squashed", tmp_path)
    data = open_dataset("cbis-ddsm-squashed", tmp_path, pathology={"P_00007": "benign"})
    s = data[0]
    assert (s.laterality, s.view, s.study, s.labels) == ("R", "MLO", "P_00007", {"benign": True, "malignant": False})
    assert s.masks["mass_benign"].sum() == 30 and not s.masks["mass_malignant"].any()
    assert len(s.lesions) == 1 and s.lesions[0].centre_rc == (32.5, 22.0)
    assert data.patients() == ["P_00007"] and "CC BY 3.0" in data.licence
    assert data.sources[0]["name"] == "cbis-ddsm-squashed" and data.sources[0]["images"] == 1


def test_inbreast_crops_layout(tmp_path):
    for split, ids in (("train", ["20586934", "20586960"]), ("test", ["51049053"])):
        for i in ids:
            crop = np.full((32, 32, 3), 90, np.uint8)
            _png(tmp_path / f"{split}_data_in" / f"{i}.png", crop)
            m = np.zeros((32, 32, 3), np.uint8)
            m[8:16, 8:12] = 250
            _png(tmp_path / f"{split}_data_out" / f"{i}.png", m)
    data = open_dataset("inbreast-crops", tmp_path)
    assert len(data) == 3
    # Consecutive ids of one exam share a patient group; a split never separates them.
    assert data.patients() == ["inbreast-exam-205869", "inbreast-exam-205869", "inbreast-exam-510490"]
    s = data[2]
    assert s.masks["mass_malignant"].sum() == 32 and s.labels["malignant"]
    assert open_dataset("inbreast-crops", tmp_path, severity="benign")[0].masks["mass_benign"].sum() == 32
    (tmp_path / "test_data_out" / "51049053.png").unlink()
    with pytest.raises(DatasetError, match="no mask"):
        open_dataset("inbreast-crops", tmp_path)


def test_cbis_cases_layout(tmp_path):
    for case, pid in (("sfm-benign-0", "P_00173"), ("sfm-malign-0", "P_00820")):
        for n, (side, view) in enumerate((("LEFT", "CC"), ("RIGHT", "MLO"))):
            path = tmp_path / case / f"1-{n}.dcm"
            ds = _write_mg(path, side[0], view, seed=10 + n, orientation=False)
            ds.PatientID = f"Mass-Test_{pid}_{side}_{view}"
            ds.save_as(path, enforce_file_format=True)
    data = open_dataset("cbis-ddsm-cases", tmp_path)
    assert len(data) == 4 and sorted(set(data.patients())) == ["P_00173", "P_00820"]
    s = data[3]
    assert (s.laterality, s.view, s.labels) == ("R", "MLO", {"benign": False, "malignant": True})
    assert s.image.spacing_mm == (0.05, 0.05) and s.image.faces_left
    assert s.lesions[0].kind == "mass" and s.lesions[0].mask is None and not any(m.any() for m in s.masks.values())


def test_cesm_thumbnails_and_real_png_layouts(tmp_path):
    cesm = tmp_path / "cesm" / "finalProject"
    _png(cesm / "Normal" / "P4_L_CM_MLO .png", np.stack([_breast8()] * 3, -1))  # a published name with a space
    _png(cesm / "Malignant" / "P4_R_CM_CC.png", np.stack([_breast8(True)] * 3, -1))
    (cesm / "Image_labels.csv").write_text("Image_name,PathologyClassification,CategoryCode\n"
                                           "P4_L_CM_MLO,Normal,2\nP4_R_CM_CC,Malignant,1\n")
    data = open_dataset("cesm", tmp_path / "cesm")
    assert len(data) == 2 and data.patients() == ["P4", "P4"]
    assert [d.labels["malignant"] for d in data] == [True, False]
    assert data[0].image.faces_left and "CC BY 4.0" in data.licence

    _png(tmp_path / "thumbs" / "image0.png", np.stack([_breast8(True)] * 4, -1))
    _png(tmp_path / "thumbs" / "image1.png", np.stack([_breast8(False)] * 4, -1))
    thumbs = open_dataset("inbreast-thumbnails", tmp_path / "thumbs")
    assert thumbs.patients() == ["inbreast-thumb-000", "inbreast-thumb-001"]
    assert [t.laterality for t in thumbs] == ["R", "L"]  # from the content, by convention

    real = tmp_path / "real"
    _png(real / "1_R_CC.png", _breast(True).astype(np.uint16) * 16)
    _png(real / "1_L_CC.png", _breast(False).astype(np.uint16) * 16)
    data = open_dataset("real-png", real)
    assert data.patients() == ["exam-1", "exam-1"]
    by_name = {s.laterality: s for s in data}
    assert by_name["R"].labels["benign"] and not by_name["L"].labels["benign"]
    assert abs(float(by_name["L"].image.pixels.max()) - 2500 * 16 / 65535) < 1e-4
