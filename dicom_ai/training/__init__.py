"""training: how each seed method's bundle is trained, as library functions (no argparse).

Owns the GLAM recipe from image-level labels (:mod:`~dicom_ai.training.glam`), the U-Net's
Models-Genesis restoration pre-training and its segmentation training
(:mod:`~dicom_ai.training.genesis`, :mod:`~dicom_ai.training.dunet`), and the microcalcification
patch training (:mod:`~dicom_ai.training.microcalc`).

May import: :mod:`dicom_ai.core`, :mod:`dicom_ai.imaging`, :mod:`dicom_ai.networks`,
:mod:`dicom_ai.data`; torch, numpy. Only :mod:`dicom_ai.cli` imports this package, and only
when a ``dicom-ai train`` command runs.
"""
