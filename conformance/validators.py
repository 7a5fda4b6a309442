"""Run the reference DICOM validators on a file and parse what they say.

The validators' exit codes are unreliable (dciodvfy returns 0 with errors on SR, PixelMed
always returns 0), so the verdict comes from their output lines. Each function raises
``FileNotFoundError`` with an install hint when its program is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PIXELMED_JAR = "/usr/share/java/pixelmed.jar"
# JDK 17's XPath limits crash PixelMed's XSLT unless lifted.
_PIXELMED_JAVA = ["java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                  "-Djdk.xml.xpathTotalOpLimit=0", "-cp", PIXELMED_JAR]


@dataclass
class Report:
    """A validator's verdict on one file: ``errors`` and ``warnings`` are its message lines."""

    tool: str
    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors


def _require(program: str, package: str) -> str:
    found = shutil.which(program)
    if not found:
        raise FileNotFoundError(f"{program} not found; install the Debian package {package}")
    return found


def _run(cmd: list[str], timeout: float = 120) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.stdout + proc.stderr


def dciodvfy(path: str | Path) -> Report:
    """dicom3tools' IOD validator; errors are its ``Error -`` lines."""
    out = _run([_require("dciodvfy", "dicom3tools"), str(path)])
    lines = out.splitlines()
    return Report("dciodvfy", str(path), [l for l in lines if l.startswith("Error")],
                  [l for l in lines if l.startswith("Warning")], out)


def pixelmed_sr(path: str | Path) -> Report:
    """PixelMed's DicomSRValidator (template checks, TID 1500 among them)."""
    _require("java", "default-jre-headless")
    if not Path(PIXELMED_JAR).is_file():
        raise FileNotFoundError(f"{PIXELMED_JAR} not found; install the Debian package pixelmed-apps")
    out = _run(_PIXELMED_JAVA + ["com.pixelmed.validate.DicomSRValidator", str(path)], timeout=300)
    lines = out.splitlines()
    errors = [l for l in lines if l.startswith("Error")]
    if "Exception" in out and "Root Template Validation Complete" not in out:
        errors.append("PixelMed crashed: " + next(l for l in lines if "Exception" in l))
    return Report("pixelmed-sr", str(path), errors, [l for l in lines if l.startswith("Warning")], out)


def pixelmed_instance(path: str | Path) -> Report:
    """PixelMed's DicomInstanceValidator (knows Segmentation, not MG)."""
    if not Path(PIXELMED_JAR).is_file():
        raise FileNotFoundError(f"{PIXELMED_JAR} not found; install the Debian package pixelmed-apps")
    out = _run(_PIXELMED_JAVA + ["com.pixelmed.validate.DicomInstanceValidator", str(path)], timeout=300)
    lines = out.splitlines()
    return Report("pixelmed-instance", str(path), [l for l in lines if l.startswith("Error")],
                  [l for l in lines if l.startswith("Warning")], out)


def dsrdump(path: str | Path) -> Report:
    """dcmtk's SR renderer; it reports an invalid tree with ``E:``/``F:`` lines."""
    out = _run([_require("dsrdump", "dcmtk"), str(path)])
    lines = out.splitlines()
    return Report("dsrdump", str(path), [l for l in lines if l.startswith(("E:", "F:"))],
                  [l for l in lines if l.startswith("W:")], out)


def tid1500reader(path: str | Path, out_json: str | Path) -> Report:
    """dcmqi's TID 1500 reader (PyPI dcmqi); errors when it cannot parse the SR."""
    exe = shutil.which("tid1500reader") or str(Path(sys.executable).parent / "tid1500reader")
    if not Path(exe).exists():
        raise FileNotFoundError("tid1500reader not found; pip install dcmqi")
    proc = subprocess.run([exe, "--inputDICOM", str(path), "--outputMetadata", str(out_json)],
                          capture_output=True, text=True, timeout=120)
    errors = [] if proc.returncode == 0 and Path(out_json).is_file() else [f"rc={proc.returncode}"]
    return Report("tid1500reader", str(path), errors, [], proc.stdout + proc.stderr)
