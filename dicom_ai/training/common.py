"""What every training recipe of :mod:`dicom_ai.training` writes the same way.

Owns the intended-use statement that goes into the manifest of every bundle trained here;
a method may append sentences of its own (the U-Net says what it segments).
"""

from __future__ import annotations

__all__ = ["INTENDED_USE"]

#: Intended use of every bundle trained on the phantoms (manifest ``intended_use``).
INTENDED_USE = "research / demonstration, trained on synthetic phantoms, not for clinical use"
