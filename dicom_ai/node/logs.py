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

Libraries that print data set values: pydicom's ``UserWarning`` warnings and its logger (through
``warn_and_log``) quote raw element values, highdicom logs at INFO. :func:`capture_warnings`
(called by :func:`configure`, and by the ``dicom-ai`` command) turns every warning and every
record of those loggers into a ``warning`` / ``library_log`` event that names the category,
the module and the attributes (tags, keywords) mentioned, never the message text. Error text
that has to be kept (a skipped image's note, a job's error) goes through :func:`scrub` first.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_dict

__all__ = ["FORBIDDEN_FIELDS", "EVENT_LOGGER", "JsonFormatter", "ForbiddenFieldsFilter", "capture_warnings",
           "configure", "dicom_references", "event", "log_warning", "scrub"]

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


class _QuietFileHandler(logging.handlers.WatchedFileHandler):
    # WatchedFileHandler: the node never rotates its log itself; logrotate (or any tool) may
    # move the file away, and the next line reopens node.log (no copytruncate needed).
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
        A log file to append to (its folder is created), flushed after every line, and
        reopened when it has been moved or removed (logrotate); ``None`` for none.
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
    # psycopg_pool warns at every failed reconnect (plain text on stderr through logging's
    # last resort); the job store's callers report an unreachable server themselves, once.
    _install(logging.getLogger("psycopg"), handlers, logging.ERROR)
    capture_warnings()


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


# -- keeping data set values out of logs and consoles -------------------------------------------

#: Loggers of libraries that put data set values into their messages; their records become
#: scrubbed ``library_log`` events (pynetdicom's are configured above, at WARNING).
VALUE_LOGGERS = ("pydicom", "highdicom")

_TAG = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
_QUOTED = re.compile(r"""b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*"|\[[^\]]*\]|\{[^}]*\}""")
_UID = re.compile(r"[0-9]+(?:\.[0-9]+){2,}")
_NUMBER = re.compile(r"(?:0x[0-9A-Fa-f]{1,8}|[0-9]{1,4}(?:\.[0-9]+)?)")
_WORD = re.compile(r"[a-z][a-z'-]*")
_CLASS = re.compile(r"[A-Z][A-Za-z]*(?:Error|Exception|Warning)")
_VRS = frozenset("AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
                 "UR US UT UV VR".split())
_EDGE = ".,;:!?()<>"
_REDACTED = "…"


def scrub(text: str, limit: int = 500) -> str:
    """``text`` (an exception message) with everything that may be a data set value removed.

    Kept: lower-case words, DICOM tags ``(gggg,eeee)``, attribute keywords, VR names, UIDs,
    numbers of up to four digits, exception class names, and a capitalised word that starts
    a sentence. Everything else (quoted or bracketed text, byte strings, names, IDs, dates,
    longer digit runs, words with digits or ``^``) becomes ``…``. Meant for text that is
    stored or printed (a job's error, a skipped image's note), where readability matters
    less than never carrying a patient's name, ID, birth date or accession number.

    Parameters
    ----------
    text : str
        The message to scrub.
    limit : int
        The most characters returned.
    """
    text = _QUOTED.sub(_REDACTED, _TAG.sub(lambda m: f"({m[1]},{m[2]})", str(text)))
    out, sentence_start = [], True
    for token in text.split():
        core = token.strip(_EDGE)
        head, tail = token[:token.find(core)] if core else token, token[token.find(core) + len(core):] if core else ""
        keep = (not core or _TAG.fullmatch(token.strip(",.;:")) or _UID.fullmatch(core) or _NUMBER.fullmatch(core)
                or _WORD.fullmatch(core) or _CLASS.fullmatch(core) or core in _VRS or core in keyword_dict
                or (sentence_start and re.fullmatch(r"[A-Z][a-z]+", core)) or core == _REDACTED)
        piece = token if keep else f"{head}{_REDACTED}{tail}"
        if not out or piece != out[-1] or piece != _REDACTED:
            out.append(piece)
        sentence_start = token.endswith(".")
    return " ".join(out)[:limit]


def dicom_references(text: str) -> str:
    """The DICOM tags and attribute keywords that ``text`` mentions, comma-separated, in order.

    This is all a captured warning or library record keeps of its message: what it is about,
    never the value it quoted.
    """
    found: list[str] = []
    for m in _TAG.finditer(str(text)):
        found.append(f"({m[1]},{m[2]})".upper())
    for word in re.findall(r"[A-Za-z]+", _QUOTED.sub(" ", str(text))):
        if word in keyword_dict and len(word) > 3:
            found.append(word)
    return ",".join(dict.fromkeys(found))


def _module_of(filename: str) -> str:
    # ".../site-packages/pydicom/valuerep.py" -> "pydicom.valuerep": says where, not what.
    parts = Path(filename).with_suffix("").parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return ".".join(parts[parts.index(anchor) + 1:])
    return ".".join(parts[-2:])


def log_warning(message: Warning | str, category: type[Warning] | str, filename: str, lineno: int = 0) -> None:
    """Write one warning as a ``warning`` event: category, module, attributes; never its text.

    Parameters
    ----------
    message : Warning or str
        The warning (its text is read only for the tags and keywords it names).
    category : type or str
        The warning class (or its name, for a warning raised in another process).
    filename : str
        The file that raised it; logged as a module name.
    lineno : int
        The line in that file.
    """
    module = _module_of(filename)
    fields = {}
    if module.split(".", 1)[0] in _OWN_TEXT_MODULES:
        # Celery's own warnings (running as root, broker settings) carry no data set value and
        # only make sense with their text; an empty line helps nobody.
        fields["message"] = " ".join(str(message).split())[:500]
    event("warning", level="WARNING", category=getattr(category, "__name__", str(category)), module=module,
          line=lineno, attributes=dicom_references(str(message)), **fields)


#: Modules whose warnings keep their text: they never see a data set.
_OWN_TEXT_MODULES = frozenset({"celery", "kombu", "billiard"})


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    log_warning(message, category, filename, lineno)


class _ScrubbedLibraryHandler(logging.Handler):
    """Re-logs a library record as a ``library_log`` event without its message text."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not format is still reported
            text = ""
        level = record.levelname if record.levelname in ("WARNING", "ERROR", "CRITICAL") else "WARNING"
        event("library_log", level=level, logger=record.name, module=record.module, line=record.lineno,
              attributes=dicom_references(text))


_library_handler = _ScrubbedLibraryHandler()


def capture_warnings() -> None:
    """Route every warning and the value-quoting libraries' logs through scrubbed events.

    Replaces :func:`warnings.showwarning` (the documented hook) with one that writes a
    ``warning`` event, and gives the loggers in :data:`VALUE_LOGGERS` one handler that
    writes a ``library_log`` event for each record at WARNING or above; neither keeps the
    message text. The loggers do not propagate, so no record reaches the root logger or
    logging's last-resort stderr handler. Safe to call more than once.
    """
    warnings.showwarning = _show_warning
    for name in VALUE_LOGGERS:
        logger = logging.getLogger(name)
        for old in logger.handlers[:]:
            logger.removeHandler(old)
        logger.addHandler(_library_handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


# Until configure() is called (a library user, a test), events go to stderr as before; pynetdicom
# keeps its own default (silent) set-up until then.
_default = _QuietStreamHandler(sys.stderr)
_default.setFormatter(JsonFormatter("node"))
_default.addFilter(ForbiddenFieldsFilter())
_install(_events, [_default], logging.INFO)
