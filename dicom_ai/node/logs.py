"""Structured logs: one JSON object per line, never any patient-identifying attribute.

Every event has ``ts`` (UTC ISO 8601 with milliseconds), ``level``, ``proc``
(scp/worker/delivery/node), ``pid`` and ``event`` plus its own fields: UIDs, AE titles,
states, counts, error text. The node never reads patient attributes into an event; as a
second line of defence, fields named like a patient attribute are dropped before writing
(:class:`ForbiddenFieldsFilter`, on every handler).

Built on :mod:`logging`: :func:`event` logs a record on the ``dicom_ai.node.events`` logger
with the fields attached; :class:`JsonFormatter` turns it into the line. :func:`configure`
puts the same handlers (stderr and the log file) on that logger and on ``pynetdicom``'s, so
pynetdicom's warnings come out as ``"event": "pynetdicom"`` lines in the same file.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["FORBIDDEN_FIELDS", "EVENT_LOGGER", "JsonFormatter", "ForbiddenFieldsFilter", "configure", "event"]

#: Field names that must never be written.
FORBIDDEN_FIELDS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
    "patient_name", "patient_id", "birth_date", "accession_number",
})

#: The logger :func:`event` writes to.
EVENT_LOGGER = "dicom_ai.node.events"

# The record attribute that carries an event's fields from event() to the formatter.
_FIELDS = "event_fields"

_events = logging.getLogger(EVENT_LOGGER)
_pynetdicom = logging.getLogger("pynetdicom")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``proc``, ``pid``, ``event``, then the fields.

    A record from :func:`event` carries its fields; any other record (pynetdicom's) becomes
    the event named after its top-level logger with the message as ``message``. Values that
    JSON cannot hold as they are (UIDs, paths, enums) are written as their ``str``.
    """

    def __init__(self, proc: str):
        super().__init__()
        self.proc = proc

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = getattr(record, _FIELDS, None)
        if fields is None:
            # pynetdicom's: only WARNING and ERROR reach here (its logger is at WARNING), and
            # the node has always reported them as one of those two levels.
            level = record.levelname if record.levelname in ("WARNING", "ERROR") else "WARNING"
            name = record.name.partition(".")[0]
            fields = {"message": record.getMessage()[:500]}
        else:
            level, name = record.levelname, record.getMessage()
        line = {"ts": ts, "level": level, "proc": self.proc, "pid": record.process, "event": name}
        for key, value in fields.items():
            if key in FORBIDDEN_FIELDS:  # the filter has dropped them already; a formatter used alone must too
                continue
            line[key] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
        return json.dumps(line, ensure_ascii=False)


class ForbiddenFieldsFilter(logging.Filter):
    """Drops patient-identifying fields (:data:`FORBIDDEN_FIELDS`) from a record; never the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, _FIELDS, None)
        if fields and not FORBIDDEN_FIELDS.isdisjoint(fields):
            setattr(record, _FIELDS, {k: v for k, v in fields.items() if k not in FORBIDDEN_FIELDS})
        return True


class _QuietStreamHandler(logging.StreamHandler):
    # A closed stderr or a full disk must not stop the node, nor should each failed line
    # print a traceback (logging's default) to the stderr that may be the broken sink.
    def handleError(self, record: logging.LogRecord) -> None:
        pass


class _QuietFileHandler(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _level_number(level: str) -> int:
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    return number


def configure(proc: str, level: str = "INFO", path: Path | None = None, stream=sys.stderr) -> None:
    """Set this process's name, minimum level and sinks, replacing those of an earlier call.

    Parameters
    ----------
    proc : str
        The ``proc`` value of every line (``node``, ``worker``, ...).
    level : str
        The lowest level written (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``); pynetdicom is
        kept at WARNING whatever this is, because at DEBUG it logs data set summaries.
    path : Path or None
        A log file to append to (its folder is created), flushed after every line; ``None``
        for none.
    stream : text stream or None
        Where else each line goes (default stderr); ``None`` for nowhere.
    """
    number = _level_number(level)
    handlers: list[logging.Handler] = []
    if stream is not None:
        handlers.append(_QuietStreamHandler(stream))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(_QuietFileHandler(path, mode="a", encoding="utf-8"))
    formatter, forbidden = JsonFormatter(proc), ForbiddenFieldsFilter()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(forbidden)
        handler.setLevel(number)
    _install(_events, handlers, number)
    _install(_pynetdicom, handlers, logging.WARNING)


def _install(logger: logging.Logger, handlers: list[logging.Handler], level: int) -> None:
    for old in logger.handlers[:]:
        logger.removeHandler(old)
        if old not in handlers:
            old.close()  # the previous log file; a stream handler does not close its stream
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
    # Not to the root logger: an application or test harness that logs there must not get
    # (or re-format) the node's lines a second time.
    logger.propagate = False


def event(name: str, level: str = "INFO", **fields: Any) -> None:
    """Write one event line: ``name`` at ``level`` (a :mod:`logging` level name) with ``fields``."""
    number = _level_number(level)
    if _events.isEnabledFor(number):
        _events.log(number, name, extra={_FIELDS: fields})


# Until configure() is called (a library user, a test), events go to stderr as before; pynetdicom
# keeps its own default (silent) set-up until then.
_default = _QuietStreamHandler(sys.stderr)
_default.setFormatter(JsonFormatter("node"))
_default.addFilter(ForbiddenFieldsFilter())
_install(_events, [_default], logging.INFO)
