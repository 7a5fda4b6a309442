"""core: the values every part of the flow passes to the next, with nothing heavy behind them.

Owns the error hierarchy (:mod:`~dicom_ai.core.errors`), the findings interface between the
models and the result writers (:mod:`~dicom_ai.core.findings`), the view/laterality reader and
its code table (:mod:`~dicom_ai.core.views`), the UIDs of a job's results
(:mod:`~dicom_ai.core.uids`), what the result objects look like (:mod:`~dicom_ai.core.options`),
how a compute device is spelled (:mod:`~dicom_ai.core.device`) and the notice of a research-only
model bundle (:mod:`~dicom_ai.core.research`, read from its manifest without torch).

May import: numpy and pydicom only. The receiving process (SCP, job store, delivery) stands on
this layer alone, which is why these contracts are not inside the heavier subpackages.
"""

from dicom_ai.core.device import check_device_spec
from dicom_ai.core.errors import (
    BundleError,
    ConfigError,
    DatasetError,
    DeviceError,
    DicomAIError,
    ImagingError,
    ModelError,
    PreprocessError,
    RegionError,
    ResultError,
    SegWriterError,
)
from dicom_ai.core.findings import (
    FINDING_KEYS,
    SCORE_KEYS,
    ImageFindings,
    ImageScore,
    ModelIdentity,
    ModelOutput,
    ProbabilityMap,
)
from dicom_ai.core.options import COMPRESSIONS, SEGMENTATION_TYPES, Equipment, ResultOptions, encoding_problem
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.core.views import VIEW_CODES, image_name, laterality_of, view_of

__all__ = [
    "DicomAIError", "ConfigError", "DeviceError", "ImagingError", "PreprocessError", "BundleError",
    "ModelError", "RegionError", "ResultError", "SegWriterError", "DatasetError",
    "FINDING_KEYS", "SCORE_KEYS", "ModelIdentity", "ProbabilityMap", "ImageScore", "ModelOutput",
    "ImageFindings",
    "VIEW_CODES", "view_of", "laterality_of", "image_name",
    "ResultUIDs", "Equipment", "ResultOptions", "SEGMENTATION_TYPES", "COMPRESSIONS", "encoding_problem",
    "check_device_spec",
]
