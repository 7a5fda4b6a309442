"""networks: the three seed methods as torch modules, their bundles, and the pipeline that runs them.

Owns the model bundles (:mod:`~dicom_ai.networks.bundle`: JSON manifest + safetensors weights,
digest-checked, never executable), the device choice (:func:`resolve_device`), the three
methods (:mod:`~dicom_ai.networks.glam` GLAM, :mod:`~dicom_ai.networks.dunet` the discriminative
U-Net, :mod:`~dicom_ai.networks.microcalc` the microcalcification Detector and Segmentator), each
a plain ``torch.nn.Module`` with its hyper-parameters in one config dataclass and a model class
that turns a :class:`~dicom_ai.imaging.Mammogram` into :class:`~dicom_ai.core.findings.ModelOutput`,
and the :class:`Pipeline` that runs the configured models over a study.

May import: :mod:`dicom_ai.core`, :mod:`dicom_ai.imaging`; torch, numpy, safetensors, SimpleITK.
Training code is not here (:mod:`dicom_ai.training`); the top-level ``models/`` folder holds
the shipped bundles, this package the code that loads and runs them.
"""

from dicom_ai.networks.bundle import MODELS_DIR, Bundle, load_bundle, resolve_bundle_dir, save_bundle
from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig, DUNetModel
from dicom_ai.networks.glam import CONFIGS as GLAM_CONFIGS
from dicom_ai.networks.glam import Glam, GlamConfig, GlamModel
from dicom_ai.networks.microcalc import MicrocalcConfig, MicrocalcModel, PatchCNN
from dicom_ai.networks.pipeline import DEFAULT_MODELS, ImageModel, Pipeline, model_from_bundle, resolve_device

__all__ = [
    "MODELS_DIR", "Bundle", "load_bundle", "save_bundle", "resolve_bundle_dir",
    "ImageModel", "Pipeline", "DEFAULT_MODELS", "model_from_bundle", "resolve_device",
    "Glam", "GlamConfig", "GlamModel", "GLAM_CONFIGS",
    "DiscriminativeUNet", "DUNetConfig", "DUNetModel",
    "PatchCNN", "MicrocalcConfig", "MicrocalcModel",
]
