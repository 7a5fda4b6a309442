"""training: how each seed method's bundle is trained, as library functions (no argparse).

Owns the GLAM recipe from image-level labels (:mod:`~dicom_ai.training.glam`), the U-Net's
Models-Genesis restoration pre-training and its segmentation training
(:mod:`~dicom_ai.training.genesis`, :mod:`~dicom_ai.training.dunet`), the microcalcification
patch training (:mod:`~dicom_ai.training.microcalc`), and what the recipes share
(:mod:`~dicom_ai.training.common`: the intended-use statement). Each module also builds the
manifest of the bundle it trains; the ``dicom-ai train`` sub-commands
(:mod:`dicom_ai.cli.train`) parse the arguments, call these functions and print.

May import: :mod:`dicom_ai.core`, :mod:`dicom_ai.imaging`, :mod:`dicom_ai.networks`,
:mod:`dicom_ai.data`; torch, numpy, safetensors, SimpleITK, tqdm. Only :mod:`dicom_ai.cli`
imports this package, and only when a ``dicom-ai train`` command runs.
"""
