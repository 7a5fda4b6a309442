"""Audit trail: IHE ATNA / PS3.15 A.5 messages as RFC 5424 syslog, read from a real syslog socket.

A UDP and a TCP (RFC 6587 octet counting) syslog receiver on loopback collect what a running
node and the ``dicom-ai retry`` command send; each message is parsed as RFC 5424 and its XML
checked against the structure of the DICOM audit message schema (PS3.15 A.5.1).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tls_certs import make_all
from node_harness import (ACCESSION, PATIENT_ID, PATIENT_NAME, PYTHON, REPO, free_port, log_events, node_env,
                          start_node, start_storescp, storescu, wait_delivered, wait_for, wait_port, write_node_config,
                          write_study)

pytestmark = pytest.mark.slow

RFC5424 = re.compile(r"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)) "
                     r"(?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) (?P<sd>-|\[.*?\]) (?P<msg>.*)$", re.S)
_CODE_ATTRS = {"csd-code", "codeSystemName", "originalText"}


class SyslogReceiver:
    """Collects syslog messages on 127.0.0.1 over UDP (one per datagram) or TCP (octet counting)."""

    def __init__(self, kind: str, tls: ssl.SSLContext | None = None):
        self.kind, self.messages, self._stop, self.tls = kind, [], False, tls
        self.peer_certificates: list[dict] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        if kind == "tcp":
            self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                if self.kind == "udp":
                    self.messages.append(self.sock.recv(65535).decode())
                else:
                    conn, _ = self.sock.accept()
                    if self.tls is not None:
                        conn.settimeout(5)
                        conn = self.tls.wrap_socket(conn, server_side=True)
                        self.peer_certificates.append(conn.getpeercert())
                    threading.Thread(target=self._read_stream, args=(conn,), daemon=True).start()
            except OSError:
                continue

    def _read_stream(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(10)
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b" " in buf:
                    length, _, rest = buf.partition(b" ")
                    if len(rest) < int(length):
                        break
                    self.messages.append(rest[:int(length)].decode())
                    buf = rest[int(length):]

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def parse(text: str) -> tuple[re.Match, ET.Element]:
    """One RFC 5424 message and its AuditMessage, checked against PS3.15 A.5.1's structure."""
    m = RFC5424.match(text)
    assert m, text[:200]
    assert int(m["pri"]) in (84, 85) and m["app"] == "dicom-ai" and m["msgid"] == "IHE+RFC-3881"
    root = ET.fromstring(m["msg"])
    assert root.tag == "AuditMessage"
    tags = [c.tag for c in root]
    assert tags[0] == "EventIdentification" and tags.count("EventIdentification") == 1
    assert tags.count("AuditSourceIdentification") == 1 and tags.count("ActiveParticipant") >= 1
    order = {"EventIdentification": 0, "ActiveParticipant": 1, "AuditSourceIdentification": 2,
             "ParticipantObjectIdentification": 3}
    assert [order[t] for t in tags] == sorted(order[t] for t in tags), tags  # the schema's sequence
    ev = root.find("EventIdentification")
    assert ev.get("EventActionCode") in tuple("CRUDE") and ev.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
    assert re.match(r"\d{4}-\d\d-\d\dT", ev.get("EventDateTime"))
    assert _CODE_ATTRS <= set(ev.find("EventID").attrib)
    for p in root.findall("ActiveParticipant"):
        assert p.get("UserID") and p.get("UserIsRequestor") in ("true", "false")
        role = p.find("RoleIDCode")
        assert role is None or _CODE_ATTRS <= set(role.attrib)
    assert root.find("AuditSourceIdentification").get("AuditSourceID")
    for o in root.findall("ParticipantObjectIdentification"):
        assert o.get("ParticipantObjectID") and o.get("ParticipantObjectTypeCode") in ("1", "2", "3", "4")
        assert _CODE_ATTRS <= set(o.find("ParticipantObjectIDTypeCode").attrib)
    return m, root


def event_id(root: ET.Element) -> str:
    return root.find("EventIdentification/EventID").get("csd-code")


def test_node_sends_atna_messages_to_a_udp_collector(tmp_path):
    collector = SyslogReceiver("udp")
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    port, dead = free_port(), free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", pacs_port)],
                            retry={"max_attempts": 1}, destinations=[("ARCHIVE", dead)])
    cfg.write_text(cfg.read_text() + f'[audit]\nsink = "udp"\nport = {collector.port}\n')
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        files = write_study(tmp_path / "study", seed=11)
        study_uid = __import__("pydicom").dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        assert storescu(port, files).returncode == 0
        wait_for(lambda: any('"delivery_attempt_failed"' in l for l in (tmp_path / "node.log").read_text().splitlines())
                 and any('"delivery_done"' in l for l in (tmp_path / "node.log").read_text().splitlines()),
                 60, "delivery to PACS done and to ARCHIVE failed")
    finally:
        node.stop()
        pacs.stop()
    wait_for(lambda: sum('110121' in m for m in collector.messages), 5, "the Application Stop message")
    collector.close()
    parsed = [parse(m) for m in collector.messages]
    roots = [r for _, r in parsed]
    ids = [event_id(r) for r in roots]
    assert ids[0] == "110100" and roots[0].find("EventIdentification/EventTypeCode").get("csd-code") == "110120"
    assert ids[-1] == "110100"
    assert "110102" in ids  # association accepted: Begin Transferring DICOM Instances
    transferred = [r for r in roots if event_id(r) == "110104"]
    received = [r for r in transferred if r.find("EventIdentification").get("EventActionCode") == "C"]
    sent = [r for r in transferred if r.find("EventIdentification").get("EventActionCode") == "R"]
    assert len(received) == 1
    study = received[0].find("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == study_uid
    assert sum(int(c.get("NumberOfInstances")) for c in study.findall("SOPClass")) == 4  # what storescu sent
    users = {p.get("UserID"): p for p in received[0].findall("ActiveParticipant")}
    assert users["PACS"].get("UserIsRequestor") == "true" and users["PACS"].find("RoleIDCode").get("csd-code") == "110153"
    ok = [r for r in sent if r.find("EventIdentification").get("EventOutcomeIndicator") == "0"]
    failed = [r for r in sent if r.find("EventIdentification").get("EventOutcomeIndicator") == "8"]
    assert len(ok) == 1 and {p.get("UserID") for p in ok[0].findall("ActiveParticipant")} == {"AINODE", "PACS"}
    assert len(failed) == 1 and "ARCHIVE" in {p.get("UserID") for p in failed[0].findall("ActiveParticipant")}
    assert "delivery failed" in failed[0].find("EventIdentification/EventOutcomeDescription").text
    assert failed[0].find("ParticipantObjectIdentification").get("ParticipantObjectID") == study_uid
    everything = "\n".join(collector.messages)
    for secret in (PATIENT_ID, PATIENT_NAME, ACCESSION):  # patient identifiers omitted by default
        assert secret not in everything


def test_retry_is_audited_over_tcp_and_patient_ids_only_when_enabled(tmp_path):
    collector = SyslogReceiver("tcp")
    storage = tmp_path / "storage"
    cfg = write_node_config(tmp_path / "node.toml", storage, free_port(), [("PACS", 104)])
    base = cfg.read_text()
    cfg.write_text(base + f'[audit]\nsink = "tcp"\nport = {collector.port}\n')
    # A job store to re-queue from: one made by the node's own class.
    from dicom_ai.node.jobstore import JobStore
    JobStore(storage / "jobs.sqlite")
    r = subprocess.run([PYTHON, "-m", "dicom_ai", "retry", "--config", str(cfg)], capture_output=True, text=True,
                       env=node_env(), cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: collector.messages, 5, "the retry audit message")
    collector.close()
    (m, root), = [parse(x) for x in collector.messages]
    assert event_id(root) == "110113"
    assert root.find("EventIdentification/EventTypeCode").get("csd-code") == "110131"
    assert "dicom-ai retry" in root.find("EventIdentification/EventOutcomeDescription").text
    assert any(p.get("UserIsRequestor") == "true" for p in root.findall("ActiveParticipant"))

    # File sink with include_patient_ids: a received study's audit names the Patient ID (never the name).
    pacs, pacs_port = start_storescp(tmp_path / "pacs2")
    port = free_port()
    cfg2 = write_node_config(tmp_path / "node2.toml", tmp_path / "storage2", port, [("PACS", pacs_port)])
    cfg2.write_text(cfg2.read_text() + '[audit]\nsink = "file"\ninclude_patient_ids = true\n')
    node = start_node(cfg2, port, tmp_path / "node2.log")
    try:
        assert storescu(port, write_study(tmp_path / "study2", seed=12)).returncode == 0
        wait_delivered(tmp_path / "storage2", jobs=1)
    finally:
        node.stop()
    pacs.stop()
    audit_file = tmp_path / "storage2" / "logs" / "audit.log"
    assert oct(audit_file.stat().st_mode & 0o777) == "0o600"
    lines = audit_file.read_text().splitlines()
    roots = [parse(line)[1] for line in lines]
    patients = [o for r in roots for o in r.findall("ParticipantObjectIdentification")
                if o.get("ParticipantObjectTypeCode") == "1"]
    assert patients and all(p.get("ParticipantObjectID") == PATIENT_ID for p in patients)
    assert PATIENT_NAME not in "\n".join(lines)


def test_audit_over_tls_rfc5425_with_the_node_certificate(tmp_path):
    certs = make_all(tmp_path / "certs")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs["pacs"][0]), str(certs["pacs"][1]))
    ctx.load_verify_locations(str(certs["ca"][0]))
    ctx.verify_mode = ssl.CERT_REQUIRED  # the repository authenticates the node too
    collector = SyslogReceiver("tcp", tls=ctx)
    storage = tmp_path / "storage"
    cfg = write_node_config(tmp_path / "node.toml", storage, free_port(), [("PACS", 104)])
    cfg.write_text(cfg.read_text() + f'[audit]\nsink = "tls"\nport = {collector.port}\n'
                   f'[tls]\ncertificate = "{certs["node"][0]}"\nprivate_key = "{certs["node"][1]}"\n'
                   f'ca_bundle = "{certs["ca"][0]}"\n')
    from dicom_ai.node.jobstore import JobStore
    JobStore(storage / "jobs.sqlite")
    r = subprocess.run([PYTHON, "-m", "dicom_ai", "retry", "--config", str(cfg)], capture_output=True, text=True,
                       env=node_env(), cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: collector.messages, 5, "the retry audit message over TLS")
    collector.close()
    (_, root), = [parse(x) for x in collector.messages]
    assert event_id(root) == "110113"
    subject = dict(x[0] for x in collector.peer_certificates[0]["subject"])
    assert subject["commonName"] == "AINODE"


def _plain_association_from(address: str, port: int) -> None:
    """A plain A-ASSOCIATE-RQ's first bytes sent from ``address`` (a loopback alias) to the TLS port."""
    with socket.socket() as s:
        s.bind((address, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.sendall(b"\x01\x00\x00\x00\x00\x44" + b"\x00" * 0x44)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass


def test_every_refused_connection_is_one_security_alert_with_reason_and_address(tmp_path):
    """Each kind of refusal (TLS and AE identity) is one 110113/110126 Security Alert naming the
    reason and the source address, parsed from a real UDP syslog socket; repeats from one address
    within the window are one more message with their number, a second address has its own."""
    certs = make_all(tmp_path / "certs")
    collector = SyslogReceiver("udp")
    port, tls_port = free_port(), free_port()
    lines = ["[node]", 'ae_title = "AINODE"', 'bind_address = "127.0.0.1"', f"port = {port}",
             f"storage = {json.dumps(str(tmp_path / 'storage'))}", "reserve_free_mb = 1",
             "[pipeline]", 'factory = "node_harness:stand_in_pipeline"', 'device = "cpu"', "previews = false",
             "[tls]", f"port = {tls_port}", f"certificate = {json.dumps(str(certs['node'][0]))}",
             f"private_key = {json.dumps(str(certs['node'][1]))}", f"ca_bundle = {json.dumps(str(certs['ca'][0]))}",
             "require_client_certificate = true",
             "[audit]", 'sink = "udp"', f"port = {collector.port}",
             "[[peers]]", 'ae_title = "PACS"', 'host = "127.0.0.1"', "port = 104", 'certificate_subject = "PACS"',
             "[[peers]]", 'ae_title = "FARAWAY"', 'host = "127.0.0.2"', "port = 104", "require_address = true"]
    cfg = tmp_path / "node.toml"
    cfg.write_text("\n".join(lines) + "\n")
    node = start_node(cfg, port, tmp_path / "node.log")
    ca = ["+cf", str(certs["ca"][0])]

    def echo(p, extra, calling="PACS"):
        return subprocess.run(["echoscu", "-aet", calling, "-aec", "AINODE", *extra, "127.0.0.1", str(p)],
                              capture_output=True, text=True, timeout=30)

    def tls_as(name):
        return ["+tls", str(certs[name][1]), str(certs[name][0]), *ca]

    expected = {  # reason -> what the alert's description must say
        "tls_not_tls": "does not speak TLS",
        "tls_certificate_verify_failed": "unable to get local issuer certificate",
        "tls_no_client_certificate": "no client certificate",
        "peer_certificate_mismatch": "names OTHER",
        "peer_certificate_missing": "must connect over TLS",
        "peer_address_mismatch": "127.0.0.2",
        "calling_ae_not_recognised": "STRANGER",
    }
    try:
        wait_port(tls_port)
        assert echo(tls_port, tls_as("pacs")).returncode == 0  # the real peer gets in
        for _ in range(5):  # a plain association on the TLS port, five times from one address
            assert echo(tls_port, []).returncode != 0
        assert echo(tls_port, tls_as("rogue")).returncode != 0  # a certificate of an unknown CA
        assert echo(tls_port, ["+tla", *ca]).returncode != 0  # anonymous TLS client
        assert echo(tls_port, tls_as("other")).returncode != 0  # right CA, another peer's name (AE pinning)
        assert echo(port, []).returncode != 0  # PACS without its certificate
        assert echo(port, [], calling="FARAWAY").returncode != 0  # pinned to another host
        assert echo(port, [], calling="STRANGER").returncode != 0  # no such peer
        _plain_association_from("127.0.0.3", tls_port)  # a second address: its own alert

        def alerts():
            out = []
            for text in list(collector.messages):
                _, root = parse(text)
                if event_id(root) == "110113":
                    out.append(root)
            return out
        wait_for(lambda: len(alerts()) >= len(expected) + 1, 20, "one Security Alert per kind of refusal")
    finally:
        node.stop()
    wait_for(lambda: sum('110121' in m for m in collector.messages), 5, "the Application Stop message")
    collector.close()
    found = []
    for root in alerts():
        ev = root.find("EventIdentification")
        assert ev.find("EventTypeCode").get("csd-code") == "110126"  # Node Authentication
        assert ev.get("EventOutcomeIndicator") == "4"
        remote = [p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
        assert len(remote) == 1 and remote[0].get("NetworkAccessPointTypeCode") == "2"
        found.append((ev.find("EventOutcomeDescription").text, remote[0].get("NetworkAccessPointID")))
    for reason, says in expected.items():
        first = [(d, a) for d, a in found if f"({reason}," in d and " more times " not in d]
        assert len(first) == (2 if reason == "tls_not_tls" else 1), (reason, found)
        assert says in first[0][0], (reason, first[0][0])
    by_address = {a for d, a in found if "(tls_not_tls," in d and " more times " not in d}
    assert by_address == {"127.0.0.1", "127.0.0.3"}
    # The four repeats from 127.0.0.1 were one message with their number (sent when the node stopped).
    repeats = [d for d, a in found if " more times " in d]
    assert repeats == [d for d in repeats if d.startswith("4 more times") and "(tls_not_tls," in d] and len(repeats) == 1
    assert len(found) == len(expected) + 2
    # The node's log says each reason too; the unknown CA is not folded into the plain client's line.
    logged = {e["reason"] for e in log_events(tmp_path / "node.log", "connection_refused")}
    assert set(expected) <= logged, logged
