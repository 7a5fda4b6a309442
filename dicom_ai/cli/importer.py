"""``dicom-ai import glam``: the GLAM authors' checkpoint as a model bundle the node runs.

Parses the arguments, calls :func:`dicom_ai.networks.glam_import.import_glam` (imported when the
command runs, so that ``dicom-ai --help`` does not load torch) and prints the bundle written.
A refused checkpoint (unsafe content, missing, extra or mis-shaped tensors) exits 2 with the
reason on stderr.

Example (a research site, weights obtained from the authors)::

    dicom-ai import glam --checkpoint ~/glam/models/model_joint.ckpt --out models/glam-authors
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``import`` and its ``glam`` sub-command."""
    imp = subparsers.add_parser("import", help="import a third-party checkpoint as a model bundle")
    imp_sub = imp.add_subparsers(dest="what", metavar="MODEL")
    imp_sub.required = True
    p = imp_sub.add_parser(
        "glam", help="the GLAM authors' checkpoint (nyukat/GLAM model_sep.ckpt / model_joint.ckpt), research only",
        description="Read the GLAM authors' checkpoint without executing code from it, check every tensor "
                    "against their network, and write a research-only bundle (manifest, safetensors, licence).")
    p.add_argument("--checkpoint", required=True, help="the authors' .ckpt file, as downloaded from them")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--name", default="glam-authors", help="model name in SEG/SR (default: glam-authors)")
    p.add_argument("--version", default="",
                   help="model version in SEG/SR (default: the checkpoint's stem and SHA-256 prefix)")
    p.add_argument("--source", default="", help="where the file came from, for the bundle's provenance")
    p.set_defaults(handler=_run_glam)


def _run_glam(args: argparse.Namespace) -> int:
    from dicom_ai.core.errors import BundleError
    from dicom_ai.networks.bundle import load_bundle
    from dicom_ai.networks.glam_import import import_glam

    try:
        out = import_glam(args.checkpoint, args.out, name=args.name, version=args.version, source=args.source)
    except BundleError as exc:
        print(f"dicom-ai import glam: {exc}", file=sys.stderr)
        return 2
    manifest = load_bundle(out).manifest
    print(f"wrote {out}: {manifest['name']} {manifest['version']}, weights sha256 {manifest['weights_sha256']}")
    print(f"licence: {manifest['licence']['name']}; RESEARCH ONLY, not for clinical use, do not redistribute")
    return 0
