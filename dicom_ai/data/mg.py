"""Write phantom mammograms as the DICOM a digital mammography modality sends.

Each image is a Digital Mammography X-Ray Image (For Presentation ``1.2.840.10008.5.1.4.1.1.1.2``
or For Processing ``...1.2.1``) with the attributes a real modality writes: Image Laterality,
View Position and View Code Sequence, Patient Orientation, Presentation Intent Type, a VOI
window (For Presentation), Breast Implant Present, Estimated Radiographic Magnification Factor,
Anatomic Region Sequence, Image Type, detector and positioner attributes, Burned In Annotation.
``dciodvfy`` reports no errors on them; its one expected warning is that ``CC``/``MLO`` are not
DX defined terms for View Position (every MG vendor writes them there).

Transfer syntaxes of :func:`encode`: ``explicit`` (Explicit VR Little Endian, default), ``jpeg2000`` (JPEG 2000
Image Compression, Lossless Only), ``jpegls`` (JPEG-LS Lossless), ``rle`` (RLE Lossless).
All three compressed ones are lossless and decode back to the identical stored values.
"""

from __future__ import annotations

import copy
import datetime as _dt

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from dicom_ai.core.views import VIEW_CODES

__all__ = ["MG_FOR_PRESENTATION", "MG_FOR_PROCESSING", "TRANSFER_SYNTAXES", "mg_dataset", "encode"]

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "rle": RLELossless,
}

# Patient Orientation of the stored image: (direction of increasing column, of increasing row).
_ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
                ("L", "MLO"): ["A", "F"], ("R", "MLO"): ["P", "F"]}
# Positioner Primary Angle: CC 0 degrees; MLO tube tilted towards the breast's side.
_ANGLE = {("L", "CC"): 0, ("R", "CC"): 0, ("L", "MLO"): 45, ("R", "MLO"): -45}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _uid(seed: int, *parts: object) -> str:
    """A UID that depends only on the phantom seed and the parts, so studies are reproducible."""
    return generate_uid(entropy_srcs=["dicom_ai-phantom", str(seed)] + [str(p) for p in parts])


def mg_dataset(
    stored: np.ndarray,
    *,
    seed: int,
    laterality: str,
    view: str,
    spacing_mm: float,
    photometric: str = "MONOCHROME2",
    presentation: str = "FOR PRESENTATION",
    bits_stored: int = 12,
    thickness_mm: float = 50.0,
    instance_number: int = 1,
) -> Dataset:
    """Build an uncompressed MG data set (Explicit VR Little Endian) around ``stored`` values.

    ``stored`` is a uint16 array of values in ``[0, 2**bits_stored - 1]`` already in the sense
    of ``photometric``. ``spacing_mm`` is the Imager Pixel Spacing (square pixels).

    Parameters
    ----------
    stored
        ``(rows, columns)`` stored pixel values, written as Pixel Data unchanged (cast to
        uint16). Row 0 is the top row; the array must already be in the orientation of a real
        modality (L views chest wall at column 0, R views at the last column), which the
        Patient Orientation written for ``laterality`` and ``view`` describes.
    seed
        Phantom seed; the UIDs, patient and study identifiers and the acquisition date and
        time are derived from it alone, so the same seed gives the same data set.
    laterality
        Image Laterality, ``"L"`` or ``"R"`` (case-insensitive).
    view
        View Position, ``"CC"`` or ``"MLO"`` (case-insensitive); also selects the View Code
        Sequence and the Positioner Primary Angle (MLO: +45 degrees for L, -45 for R).
    spacing_mm
        Imager Pixel Spacing in mm per pixel at the detector, rows and columns alike. Pixel
        Spacing is written as ``spacing_mm * SOD / SID`` (magnification corrected, SID 660 mm,
        SOD 620 mm).
    photometric
        ``"MONOCHROME2"`` (higher value = brighter) or ``"MONOCHROME1"`` (inverted); must
        match how ``stored`` was produced.
    presentation
        Presentation Intent Type, ``"FOR PRESENTATION"`` or ``"FOR PROCESSING"``
        (case-insensitive); selects the SOP class and series, and For Presentation adds a
        full-range linear VOI window.
    bits_stored
        Bits Stored, 10 to 16 (Bits Allocated is 16).
    thickness_mm
        Compressed breast thickness in mm (Body Part Thickness).
    instance_number
        Instance Number of the image within its series.

    Returns
    -------
    pydicom.dataset.Dataset
        The data set with its file meta (Explicit VR Little Endian), ready for
        :meth:`~pydicom.dataset.Dataset.save_as` or :func:`encode`.

    Raises
    ------
    ValueError
        When ``laterality``/``view``, ``presentation``, ``photometric`` or ``bits_stored``
        is unsupported, or a stored value needs more than ``bits_stored`` bits.
    """
    laterality, view = laterality.upper(), view.upper()
    presentation = presentation.upper()
    if (laterality, view) not in _ORIENTATION:
        raise ValueError(f"unsupported view {laterality}-{view}; expected L/R and CC/MLO")
    if presentation not in ("FOR PRESENTATION", "FOR PROCESSING"):
        raise ValueError(f"presentation intent {presentation!r} must be 'FOR PRESENTATION' or 'FOR PROCESSING'")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric {photometric!r} must be MONOCHROME1 or MONOCHROME2")
    if not 10 <= bits_stored <= 16:
        raise ValueError(f"bits_stored {bits_stored} outside 10-16")
    stored = np.ascontiguousarray(stored, dtype=np.uint16)
    if int(stored.max(initial=0)) >= 2**bits_stored:
        raise ValueError(f"stored values exceed {bits_stored} bits")

    sop_class = MG_FOR_PRESENTATION if presentation == "FOR PRESENTATION" else MG_FOR_PROCESSING
    sop_uid = _uid(seed, "sop", presentation, laterality, view)
    # A fixed, seed-dependent acquisition date keeps files reproducible.
    when = _dt.datetime(2025, 1, 6, 8, 30) + _dt.timedelta(days=seed % 700, minutes=(seed * 7) % 480)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "DICOM_AI_PH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    # Patient / study: synthetic identifiers only.
    ds.PatientName = f"PHANTOM^{seed:06d}"
    ds.PatientID = f"PH{seed:08d}"
    ds.PatientBirthDate = f"{1950 + seed % 30}0101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = _uid(seed, "study")
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{seed % 10**8}"
    ds.AccessionNumber = f"PHA{seed:08d}"
    ds.StudyDescription = "MG screening bilateral (phantom)"
    # Series / equipment.
    ds.Modality = "MG"
    ds.SeriesInstanceUID = _uid(seed, "series", presentation)
    ds.SeriesNumber = 1 if presentation == "FOR PRESENTATION" else 2
    ds.SeriesDescription = "Phantom screening " + ("presentation" if sop_class == MG_FOR_PRESENTATION else "processing")
    ds.Manufacturer = "dicom_ai phantom"
    ds.ManufacturerModelName = "dicom_ai.phantom"
    ds.SoftwareVersions = "1"
    ds.DeviceSerialNumber = "PH0001"
    ds.InstitutionName = "Phantom Institution"
    # Image.
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.InstanceNumber = instance_number
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDateTime = date + time
    ds.PatientOrientation = list(_ORIENTATION[(laterality, view)])
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    view_item = _code(VIEW_CODES[view].value, VIEW_CODES[view].scheme_designator, VIEW_CODES[view].meaning)
    view_item.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [view_item]
    ds.AnatomicRegionSequence = [_code("76752008", "SCT", "Breast")]
    ds.BodyPartExamined = "BREAST"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PresentationIntentType = presentation
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.QualityControlImage = "NO"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    if presentation == "FOR PRESENTATION":
        ds.WindowCenter = 2 ** (bits_stored - 1)
        ds.WindowWidth = 2**bits_stored
        ds.VOILUTFunction = "LINEAR"
        ds.WindowCenterWidthExplanation = "FULL RANGE"
    # Detector and positioner.
    sid, sod = 660.0, 620.0
    ds.DetectorType = "DIRECT"
    ds.DetectorConfiguration = "AREA"
    ds.DetectorID = "PHDET"
    ds.DetectorActiveShape = "RECTANGLE"
    ds.ImagerPixelSpacing = [f"{spacing_mm:.6g}", f"{spacing_mm:.6g}"]
    # GEOMETRY calibration means corrected for geometric magnification, so Pixel Spacing
    # is the detector spacing divided by SID/SOD (the breast's mid-plane).
    breast_spacing = spacing_mm * sod / sid
    ds.PixelSpacing = [f"{breast_spacing:.6g}", f"{breast_spacing:.6g}"]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Magnification corrected at SID/SOD"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.PositionerPrimaryAngle = _ANGLE[(laterality, view)]
    ds.PositionerSecondaryAngle = 0
    ds.DistanceSourceToDetector = f"{sid:.1f}"
    ds.DistanceSourceToPatient = f"{sod:.1f}"
    ds.EstimatedRadiographicMagnificationFactor = f"{sid / sod:.6f}"
    ds.KVP = "29"
    ds.ExposureTime = 1200
    ds.XRayTubeCurrent = 90
    ds.Exposure = 108
    ds.ExposureInuAs = 108000
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = ["RHODIUM"]
    ds.BodyPartThickness = f"{thickness_mm:.0f}"
    ds.CompressionForce = "110"
    ds.AcquisitionContextSequence = []
    # Pixels.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    return ds


def encode(ds: Dataset, transfer_syntax: str = "explicit") -> Dataset:
    """Return a copy of ``ds`` with Pixel Data in ``transfer_syntax`` (a key of TRANSFER_SYNTAXES).

    The compressed syntaxes are lossless, so Lossy Image Compression stays ``00``.
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}; choose one of {sorted(TRANSFER_SYNTAXES)}")
    out = copy.deepcopy(ds)  # compress() edits elements in place; never touch the caller's data set
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    if uid != ExplicitVRLittleEndian:
        arr = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
        kwargs = {"encoding_plugin": "pylibjpeg"} if transfer_syntax == "jpeg2000" else {}
        try:
            out.compress(uid, arr, **kwargs)
        except Exception as exc:  # plugins raise several types
            raise RuntimeError(
                f"cannot encode with {transfer_syntax} ({uid}): {exc}; "
                "install pylibjpeg-openjpeg (JPEG 2000) or pyjpegls (JPEG-LS)") from exc
    return out

