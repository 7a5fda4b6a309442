"""The one cache of generated phantom data, keyed by the code that generates it.

Training and benchmarks turn phantom studies into arrays (decoded, preprocessed, cut into
patches); generating them takes minutes to hours, so they are kept under ``build/``. A cache
entry is valid only for the code that made it: :func:`generator_version` hashes the phantom
generator, the MG writer and the whole imaging package, and every cache folder name carries it,
so a changed generator or preprocessing is never served stale arrays.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["generator_version", "GENERATOR_SOURCES"]

_PACKAGE = Path(__file__).resolve().parent.parent

#: The source files whose content decides what a cached phantom array holds.
GENERATOR_SOURCES: tuple[Path, ...] = (
    _PACKAGE / "data" / "phantom.py",
    _PACKAGE / "data" / "mg.py",
    *sorted((_PACKAGE / "imaging").glob("*.py")),
)


def generator_version() -> str:
    """Short hash (10 hex digits) of :data:`GENERATOR_SOURCES`."""
    digest = hashlib.sha256()
    for path in GENERATOR_SOURCES:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]
