"""Which model class serves which bundle kind: the one table from ``architecture.kind`` to class.

Owns :data:`MODEL_CLASSES` and :func:`model_from_bundle`. A new method adds its class here;
the class's ``from_bundle`` checks the kind and loads the weights
(:func:`dicom_ai.networks.bundle.load_weights`).
"""

from __future__ import annotations

import torch

from dicom_ai.core.errors import BundleError
from dicom_ai.networks.bundle import Bundle
from dicom_ai.networks.dunet import DUNetModel
from dicom_ai.networks.glam import GlamModel
from dicom_ai.networks.microcalc import MicrocalcModel

__all__ = ["MODEL_CLASSES", "model_from_bundle"]

#: Bundle ``architecture.kind`` -> the model class whose ``from_bundle`` builds it.
MODEL_CLASSES: dict[str, type] = {"glam": GlamModel, "dunet": DUNetModel, "microcalc": MicrocalcModel}


def model_from_bundle(bundle: Bundle, device: torch.device | str = "cpu") -> GlamModel | DUNetModel | MicrocalcModel:
    """Instantiate the model class named by the bundle's ``architecture.kind`` on ``device``.

    Raises :class:`~dicom_ai.core.errors.BundleError` for a kind no class serves (the message
    names the bundle folder and the known kinds) or weights that do not fit.
    """
    cls = MODEL_CLASSES.get(bundle.kind)
    if cls is None:
        raise BundleError(f"bundle {bundle.where} has unknown architecture kind {bundle.kind!r}; "
                          f"known: {', '.join(MODEL_CLASSES)}")
    return cls.from_bundle(bundle, device)
