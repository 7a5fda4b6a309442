"""The model pipeline: every configured model over every image of a study.

Owns the :class:`ImageModel` protocol, the device choice (:func:`resolve_device`) and the
:class:`Pipeline`. A model is anything with an ``identity`` and a
``predict(Mammogram) -> ModelOutput``; the shipped ones are built from bundles in models/ by
:func:`~dicom_ai.networks.registry.model_from_bundle` (importable from here too). The
pipeline decodes each source data set once, runs the models in order, and returns one
``ImageFindings`` per image for the writers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pydicom
import torch

from dicom_ai.core.device import check_device_spec
from dicom_ai.core.errors import DeviceError
from dicom_ai.core.findings import ImageFindings, ModelIdentity, ModelOutput
from dicom_ai.imaging import Mammogram, read_mammogram
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.registry import model_from_bundle

__all__ = ["DEFAULT_MODELS", "ImageModel", "Pipeline", "model_from_bundle", "resolve_device"]

#: Bundles the node runs when the configuration names none (folders under models/).
DEFAULT_MODELS: tuple[str, ...] = ("glam", "dunet", "microcalc")


class ImageModel(Protocol):
    """What the pipeline needs of a model."""

    identity: ModelIdentity

    def predict(self, mammogram: Mammogram) -> ModelOutput:
        """Maps on the mammogram's stored grid, and image-level scores."""
        ...


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (first CUDA GPU if any, else CPU), ``cpu`` or ``cuda:N``; raises DeviceError."""
    check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} requested but no CUDA GPU is available; use 'cpu' or 'auto'")
    return device


class Pipeline:
    """Runs a fixed list of models on each image."""

    def __init__(self, models: Sequence[ImageModel]):
        self.models = list(models)

    @classmethod
    def from_bundles(cls, names: Sequence[str] = DEFAULT_MODELS, device: str = "auto") -> "Pipeline":
        """Load bundles by name (under models/) or path onto ``device``."""
        dev = resolve_device(device)
        return cls([model_from_bundle(load_bundle(name), dev) for name in names])

    @property
    def identities(self) -> list[ModelIdentity]:
        return [m.identity for m in self.models]

    def run(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageFindings]:
        """One ImageFindings per data set, in the input order."""
        results = []
        for ds in datasets:
            mammogram = read_mammogram(ds)
            findings = ImageFindings(sop_instance_uid=mammogram.sop_instance_uid)
            for model in self.models:
                findings.add(model.predict(mammogram))
            results.append(findings)
        return results
