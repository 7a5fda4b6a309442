"""Model bundles: a manifest (JSON) and weights (safetensors) in one folder under models/.

Owns the bundle format (reading, writing, digest check) and the one way a model class puts a
bundle's weights into its network (:func:`load_weights`: the bundle's kind is checked, then
every tensor must match, strictly). Which class serves which kind is
:mod:`dicom_ai.networks.registry`.

Loading never executes code from a file: the manifest is JSON and the weights are
safetensors, whose format holds tensors only. The manifest records the weights' SHA-256,
which is checked on load so a truncated or swapped file is refused.

Manifest keys (all required unless noted):

``name``, ``version``          identity written into every SEG/SR the model contributes to
``family``                     (optional) algorithm family, default "Artificial Intelligence"
``architecture``               ``{"kind": "glam" | "dunet" | "microcalc", ...config...}``
``input``                      what the model expects (views, pixel spacing, intensity handling)
``thresholds``                 ``{finding_key: operating point in (0, 1)}``
``intended_use``               free text; research bundles say they are not for clinical use
``training``                   data, command, seed, epochs
``metrics``                    (optional) held-out results
``operating_points``           (optional) named operating points chosen on validation data:
                               ``{"default": name, "findings": {finding_key: [{"name": ...,
                               "threshold": t, "target": "0.5 false marks per image",
                               "sensitivity": s, "data": "..."}, ...]}}``. A point named in
                               :func:`load_bundle` (``pipeline.operating_point``) replaces
                               ``thresholds`` for the findings it lists.
``weights``                    file name of the safetensors file, ``weights_sha256`` its digest
``research_only``              (optional) true for weights under a research licence (the GLAM
                               authors'): :mod:`dicom_ai.core.research` states it in the node's log,
                               the status page, ``status``, ``check-config``; the model, in the SR
``licence``, ``citation``,     (optional) ``{"name", "text", ...}`` of third-party weights, how to cite
``provenance``                 them, and where they came from (``dicom-ai import glam``)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dicom_ai.core.errors import BundleError
from dicom_ai.core.findings import ModelIdentity
from dicom_ai.core.research import MODELS_DIR  # where the shipped bundles live (models/)

__all__ = ["MODELS_DIR", "REQUIRED_KEYS", "Bundle", "OperatingIdentity", "resolve_bundle_dir", "load_bundle",
           "save_bundle", "require_kind", "load_weights", "operating_point", "BundleError"]

REQUIRED_KEYS = ("name", "version", "architecture", "input", "thresholds", "intended_use",
                 "training", "weights", "weights_sha256")


@dataclass(frozen=True)
class OperatingIdentity(ModelIdentity):
    """A model identity that also names the operating point its thresholds come from.

    ``operating_point`` is the point's name ("" when the manifest has none: its plain
    ``thresholds``), ``operating_target`` its target in words; the SR writers state both.
    """

    operating_point: str = ""
    operating_target: str = ""
    #: Findings this point switches off: their maps are not sent (no threshold of a saturated
    #: map, p = 1 on many false regions, is strict enough for the point's target).
    off: tuple[str, ...] = ()


def operating_point(manifest: dict, name: str = "") -> tuple[str, str, dict[str, float], tuple[str, ...]]:
    """Operating point ``name`` of a manifest; returns (name, target, thresholds, findings off).

    ``name`` "" picks the manifest's default point; a manifest without ``operating_points``
    gives ``("", "", thresholds, ())`` for "" and raises for any other name. A point entry
    ``{"name": ..., "off": true}`` switches its finding off (its map is not sent).

    Raises
    ------
    BundleError
        No point of that name, or a threshold outside (0, 1).
    """
    table = manifest.get("operating_points")
    if not table:
        if name:
            raise BundleError(f"bundle {manifest.get('name')!r} has no operating points; "
                              f"pipeline.operating_point {name!r} cannot be applied (set it to '')")
        return "", "", {k: float(v) for k, v in manifest["thresholds"].items()}, ()
    chosen = name or str(table.get("default", ""))
    thresholds = {k: float(v) for k, v in manifest["thresholds"].items()}
    target = ""
    found = False
    off: list[str] = []
    for finding, points in dict(table.get("findings", {})).items():
        for point in points:
            if point.get("name") == chosen and point.get("off"):
                off.append(finding)
                target, found = str(point.get("target", "")), True
            elif point.get("name") == chosen:
                t = float(point["threshold"])
                if not 0.0 < t < 1.0:
                    raise BundleError(f"operating point {chosen!r} of {finding}: threshold {t} is not in (0, 1)")
                thresholds[finding], target, found = t, str(point.get("target", "")), True
    if not found:
        names = sorted({p.get("name") for pts in dict(table.get("findings", {})).values() for p in pts})
        raise BundleError(f"bundle {manifest.get('name')!r} has no operating point {chosen!r}; "
                          f"it has {', '.join(names) or 'none'}")
    return chosen, target, thresholds, tuple(sorted(off))


@dataclass
class Bundle:
    """A loaded bundle: its folder, its manifest and its tensors (on CPU)."""

    path: Path
    manifest: dict
    state_dict: dict[str, torch.Tensor]

    @property
    def identity(self) -> ModelIdentity:
        point = dict(self.manifest.get("operating_point") or {})
        if not point.get("name"):
            # No named point (a manifest without operating_points): the plain identity.
            return ModelIdentity(name=self.manifest["name"], version=str(self.manifest["version"]),
                                 family=self.manifest.get("family", "Artificial Intelligence"))
        return OperatingIdentity(name=self.manifest["name"], version=str(self.manifest["version"]),
                                 family=self.manifest.get("family", "Artificial Intelligence"),
                                 operating_point=str(point.get("name", "")),
                                 operating_target=str(point.get("target", "")),
                                 off=tuple(point.get("off", ())))

    @property
    def kind(self) -> str:
        """``architecture.kind`` of the manifest (empty when the manifest has none)."""
        return str(dict(self.manifest.get("architecture") or {}).get("kind", ""))

    @property
    def where(self) -> str:
        """The bundle's folder for messages (``<in memory>`` for a bundle built in code)."""
        return str(self.path) if self.path is not None else "<in memory>"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_bundle_dir(name_or_path: str | os.PathLike) -> Path:
    """A bundle folder from a path, or from a name under the shipped models/ folder."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    shipped = MODELS_DIR / str(name_or_path)
    if shipped.is_dir():
        return shipped
    raise BundleError(f"model bundle {name_or_path!s} not found (looked at {path} and {shipped})")


def load_bundle(name_or_path: str | os.PathLike, operating_point: str = "") -> Bundle:
    """Read a bundle's manifest and weights, checking completeness and the weights' digest.

    ``operating_point`` names one of the manifest's operating points ("" = its default, or
    its plain ``thresholds`` when it has none); the loaded manifest's ``thresholds`` are
    that point's and ``manifest["operating_point"]`` records ``{"name", "target"}``.
    """
    path = resolve_bundle_dir(name_or_path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks required keys: {', '.join(missing)}")
    weights = path / manifest["weights"]
    if weights.suffix != ".safetensors":
        raise BundleError(f"weights must be a .safetensors file, manifest names {weights.name}")
    if not weights.is_file():
        raise BundleError(f"weights file {weights} is missing")
    actual = _sha256(weights)
    if actual != manifest["weights_sha256"]:
        raise BundleError(f"{weights} has SHA-256 {actual}, manifest says {manifest['weights_sha256']}")
    name, target, thresholds, off = _operating_point(manifest, operating_point)
    manifest = dict(manifest, thresholds=thresholds, operating_point={"name": name, "target": target, "off": list(off)})
    return Bundle(path=path, manifest=manifest, state_dict=load_file(str(weights), device="cpu"))


def save_bundle(path: str | os.PathLike, manifest: dict, state_dict: dict[str, torch.Tensor],
                weights_name: str = "weights.safetensors") -> Path:
    """Write a bundle folder; fills in ``weights`` and ``weights_sha256`` of the manifest.

    Parameters
    ----------
    path
        The bundle folder (created if missing; existing files of the same names are replaced).
    manifest
        Every key of :data:`REQUIRED_KEYS` except ``weights`` and ``weights_sha256``.
    state_dict
        The tensors to store (moved to the CPU, made contiguous); names as the model class's
        :func:`load_weights` expects them.
    weights_name
        File name of the safetensors file inside ``path``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = path / weights_name
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(weights))
    manifest = dict(manifest, weights=weights_name, weights_sha256=_sha256(weights))
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"manifest lacks required keys: {', '.join(missing)}")
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


_operating_point = operating_point


def require_kind(bundle: Bundle, kind: str) -> None:
    """Raise :class:`BundleError` unless ``bundle`` is a bundle of architecture ``kind``."""
    if bundle.kind != kind:
        raise BundleError(f"bundle {bundle.where} is a {bundle.kind!r} bundle, not a {kind!r} bundle; "
                          f"its manifest's architecture.kind must be {kind!r} to load it as one "
                          f"(or load it with the model class of kind {bundle.kind!r})")


def load_weights(module: nn.Module, bundle: Bundle, kind: str) -> nn.Module:
    """Put ``bundle``'s tensors into ``module`` after checking the bundle is of ``kind``.

    Every tensor of ``module.state_dict()`` must be in the bundle with the same shape, and the
    bundle may hold nothing else (``strict=True``); a model of several networks passes them as
    one :class:`torch.nn.ModuleDict` whose keys prefix the tensor names (the microcalc
    ``detector.*`` and ``segmentator.*``). Returns ``module``.

    Parameters
    ----------
    module
        The network, built from the bundle's ``architecture`` config, on the CPU.
    bundle
        A loaded :class:`Bundle`; its ``state_dict`` is on the CPU.
    kind
        The ``architecture.kind`` the caller's model class serves (``glam``, ``dunet``,
        ``microcalc``).

    Raises
    ------
    BundleError
        The bundle is of another kind, or its tensors do not match the architecture (missing,
        unexpected or differently shaped tensors are listed); the message names the folder.
    """
    require_kind(bundle, kind)
    expected = module.state_dict()
    given = bundle.state_dict
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
                      for k in set(expected) & set(given) if given[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("shape bundle != architecture", reshaped)) if keys]
        raise BundleError(f"weights of bundle {bundle.where} do not match its {kind} architecture: "
                          f"{'; '.join(parts)}. The manifest's architecture must be the config the "
                          f"weights were trained with: re-export the bundle from its checkpoint.")
    try:
        module.load_state_dict(given, strict=True)
    except RuntimeError as exc:  # dtype or other mismatches load_state_dict refuses
        raise BundleError(f"weights of bundle {bundle.where} do not match its {kind} architecture: {exc}") from exc
    return module
