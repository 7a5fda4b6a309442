"""Structured logs: one JSON object per line, never any patient-identifying attribute.

Every event has ``ts`` (UTC ISO 8601), ``level``, ``proc`` (scp/worker/delivery/node) and
``event`` plus its own fields: UIDs, AE titles, states, counts, error text. The node never reads
patient attributes into an event; as a second line of defence, fields named like a patient
attribute are dropped before writing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: Field names that must never be written.
FORBIDDEN_FIELDS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
    "patient_name", "patient_id", "birth_date", "accession_number",
})

_lock = threading.Lock()
_stream = sys.stderr
_file = None
_level = logging.INFO
_proc = "node"


def configure(proc: str, level: str = "INFO", path: Path | None = None, stream=sys.stderr) -> None:
    """Set this process's name, minimum level and sinks (a file is appended to, line-buffered)."""
    global _stream, _file, _level, _proc
    _proc = proc
    _level = logging.getLevelName(level.upper())
    _stream = stream
    if _file is not None:
        _file.close()
        _file = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _file = open(path, "a", buffering=1, encoding="utf-8")
    # pynetdicom logs PDUs and, at DEBUG, data set summaries: keep it at WARNING and
    # route it through the same JSON lines.
    pnd = logging.getLogger("pynetdicom")
    pnd.handlers[:] = [_Bridge()]
    pnd.setLevel(logging.WARNING)
    pnd.propagate = False


def event(name: str, level: str = "INFO", **fields: Any) -> None:
    """Write one event line."""
    lvl = logging.getLevelName(level)
    if lvl < _level:
        return
    record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
              "level": level, "proc": _proc, "pid": os.getpid(), "event": name}
    for key, value in fields.items():
        if key in FORBIDDEN_FIELDS:
            continue
        record[key] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
    line = json.dumps(record, ensure_ascii=False)
    with _lock:
        for sink in (_stream, _file):
            if sink is not None:
                try:
                    sink.write(line + "\n")
                    sink.flush()
                except (OSError, ValueError):
                    pass


class _Bridge(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        event("pynetdicom", level=record.levelname if record.levelname in ("WARNING", "ERROR") else "WARNING",
              message=record.getMessage()[:500])
