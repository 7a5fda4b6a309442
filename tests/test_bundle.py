import json

import pytest
import torch

from dicom_ai.networks.bundle import BundleError, load_bundle, save_bundle

MANIFEST = {"name": "toy", "version": "0.0.1", "architecture": {"kind": "toy"}, "input": {},
            "thresholds": {"malignant_lesion": 0.5}, "intended_use": "test", "training": {}}


def test_round_trip_and_identity(tmp_path):
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_bundle(tmp_path / "b", MANIFEST, sd)
    b = load_bundle(tmp_path / "b")
    assert torch.equal(b.state_dict["w"], sd["w"])
    assert b.identity.name == "toy" and b.kind == "toy"


def test_tampered_weights_are_refused(tmp_path):
    save_bundle(tmp_path / "b", MANIFEST, {"w": torch.zeros(3)})
    (tmp_path / "b" / "weights.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(tmp_path / "b")


def test_pickle_weights_are_refused(tmp_path):
    save_bundle(tmp_path / "b", MANIFEST, {"w": torch.zeros(3)})
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m["weights"] = "weights.pt"
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="safetensors"):
        load_bundle(tmp_path / "b")
