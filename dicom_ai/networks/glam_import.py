"""Import the GLAM authors' checkpoint (nyukat/GLAM ``model_sep.ckpt`` / ``model_joint.ckpt``) as a bundle.

Owns :func:`read_checkpoint` (a ``torch.save`` file read without executing anything from it),
:func:`import_glam` (the checked tensors written as a normal bundle) and the texts every such
bundle carries (:data:`AUTHORS_LICENCE`, :data:`AUTHORS_CITATION`). ``dicom-ai import glam``
(:mod:`dicom_ai.cli.importer`) is the command.

Reading: ``torch.load(weights_only=True)``, torch's restricted unpickler, which builds tensors
and plain containers (dict, OrderedDict, list, tuple, numbers, strings) and refuses any other
global (a class, a function such as ``os.system``) *before* calling it. The authors save a
plain ``state_dict`` (their ``run_model.py`` loads ``torch.load(path)`` straight into the
model); a single ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is also accepted and
recorded. The tensors are then checked against the authors' table
(:func:`~dicom_ai.networks.glam_authors.check_state_dict`): any missing, unexpected or
mis-shaped tensor is refused by name. The weights are stored unchanged (float32).
"""

from __future__ import annotations

import hashlib
import pickle
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

from dicom_ai import __version__
from dicom_ai.core.errors import BundleError
from dicom_ai.networks.bundle import load_bundle, load_weights, save_bundle
from dicom_ai.networks.glam_authors import AUTHORS_GLAM_COMMIT, GlamAuthors, GlamAuthorsConfig, check_state_dict
from dicom_ai.networks.glam_authors_tensors import AUTHORS_TENSORS

__all__ = ["AUTHORS_LICENCE", "AUTHORS_CITATION", "OPERATING_POINT_RULE", "read_checkpoint", "import_glam"]

#: The licence the authors distribute the weights under (nyukat/GLAM ``LICENSE``, verbatim). Its
#: first condition is that this notice appears in every internal copy: it is written into each
#: imported bundle (``LICENSE.txt`` and the manifest).
AUTHORS_LICENCE = """\
Copyright 2021 New York University. All Rights Reserved.
A license to use and copy this model and its documentation solely for your internal non-commercial
research and evaluation purposes, without fee and without a signed licensing agreement, is hereby granted
upon your download of the model, through which you agree to the following: 1) the above copyright
notice, this paragraph and the following three paragraphs will prominently appear in all internal copies
and modifications; 2) no rights to sublicense or further distribute this model are granted; 3) no rights
to modify this model are granted; and 4) no rights to assign this license are granted. Please contact
the NYU Office of Industrial Liaison at (212) 263-8178 for commercial licensing opportunities, or for further
distribution, modification or license rights.

Created by Kangning Liu, Yiqiu Shen, Nan Wu, Jakub Chledowski, Carlos Fernandez-Granda, and Krzysztof J. Geras.

IN NO EVENT SHALL NYU, OR THEIR EMPLOYEES, OFFICERS, AGENTS OR TRUSTEES
("COLLECTIVELY "NYU PARTIES") BE LIABLE TO ANY PARTY FOR DIRECT, INDIRECT, SPECIAL,
INCIDENTAL, OR CONSEQUENTIAL DAMAGES OF ANY KIND, INCLUDING LOST PROFITS, ARISING
OUT OF ANY CLAIM RESULTING FROM YOUR USE OF THIS MODEL AND ITS
DOCUMENTATION, EVEN IF ANY OF NYU PARTIES HAS BEEN ADVISED OF THE POSSIBILITY
OF SUCH CLAIM OR DAMAGE.
NYU SPECIFICALLY DISCLAIMS ANY WARRANTIES OF ANY KIND REGARDING THE MODEL,
INCLUDING, BUT NOT LIMITED TO, NON-INFRINGEMENT, THE IMPLIED WARRANTIES OF
MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE, OR THE ACCURACY OR USEFULNESS,
OR COMPLETENESS OF THE SOFTWARE. THE MODEL AND ACCOMPANYING DOCUMENTATION,
IF ANY, PROVIDED HEREUNDER IS PROVIDED COMPLETELY "AS IS". NYU HAS NO OBLIGATION TO PROVIDE
FURTHER DOCUMENTATION, MAINTENANCE, SUPPORT, UPDATES, ENHANCEMENTS, OR MODIFICATIONS.
"""

LICENCE_NAME = "NYU non-commercial research and evaluation licence (nyukat/GLAM model weights)"

AUTHORS_CITATION = ("Kangning Liu, Yiqiu Shen, Nan Wu, Jakub Chledowski, Carlos Fernandez-Granda, Krzysztof J. Geras. "
                    "Weakly-supervised High-resolution Segmentation of Mammography Images for Breast Cancer Diagnosis. "
                    "Medical Imaging with Deep Learning (MIDL), 2021. arXiv:2106.07049. "
                    "Code and weights: https://github.com/nyukat/GLAM")

INTENDED_USE = ("RESEARCH ONLY, not for clinical use: the GLAM authors' weights (trained on the private NYU "
                "screening data), used under their non-commercial research licence; not validated on this site's "
                "images, scores not calibrated, no regulatory clearance; the weights must not be redistributed")

#: How thresholds are set without site data, and how a site re-chooses them (in every manifest).
OPERATING_POINT_RULE = (
    "No site data: the authors publish no operating point and their scores are not calibrated, so every named "
    "point is the fused map at 0.5 (the sigmoid's midpoint; the fused map is the mean of the local and global "
    "maps, so 0.5 keeps mostly the selected patch), chosen on no data and stated as such in the SR. "
    "A site re-chooses them on its own annotated, patient-disjoint validation studies: run the bundle over them "
    "(dicom-ai evaluate --bundle BUNDLE, or the node), pick per finding the threshold meeting the target "
    "(for example at most 1 false mark per image) on validation folds only, and write it into this manifest's "
    "operating_points with the data it was chosen on (editing the manifest does not touch the weights or their "
    "digest)."
)

#: The node's operating-point names: each present so that ``pipeline.operating_point`` works,
#: each with the same uncalibrated threshold until a site re-chooses it.
_POINT_NAMES = ("uncalibrated", "fp0.25", "fp0.5", "fp1", "fp2", "phantom")
_UNCALIBRATED = 0.5


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a ``torch.save`` checkpoint, read without executing code from it.

    Returns ``(tensors, wrapper)`` where ``wrapper`` is ``""`` for a plain state_dict or the
    key (``state_dict``/``model``) it was found under.

    Raises
    ------
    BundleError
        The file is missing or unreadable, carries anything but tensors and plain containers
        (the message names what torch refused; nothing of it was run), or is not a mapping of
        tensor names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        if not found:  # not torch's refusal: a damaged or foreign file
            raise BundleError(f"checkpoint {path} cannot be read as a torch checkpoint: "
                              f"{text.splitlines()[0] if text else type(exc).__name__}") from None
        what = f"it refers to {found.group(1)}" if found.re.pattern.startswith("Unsupported") else found.group(1)
        raise BundleError(f"checkpoint {path} refused: it carries something other than tensors and plain containers "
                          f"({what}); nothing in it was executed. The authors' checkpoints are plain state_dicts: "
                          "use the file as downloaded from the authors.") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, zipfile errors... for damaged files
        raise BundleError(f"checkpoint {path} cannot be read as a torch checkpoint: "
                          f"{type(exc).__name__}: {exc}") from None
    wrapper = ""
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model") \
            and isinstance(next(iter(obj.values())), dict):
        wrapper = next(iter(obj))
        obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        kind = type(obj).__name__
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else ""
        raise BundleError(f"checkpoint {path} holds a {kind}{f' with keys {keys}' if keys else ''}, not a state_dict "
                          "(a mapping of tensor names to tensors)")
    return dict(obj), wrapper


def import_glam(checkpoint: str | Path, out: str | Path, name: str = "glam-authors", version: str = "",
                config: GlamAuthorsConfig = GlamAuthorsConfig(), source: str = "") -> Path:
    """Write the authors' checkpoint as a bundle at ``out`` and load it back once; returns ``out``.

    Parameters
    ----------
    checkpoint
        The authors' ``model_sep.ckpt`` or ``model_joint.ckpt`` as downloaded.
    out
        Bundle folder to write (``manifest.json``, ``weights.safetensors``, ``LICENSE.txt``).
    name, version
        The identity written into every SEG/SR; ``version`` defaults to the checkpoint's file
        stem and the first 8 hex digits of its SHA-256 (for example ``model_sep-1a2b3c4d``).
    config
        The network's run-time configuration; the default is the authors' (only it reproduces
        their outputs; a smaller one is for tests).
    source
        Where the site got the file (free text for the provenance), e.g. the authors' URL.

    Raises
    ------
    BundleError
        Unreadable or unsafe checkpoint (:func:`read_checkpoint`), or tensors that do not match
        the authors' network (each named).
    """
    checkpoint = Path(checkpoint)
    tensors, wrapper = read_checkpoint(checkpoint)
    filled = sorted(n for n, _, _ in AUTHORS_TENSORS if n not in tensors)
    state = check_state_dict(tensors, str(checkpoint))
    digest = _sha256(checkpoint)
    version = version or f"{checkpoint.stem}-{digest[:8]}"
    point = {"threshold": _UNCALIBRATED, "calibrated": False, "data": "none",
             "target": "uncalibrated: fused map at 0.5, not chosen on data (re-choose on site data)"}
    findings = ("benign_lesion", "malignant_lesion")
    manifest = {
        "name": name,
        "version": version,
        "family": "Artificial Intelligence",
        "architecture": {"kind": "glam", **config.to_dict()},
        "input": {
            "views": ["CC", "MLO"],
            "orientation": "flipped to face right (chest wall at column 0), as the authors' pipeline",
            "crop": "the authors' breast box (pixel > 0 after shifting the minimum to 0; 100 erosions, largest "
                    "component, 100 dilations, 50 px margins)",
            "window": "fixed window at the authors' optimal centre, zero-padded, no resampling "
                      "(dicom_ai.imaging.nyu_window)",
            "window_rows_cols": list(config.input_shape),
            "pixel_spacing_mm": None,
            "intensity": "the decoded view's pixels (dicom_ai.imaging, [0, 1], dense bright), z-scored over the window",
        },
        "thresholds": {f: _UNCALIBRATED for f in findings},
        "operating_points": {"default": "uncalibrated", "rule": OPERATING_POINT_RULE,
                             "findings": {f: [dict(point, name=n) for n in _POINT_NAMES] for f in findings}},
        "intended_use": INTENDED_USE,
        "research_only": True,
        "licence": {"name": LICENCE_NAME, "file": "LICENSE.txt", "text": AUTHORS_LICENCE,
                    "redistribution": "not permitted (condition 2 of the licence)"},
        "citation": AUTHORS_CITATION,
        "training": {"data": "NYU Breast Cancer Screening Dataset (private), by the authors",
                     "command": "not released (the authors publish inference code and weights only)",
                     "by": "the GLAM authors (NYU)"},
        "provenance": {
            "checkpoint_file": checkpoint.name,
            "checkpoint_sha256": digest,
            "source": source or "nyukat/GLAM models/ (obtained from the authors under their licence)",
            "authors_code_commit": AUTHORS_GLAM_COMMIT,
            "state_dict_wrapper": wrapper,
            "filled_with_zeros": filled,
            "imported_by": f"dicom-ai {__version__} import glam",
            "imported_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "weights": "the checkpoint's tensors unchanged (float32), stored as safetensors",
        },
    }
    out = Path(out)
    save_bundle(out, manifest, state)
    (out / "LICENSE.txt").write_text(AUTHORS_LICENCE)
    # Loaded back once, through the node's own path: a bundle that would not load is not left half-done silently.
    load_weights(GlamAuthors(config), load_bundle(out), "glam")
    return out
