"""`dicom-ai train dunet-pretrain` and `dunet-seg` end to end on two tiny phantom studies."""

import json

import numpy as np

from dicom_ai.networks.bundle import load_bundle
from dicom_ai.cli import main
from dicom_ai.networks.pipeline import Pipeline
from dicom_ai.data.phantom import generate_study


def test_pretrain_then_segmentation_writes_a_bundle_the_pipeline_runs(tmp_path):
    common = ["--train-seeds", "0:2", "--phantom-shape", "128x96", "--input-shape", "32x32",
              "--epochs", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    ckpt = tmp_path / "pre.safetensors"
    assert main(["train", "dunet-pretrain", *common, "--out", str(ckpt)]) == 0
    assert ckpt.is_file()
    out = tmp_path / "bundle"
    assert main(["train", "dunet-seg", *common, "--init", str(ckpt), "--test-seeds", "4:5", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"]["kind"] == "dunet" and manifest["architecture"]["head"] == "subtraction"
    assert "not for clinical use" in manifest["intended_use"]
    assert manifest["training"]["pretraining"]["stage"] == "pretrain"
    assert 0.0 <= manifest["metrics"]["dice_final"] <= 1.0
    bundle = load_bundle(out)
    assert bundle.kind == "dunet"

    study = generate_study(4, shape=(128, 96))
    findings = Pipeline.from_bundles([str(out)], device="cpu").run([im.dataset for im in study.images])
    assert len(findings) == 4
    for f, im in zip(findings, study.images):
        (pmap,) = f.maps
        assert pmap.probability.shape == im.masks["mass_malignant"].shape
        assert np.isfinite(pmap.probability).all()
        assert f.scores[0].name == "malignant"
