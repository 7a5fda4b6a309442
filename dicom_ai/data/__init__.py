"""data: phantom studies with ground truth, data set adapters, metrics and evaluation.

Owns the phantom generator (:mod:`~dicom_ai.data.phantom`), the MG data set a modality would
send (:mod:`~dicom_ai.data.mg`), the phantom study folder format with its writer and reader
together (:mod:`~dicom_ai.data.phantom_folder`), the one cache of generated arrays keyed by the
generator's code (:mod:`~dicom_ai.data.cache`), ground-truth samples and lesions
(:mod:`~dicom_ai.data.sample`), adapters for INbreast, CBIS-DDSM, VinDr-Mammo, mini-MIAS and
the small public sets, with patient identifiers, licences and MIAS's fixed patient-level folds
(:mod:`~dicom_ai.data.datasets`), lesions inserted into real mammograms as hybrid training data
(:mod:`~dicom_ai.data.insertion`), the metrics with their stated conventions
(:mod:`~dicom_ai.data.metrics`) and evaluation reports (:mod:`~dicom_ai.data.evaluate`).

May import: :mod:`dicom_ai.core`, :mod:`dicom_ai.imaging`, :mod:`dicom_ai.networks` (evaluation
runs bundles); numpy, pydicom, SimpleITK, Pillow, matplotlib. Nothing of the node imports it.
"""

from dicom_ai.data.cache import generator_version
from dicom_ai.data.datasets import FORMATS, MIASDataset, mias_folds, open_dataset, patient_folds
from dicom_ai.data.mg import MG_FOR_PRESENTATION, MG_FOR_PROCESSING, TRANSFER_SYNTAXES, encode, mg_dataset
from dicom_ai.data.phantom import FULL_SHAPE, FULL_SPACING_MM, PhantomImage, PhantomStudy, generate_study
from dicom_ai.data.phantom_folder import FORMAT, read_manifest, write_study
from dicom_ai.data.sample import LESION_KINDS, MASK_KEYS, Lesion, Sample

__all__ = [
    "generate_study", "PhantomStudy", "PhantomImage", "FULL_SHAPE", "FULL_SPACING_MM",
    "mg_dataset", "encode", "MG_FOR_PRESENTATION", "MG_FOR_PROCESSING", "TRANSFER_SYNTAXES",
    "FORMAT", "write_study", "read_manifest", "generator_version",
    "MASK_KEYS", "Sample", "Lesion", "LESION_KINDS", "FORMATS", "open_dataset", "MIASDataset", "mias_folds",
    "patient_folds",
]
