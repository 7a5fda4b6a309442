"""dicom_ai: a DICOM node that runs mammography segmentation models and returns SEG and SR."""

__version__ = "0.1.0"
