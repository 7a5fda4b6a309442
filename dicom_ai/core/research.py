"""Research-only model bundles: the one-line notice the node shows for each, read without torch.

Owns :func:`research_notice` (the notice of one manifest) and :func:`research_notices` (those of
the configured bundles, from their ``manifest.json`` alone). A bundle whose manifest says
``"research_only": true`` (``dicom-ai import glam`` writes it for the GLAM authors' weights) is
named, with its licence, in the node's start-up log, the status page, ``dicom-ai status`` and
``dicom-ai check-config``; the model adds it to the SR itself. Here in core because the receiving
process, which never loads torch, shows it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MODELS_DIR", "research_notice", "research_notices"]

#: Where the shipped bundles live (the repository's models/ folder).
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def research_notice(manifest: dict) -> str:
    """``model NAME VERSION is RESEARCH ONLY ... (weights under: LICENCE)`` for a manifest with
    ``research_only: true``; "" for any other."""
    if not manifest.get("research_only"):
        return ""
    licence = str(dict(manifest.get("licence") or {}).get("name") or "licence not stated")
    return (f"model {manifest.get('name')} {manifest.get('version')} is RESEARCH ONLY, not for clinical use "
            f"(weights under: {licence})")


def research_notices(names: Sequence[str]) -> list[str]:
    """:func:`research_notice` of each bundle named (a folder, or a name under :data:`MODELS_DIR`).

    Reads ``manifest.json`` only; a bundle that cannot be read is skipped here (loading it
    reports why).
    """
    out = []
    for name in names:
        folder = Path(name) if Path(name).is_dir() else MODELS_DIR / str(name)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and research_notice(manifest):
            out.append(research_notice(manifest))
    return out
