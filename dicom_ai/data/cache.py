"""The one cache of generated phantom data, keyed by the code that generates it.

Training and benchmarks turn phantom studies into arrays (decoded, preprocessed, cut into
patches); generating them takes minutes to hours, so they are kept under ``build/``. A cache
entry is valid only for the code that made it: :func:`generator_version` hashes the phantom
generator, the MG writer and the whole imaging package, and every cache folder name carries it
(:func:`cache_folder`), so a changed generator or preprocessing is never served stale arrays.

A cache folder holds ``.npy`` arrays (read with ``allow_pickle=False``, nothing executable) and,
written last, a JSON marker (:data:`MARKER`) whose presence says the folder is complete; an
interrupted run leaves no marker and the folder is regenerated. What the arrays are is up to
each user of the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["generator_version", "GENERATOR_SOURCES", "cache_folder", "MARKER", "read_marker", "write_marker"]

_PACKAGE = Path(__file__).resolve().parent.parent

#: The source files whose content decides what a cached phantom array holds.
GENERATOR_SOURCES: tuple[Path, ...] = (
    _PACKAGE / "data" / "phantom.py",
    _PACKAGE / "data" / "mg.py",
    *sorted((_PACKAGE / "imaging").glob("*.py")),
)

#: File name of the completeness marker of a cache folder.
MARKER = "meta.json"


def generator_version() -> str:
    """Short hash (10 hex digits) of :data:`GENERATOR_SOURCES`."""
    digest = hashlib.sha256()
    for path in GENERATOR_SOURCES:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def cache_folder(root: str | os.PathLike, prefix: str) -> Path:
    """The cache folder ``root / "<prefix>-<generator_version()>"`` (not created).

    ``prefix`` names what the folder holds (shapes, seeds); the version suffix is what makes a
    folder of an older generator unreachable.
    """
    return Path(root) / f"{prefix}-{generator_version()}"


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The JSON marker of a complete cache folder, or None when the folder is not complete."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_marker(folder: str | os.PathLike, meta: dict, indent: int | None = None) -> Path:
    """Write ``meta`` as the folder's marker; call it after every array of the folder is saved.

    The marker is renamed into place, so a reader never sees half of it.

    Parameters
    ----------
    folder
        The cache folder (from :func:`cache_folder`).
    meta
        JSON-serialisable description of what the folder holds.
    indent
        JSON indentation (None: one line).
    """
    path = Path(folder) / MARKER
    tmp = path.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps(meta, indent=indent))
    tmp.replace(path)
    return path
