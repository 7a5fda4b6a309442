"""Phantom DICOM files: dciodvfy-clean in every variant, lossless encodings decode back exactly."""

import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_ai.data.phantom import generate_study
from dicom_ai.data.mg import MG_FOR_PRESENTATION, MG_FOR_PROCESSING
from dicom_ai.data.phantom_folder import write_study
from dicom_ai.imaging import read_mammogram
from conformance.validators import dciodvfy

SHAPE = (160, 128)


@pytest.mark.parametrize("presentation,photometric,bits", [
    ("FOR PRESENTATION", "MONOCHROME2", 12),
    ("FOR PRESENTATION", "MONOCHROME1", 14),
    ("FOR PROCESSING", "MONOCHROME2", 14),
    ("FOR PROCESSING", "MONOCHROME1", 12),
])
def test_variants_validate_and_read_back(tmp_path, presentation, photometric, bits):
    st = generate_study(7, shape=SHAPE, photometric=photometric, presentation=presentation, bits_stored=bits)
    write_study(st, tmp_path)
    for name in ("L_CC.dcm", "R_MLO.dcm"):
        report = dciodvfy(tmp_path / name)
        assert report.ok, report.output
        ds = pydicom.dcmread(tmp_path / name)
        assert ds.SOPClassUID == (MG_FOR_PRESENTATION if presentation == "FOR PRESENTATION" else MG_FOR_PROCESSING)
        assert ds.PresentationIntentType == presentation and ds.PhotometricInterpretation == photometric
        assert ds.BitsStored == bits and int(ds.pixel_array.max()) < 2**bits
        assert float(ds.ImagerPixelSpacing[0]) == pytest.approx(0.07 * 3328 / 160, rel=1e-4)
    # Whatever the photometric sense, the preprocessed breast is brighter than the background.
    im = st.image("L", "CC")
    m = read_mammogram(im.dataset)
    assert m.pixels[im.breast_mask].mean() > m.pixels[~im.breast_mask].mean() + 0.1


@pytest.mark.parametrize("syntax,uid", [("jpeg2000", "1.2.840.10008.1.2.4.90"),
                                        ("jpegls", "1.2.840.10008.1.2.4.80"),
                                        ("rle", "1.2.840.10008.1.2.5")])
def test_lossless_encodings_decode_exactly(tmp_path, syntax, uid):
    st = generate_study(8, shape=SHAPE, bits_stored=12)
    manifest = write_study(st, tmp_path, transfer_syntax=syntax)
    ds = pydicom.dcmread(tmp_path / "R_CC.dcm")
    assert ds.file_meta.TransferSyntaxUID == uid
    assert np.array_equal(ds.pixel_array, st.image("R", "CC").dataset.pixel_array)
    report = dciodvfy(tmp_path / "R_CC.dcm")
    assert report.ok, report.output
    assert json.loads(manifest.read_text())["transfer_syntax"] == uid


def test_manifest_and_mask_pngs(tmp_path):
    st = generate_study(9, shape=SHAPE, normal=False)
    meta = json.loads(write_study(st, tmp_path).read_text())
    assert meta["format"] == "dicom_ai-phantom/1" and meta["seed"] == 9
    assert meta["breast_labels"] == st.breast_labels
    for entry, im in zip(meta["images"], st.images):
        assert entry["file"] == f"{im.laterality}_{im.view}.dcm"
        assert entry["faces_left"] == (im.laterality == "R")
        for key, rel in entry["masks"].items():
            png = np.asarray(Image.open(tmp_path / rel)) > 127
            truth = im.breast_mask if key == "breast" else im.masks[key]
            assert np.array_equal(png, truth), key
    # No identifying data of a real patient: the identifiers say what they are.
    ds = pydicom.dcmread(tmp_path / "L_CC.dcm")
    assert str(ds.PatientName).startswith("PHANTOM^")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="density"):
        generate_study(1, shape=SHAPE, density="e")
    with pytest.raises(ValueError, match="photometric"):
        generate_study(1, shape=SHAPE, photometric="RGB")
    with pytest.raises(ValueError, match="presentation intent"):
        generate_study(1, shape=SHAPE, presentation="FOR VIEWING")


def test_cli_phantom_and_preview(tmp_path):
    from dicom_ai.cli import main

    assert main(["phantom", "--out", str(tmp_path / "out"), "--count", "2", "--seed", "3", "--size", "104x80",
                 "--transfer-syntax", "rle", "--density", "b"]) == 0
    manifests = sorted((tmp_path / "out").rglob("manifest.json"))
    assert [m.parent.name for m in manifests] == ["phantom_000003", "phantom_000004"]
    assert json.loads(manifests[0].read_text())["density"] == "b"
    real = tmp_path / "real"
    real.mkdir()
    Image.fromarray((np.arange(64 * 48).reshape(64, 48) * 20).astype(np.uint16)).save(real / "x_L_CC.png")
    out = tmp_path / "preview.png"
    assert main(["preview", "--out", str(out), "--real", str(real), "--size", "104x80", "--height", "96",
                 "--crop", "32"]) == 0
    sheet = np.asarray(Image.open(out))
    assert sheet.ndim == 2 and sheet.shape[0] >= 2 * 96 and sheet.max() > 0
