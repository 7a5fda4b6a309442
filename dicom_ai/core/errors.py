"""The one error hierarchy of dicom_ai.

Every error the package raises on purpose is a :class:`DicomAIError`, so a caller (the
worker, the CLI, a site's own script) can tell "dicom_ai refused this input, the message says
why" from a bug. Each specific error also derives from :class:`ValueError`, as it did before
the hierarchy existed, because each one is about a value that was given: a file, a key, an
image. Messages name the input (key, file, SOP Instance UID) and what to change.
"""

from __future__ import annotations

__all__ = [
    "DicomAIError",
    "ConfigError",
    "DeviceError",
    "ImagingError",
    "PreprocessError",
    "BundleError",
    "ModelError",
    "RegionError",
    "ResultError",
    "SegWriterError",
    "DatasetError",
    "JobStoreError",
    "StorageIdentityError",
]


class DicomAIError(Exception):
    """Base class of every error dicom_ai raises on purpose."""


class ConfigError(DicomAIError, ValueError):
    """The node configuration is invalid; the message names the key and what is expected."""


class DeviceError(DicomAIError, ValueError):
    """A compute device was asked for that is not valid or not present (``auto``, ``cpu``, ``cuda:N``)."""


class ImagingError(DicomAIError, ValueError):
    """A data set cannot be turned into a mammogram the models can read."""


#: The name the imaging error had before the hierarchy; the same class.
PreprocessError = ImagingError


class BundleError(DicomAIError, ValueError):
    """A model bundle is missing, incomplete or does not match its manifest."""


class ModelError(DicomAIError, ValueError):
    """A network configuration or its input is invalid (shapes, sizes, options)."""


class RegionError(DicomAIError, ValueError):
    """A map or its source image cannot be turned into regions."""


class ResultError(DicomAIError, ValueError):
    """Findings and sources do not fit together; the message names the instance."""


class SegWriterError(ResultError):
    """The inputs cannot make a valid SEG; the message says which input to fix."""


class DatasetError(DicomAIError, ValueError):
    """A data set folder does not have the layout its adapter expects."""


class JobStoreError(DicomAIError, ValueError):
    """The job store cannot be used as configured: an unknown ``[jobstore] url`` scheme, a schema
    newer than this version knows, a driver that is not installed."""


class StorageIdentityError(DicomAIError, ValueError):
    """The node and a worker (or the job store) do not see the same storage: a shared path that
    is not mounted, mounted from elsewhere, or a job store that belongs to another node."""
