"""Audit trail: IHE ATNA / DICOM PS3.15 Annex A.5 audit messages, sent as RFC 5424 syslog.

Each message is one ``<AuditMessage>`` XML document (PS3.15 A.5.1) with
``EventIdentification``, ``ActiveParticipant`` (the node and the remote AE),
``AuditSourceIdentification`` and, where an object is concerned,
``ParticipantObjectIdentification`` (the study: Study Instance UID, SOP class and number of
instances). It is sent in an RFC 5424 syslog message (facility 10 authpriv, severity 5
notice or 4 warning for failures, APP-NAME ``dicom-ai``, MSGID ``IHE+RFC-3881``, as IHE ITI
ATNA asks) to ``[audit] sink``:

* ``file``: one message per line appended to ``audit.file`` (default
  ``<storage>/logs/audit.log``); opened O_APPEND and never rewritten or truncated by the
  node, reopened when logrotate moves it (:class:`logging.handlers.WatchedFileHandler`);
* ``udp``: RFC 5426 (one datagram per message, :class:`logging.handlers.SysLogHandler`);
* ``tcp`` / ``tls``: RFC 6587 / RFC 5425 octet-counting framing (``LEN SP MSG``), TLS with
  the ``[tls]`` certificate (the node authenticates itself to the repository) and CA bundle.

Events (the DCM codes of PS3.16 CID 400-403):

===================================  =================================  =========================
node action                          EventID                            EventTypeCode
===================================  =================================  =========================
node start / stop                    110100 Application Activity        110120 / 110121
association accepted                 110102 Begin Transferring DICOM    -
association ended (per study got)    110104 DICOM Instances Transferred -
connection refused (any reason)      110113 Security Alert              110126 Node Authentication
results sent / delivery failed       110104 DICOM Instances Transferred -
images left out of an analysis       110103 DICOM Instances Accessed    - (outcome 4, UIDs and why)
``dicom-ai retry`` (operator)        110113 Security Alert              110131 Software Configuration
===================================  =================================  =========================

Patient. PS3.15 asks for the patient as a participant object of 110104; the node leaves it
out unless ``audit.include_patient_ids = true`` (then Patient ID only, never the name), for
sites whose audit repository must have it. The audit file is owner-only (0600) like the rest
of the storage. Sending never blocks or fails the node: a collector that is down costs its
messages (logged once as ``audit_send_failed``), as with any syslog over UDP.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import pwd
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dicom_ai.node import logs
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.tls import client_context

__all__ = ["Participant", "StudyObject", "configure", "emit", "application_activity", "association_started",
           "instances_transferred", "instances_left_out", "security_alert", "RFC5424Formatter", "AUDIT_LOGGER"]

AUDIT_LOGGER = "dicom_ai.audit"
_logger = logging.getLogger(AUDIT_LOGGER)
_logger.propagate = False
_logger.setLevel(logging.INFO)

FACILITY_AUTHPRIV = 10
MSGID = "IHE+RFC-3881"

# EventOutcomeIndicator (PS3.15 A.5.1): 0 success, 4 minor failure, 8 serious failure.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8

_state = {"source_id": "DICOM_AI", "site": "", "patient_ids": False, "node_ae": "DICOM_AI",
          "host": socket.gethostname()}


@dataclass
class Participant:
    """An ActiveParticipant: an AE (``AE`` + network address) or the person at the CLI."""

    user_id: str
    role: tuple[str, str] | None = None  # (DCM code, meaning): 110153 Source, 110152 Destination
    requestor: bool = False
    address: str = ""
    alternative_user_id: str = ""


@dataclass
class StudyObject:
    """A ParticipantObjectIdentification of a study (type 2 system object, role 3 report)."""

    study_uid: str
    sop_classes: dict[str, int] = field(default_factory=dict)  # SOP Class UID -> number of instances
    patient_id: str = ""  # used only when audit.include_patient_ids


SOURCE_ROLE = ("110153", "Source Role ID")
DESTINATION_ROLE = ("110152", "Destination Role ID")
APPLICATION_ROLE = ("110150", "Application")
LAUNCHER_ROLE = ("110151", "Application Launcher")


def _code(parent: ET.Element, tag: str, code: str, meaning: str, scheme: str = "DCM") -> None:
    ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": scheme, "originalText": meaning})


def message(event_id: tuple[str, str], outcome: int, action: str, participants: list[Participant],
            objects: list[StudyObject] = (), event_type: tuple[str, str] | None = None,
            description: str = "") -> str:
    """One ``<AuditMessage>`` as XML text (PS3.15 A.5.1), without patient data unless configured.

    Parameters
    ----------
    event_id : (str, str)
        DCM code and meaning of the EventID.
    outcome : int
        EventOutcomeIndicator: 0, 4 or 8.
    action : str
        EventActionCode: C, R, U, D or E.
    participants : list of Participant
        The ActiveParticipants; the node itself is added by the caller.
    objects : list of StudyObject
        Studies concerned (ParticipantObjectIdentification).
    event_type : (str, str) or None
        An EventTypeCode.
    description : str
        EventOutcomeDescription (why it failed; no data set values).
    """
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action, "EventOutcomeIndicator": str(outcome),
        "EventDateTime": datetime.now(timezone.utc).isoformat(timespec="milliseconds")})
    _code(ev, "EventID", *event_id)
    if event_type is not None:
        _code(ev, "EventTypeCode", *event_type)
    if description:
        ET.SubElement(ev, "EventOutcomeDescription").text = description[:500]
    for p in participants:
        attrs = {"UserID": p.user_id, "UserIsRequestor": "true" if p.requestor else "false"}
        if p.alternative_user_id:
            attrs["AlternativeUserID"] = p.alternative_user_id
        if p.address:
            attrs["NetworkAccessPointID"] = p.address
            attrs["NetworkAccessPointTypeCode"] = "2"  # IP address
        el = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role is not None:
            _code(el, "RoleIDCode", *p.role)
    src = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": _state["source_id"]})
    if _state["site"]:
        src.set("AuditEnterpriseSiteID", _state["site"])
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4", "codeSystemName": "DCM",
                                                 "originalText": "Application Server Process"})
    for obj in objects:
        el = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": obj.study_uid, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _code(el, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
        for uid, n in sorted(obj.sop_classes.items()):
            ET.SubElement(el, "SOPClass", {"UID": uid, "NumberOfInstances": str(n)})
        if _state["patient_ids"] and obj.patient_id:
            pat = ET.SubElement(root, "ParticipantObjectIdentification", {
                "ParticipantObjectID": obj.patient_id, "ParticipantObjectTypeCode": "1",
                "ParticipantObjectTypeCodeRole": "1"})
            _code(pat, "ParticipantObjectIDTypeCode", "2", "Patient Number", scheme="RFC-3881")
    return ET.tostring(root, encoding="unicode")


class RFC5424Formatter(logging.Formatter):
    """``VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`` (RFC 5424 6.1), without ``<PRI>``.

    The handler adds ``<PRI>`` (:class:`~logging.handlers.SysLogHandler` does for UDP; the
    file and stream handlers here do it through :func:`pri`).
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        ts = ts.replace("+00:00", "Z")
        return f"1 {ts} {_state['host'][:255]} dicom-ai {record.process} {MSGID} - {record.getMessage()}"


def pri(record: logging.LogRecord) -> str:
    severity = 4 if record.levelno >= logging.WARNING else 5
    return f"<{FACILITY_AUTHPRIV * 8 + severity}>"


class _AuditFileHandler(logging.handlers.WatchedFileHandler):
    """One ``<PRI>`` RFC 5424 message per line, appended; reopened after logrotate moves the file."""

    def format(self, record: logging.LogRecord) -> str:
        return pri(record) + super().format(record)

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def handleError(self, record):
        _report_failure("file")


class _UdpHandler(logging.handlers.SysLogHandler):
    def __init__(self, host: str, port: int):
        super().__init__((host, port), facility=FACILITY_AUTHPRIV, socktype=socket.SOCK_DGRAM)
        self.append_nul = False

    def mapPriority(self, levelName):
        return "warning" if levelName in ("WARNING", "ERROR", "CRITICAL") else "notice"

    def handleError(self, record):
        _report_failure("udp")


class _StreamHandler(logging.Handler):
    """RFC 6587 octet counting over TCP, or RFC 5425 over TLS; reconnects on the next message."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, timeout: float = 5.0):
        super().__init__()
        self.host, self.port, self.context, self.timeout = host, port, context, timeout
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_hostname=self.host)
        return sock

    def emit(self, record: logging.LogRecord) -> None:
        data = (pri(record) + self.format(record)).encode("utf-8")
        frame = str(len(data)).encode() + b" " + data
        for _ in range(2):  # once more on a fresh connection if the old one went away
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(frame)
                return
            except OSError:
                if self._sock is not None:
                    self._sock.close()
                self._sock = None
        _report_failure("tcp" if self.context is None else "tls")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


_failures_reported: set[str] = set()
_lock = threading.Lock()


def _report_failure(sink: str) -> None:
    with _lock:
        if sink in _failures_reported:
            return
        _failures_reported.add(sink)
    logs.event("audit_send_failed", level="ERROR", sink=sink,
               hint="audit messages are being lost: check [audit] and the audit record repository")


def configure(config: NodeConfig) -> None:
    """Point this process's audit messages at ``[audit] sink`` (replacing an earlier call)."""
    a = config.audit
    _state.update(source_id=a.source_id or config.node.ae_title, site=a.enterprise_site_id,
                  patient_ids=a.include_patient_ids, node_ae=config.node.ae_title)
    for old in _logger.handlers[:]:
        _logger.removeHandler(old)
        old.close()
    _failures_reported.clear()
    if a.sink == "off":
        return
    if a.sink == "file":
        path = config.audit_file
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = _AuditFileHandler(str(path), encoding="utf-8")
    elif a.sink == "udp":
        handler = _UdpHandler(a.host, a.port)
    else:
        context = None
        if a.sink == "tls":
            context = client_context(config.tls)
        handler = _StreamHandler(a.host, a.port, context)
    handler.setFormatter(RFC5424Formatter())
    _logger.addHandler(handler)


def emit(xml: str, failed: bool = False) -> None:
    """Send one audit message (an :func:`message` document)."""
    if _logger.handlers:
        _logger.log(logging.WARNING if failed else logging.INFO, xml)


def _node(role=None, requestor=False, address="") -> Participant:
    return Participant(user_id=_state["node_ae"], alternative_user_id=str(os.getpid()), role=role,
                       requestor=requestor, address=address)


def application_activity(started: bool, who: str = "") -> None:
    """110100 Application Activity: the node started (110120) or stopped (110121)."""
    people = [_node(APPLICATION_ROLE)]
    if who:
        people.append(Participant(user_id=who, role=LAUNCHER_ROLE, requestor=True))
    emit(message(("110100", "Application Activity"), SUCCESS, "E", people,
                 event_type=("110120", "Application Start") if started else ("110121", "Application Stop")))


def association_started(calling_ae: str, address: str) -> None:
    """110102 Begin Transferring DICOM Instances: an association from ``calling_ae`` was accepted."""
    emit(message(("110102", "Begin Transferring DICOM Instances"), SUCCESS, "E",
                 [Participant(calling_ae, SOURCE_ROLE, True, address), _node(DESTINATION_ROLE)]))


def instances_transferred(source: Participant, destination: Participant, studies: list[StudyObject],
                          outcome: int = SUCCESS, description: str = "") -> None:
    """110104 DICOM Instances Transferred (received by the node, or results sent by it)."""
    action = "C" if destination.user_id == _state["node_ae"] else "R"
    emit(message(("110104", "DICOM Instances Transferred"), outcome, action, [source, destination], studies,
                 description=description), failed=outcome != SUCCESS)


def instances_left_out(study: StudyObject, description: str) -> None:
    """110103 DICOM Instances Accessed (read, minor failure): the worker analysed ``study`` but
    left images out; ``description`` names their SOP Instance UIDs and why (no data set values)."""
    emit(message(("110103", "DICOM Instances Accessed"), MINOR_FAILURE, "R", [_node(APPLICATION_ROLE)], [study],
                 description=description), failed=True)


def security_alert(event_type: tuple[str, str], description: str, who: Participant | None = None,
                   outcome: int = MINOR_FAILURE) -> None:
    """110113 Security Alert: a refused node (110126) or an operator action (110131)."""
    people = [_node(APPLICATION_ROLE)] + ([who] if who is not None else [])
    emit(message(("110113", "Security Alert"), outcome, "E", people, event_type=event_type,
                 description=description), failed=outcome != SUCCESS)


def node_participant(role, address: str = "") -> Participant:
    """The node itself as an ActiveParticipant in ``role``."""
    return _node(role, address=address)


def operator() -> str:
    """The login name of whoever runs a CLI command (for the audit trail)."""
    # By uid, not $USER/$LOGNAME, which the caller sets.
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # no passwd entry (a container)
        return str(os.getuid())


