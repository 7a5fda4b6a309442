"""The DICOM Conformance Statement's checks: wrappers around the reference validators.

Not part of the runtime package: the tests and ``make demo`` use :mod:`conformance.validators`
(dciodvfy, PixelMed, dsrdump, dcmqi) to check what the node sends.
"""
