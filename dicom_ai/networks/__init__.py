"""networks: the three seed methods as torch modules, their bundles, and the pipeline that runs them.

Owns the model bundles (:mod:`~dicom_ai.networks.bundle`: JSON manifest + safetensors weights,
digest-checked, never executable, and :func:`load_weights`, the one strict weight loader), the
table from bundle kind to model class (:mod:`~dicom_ai.networks.registry`), the device choice (:func:`resolve_device`), the three
methods (:mod:`~dicom_ai.networks.glam` GLAM, :mod:`~dicom_ai.networks.dunet` the discriminative
U-Net, :mod:`~dicom_ai.networks.microcalc` the microcalcification Detector and Segmentator), each
a plain ``torch.nn.Module`` with its hyper-parameters in one config dataclass and a model class
that turns a :class:`~dicom_ai.imaging.Mammogram` into :class:`~dicom_ai.core.findings.ModelOutput`,
and the :class:`Pipeline` that runs the configured models over a study.

May import: :mod:`dicom_ai.core`, :mod:`dicom_ai.imaging`; torch, numpy, safetensors, SimpleITK,
matplotlib (the point-in-polygon test of the microcalcification cluster outlines). Errors:
:class:`~dicom_ai.core.errors.ModelError` for bad configurations and inputs,
:class:`~dicom_ai.core.errors.BundleError` for bundles (wrong kind, weights that do not fit).
Training code is not here (:mod:`dicom_ai.training`); the top-level ``models/`` folder holds
the shipped bundles, this package the code that loads and runs them.
"""

from dicom_ai.networks.bundle import MODELS_DIR, Bundle, load_bundle, load_weights, require_kind, resolve_bundle_dir, save_bundle
from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig, DUNetModel
from dicom_ai.networks.glam import CONFIGS as GLAM_CONFIGS
from dicom_ai.networks.glam import Glam, GlamConfig, GlamModel
from dicom_ai.networks.microcalc import MicrocalcConfig, MicrocalcModel, PatchCNN
from dicom_ai.networks.pipeline import DEFAULT_MODELS, ImageModel, Pipeline, model_from_bundle, resolve_device
from dicom_ai.networks.registry import MODEL_CLASSES

__all__ = [
    "MODELS_DIR", "Bundle", "load_bundle", "save_bundle", "resolve_bundle_dir", "load_weights", "require_kind",
    "ImageModel", "Pipeline", "DEFAULT_MODELS", "model_from_bundle", "MODEL_CLASSES", "resolve_device",
    "Glam", "GlamConfig", "GlamModel", "GLAM_CONFIGS",
    "DiscriminativeUNet", "DUNetConfig", "DUNetModel",
    "PatchCNN", "MicrocalcConfig", "MicrocalcModel",
]
