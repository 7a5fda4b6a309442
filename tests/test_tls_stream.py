"""The node's TLS receive path (:class:`dicom_ai.node.tls_stream.TlsStream`) against real TLS peers.

The stream alone against Python ``ssl`` clients on loopback (data both ways, end of stream,
alerts, deadlines, the handshake failures named as the ``SSLSocket`` path names them), then
the node's Storage SCP on a TLS port against pynetdicom and dcmtk ``storescu +tls``: what is
stored is byte for byte what was sent, and a stalled PDU is aborted after the idle timeout.
Certificates are made with ``openssl`` by the test (tests/tls_certs.py).
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, dimse_messages, transport
from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation

from dicom_ai.node import logs
from dicom_ai.node.config import TlsSection, load_config
from dicom_ai.node.jobstore import JobStore
from dicom_ai.node.scp import StorageSCP
from dicom_ai.node.tls import handshake_failure, server_context
from dicom_ai.node.tls_stream import TlsStream
from node_harness import log_events, make_mg
from tls_certs import make_all


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("certs"))


def _server_ctx(certs, require_client_certificate: bool = True) -> ssl.SSLContext:
    return server_context(TlsSection(port=1, certificate=str(certs["node"][0]), private_key=str(certs["node"][1]),
                                     ca_bundle=str(certs["ca"][0]),
                                     require_client_certificate=require_client_certificate))


def _client_ctx(certs, name: str | None = "pacs", **settings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs["ca"][0]))
    ctx.check_hostname = False
    if name:
        ctx.load_cert_chain(str(certs[name][0]), str(certs[name][1]))
    for key, value in settings.items():
        setattr(ctx, key, value)
    return ctx


class _Server:
    """One accepted connection served by ``serve(raw)`` in a thread; its result or exception kept."""

    def __init__(self, serve):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.result = self.error = None
        self._serve = serve
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        raw, _ = self.listener.accept()
        try:
            self.result = self._serve(raw)
        except BaseException as exc:  # handed to the test
            self.error = exc
        finally:
            raw.close()
            self.listener.close()

    def join(self, timeout: float = 30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server thread did not finish"
        return self


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_data_both_ways_certificate_and_close_notify(certs, version):
    """5 MB from the client in odd-sized reads, 1 MB back, the client certificate verified, and a
    shutdown that ends the client's stream with close_notify (not a ragged EOF)."""
    payload = os.urandom(5 * 1024 * 1024 + 17)
    reply = os.urandom(1024 * 1024)

    def serve(raw):
        stream = TlsStream(raw, _server_ctx(certs))
        stream.do_handshake(time.monotonic() + 10)
        stream.settimeout(10)
        buf = bytearray(len(payload))
        view = memoryview(buf)
        got, sizes = 0, [6, 131066, 1, 70000]
        while got < len(buf):
            n = stream.recv_into(view[got:], min(sizes[got % 4], len(buf) - got))
            assert n > 0
            got += n
        stream.sendall(reply)
        assert stream.recv_into(bytearray(10)) == 0  # the client's close_notify: end of stream
        stream.shutdown(socket.SHUT_WR)
        return hashlib.sha256(buf).hexdigest(), stream.version(), stream.getpeercert()

    server = _Server(serve)
    ctx = _client_ctx(certs, maximum_version=version)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        tls = ctx.wrap_socket(raw, suppress_ragged_eofs=False)
        tls.sendall(payload)
        back = bytearray()
        while len(back) < len(reply):
            back += tls.recv(65536)
        plain = tls.unwrap()  # sends close_notify and waits for the server's: raises on a ragged EOF
        assert plain.recv(1) == b""
    server.join()
    assert server.error is None, server.error
    digest, negotiated, cert = server.result
    assert digest == hashlib.sha256(payload).hexdigest() and bytes(back) == reply
    assert negotiated == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert ("commonName", "PACS") in [item for rdn in cert["subject"] for item in rdn]


def _ssl_socket_handshake(raw, ctx, deadline):
    tls = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
    tls.settimeout(deadline - time.monotonic())
    tls.do_handshake()


def _stream_handshake(raw, ctx, deadline):
    TlsStream(raw, ctx).do_handshake(deadline)


def _plain_client(port, certs):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(bytes([1, 0]) + struct.pack(">I", 68) + bytes(68))  # an A-ASSOCIATE-RQ-like PDU
        try:
            return s.recv(100)
        except OSError as exc:
            return exc


def _tls_client(name):
    def client(port, certs):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            try:
                with _client_ctx(certs, name).wrap_socket(raw) as tls:
                    tls.settimeout(2)
                    return tls.recv(1)  # TLS 1.3: the server's verdict on the certificate comes now
            except (ssl.SSLError, OSError) as exc:
                return exc
    return client


@pytest.mark.parametrize("client, require, reason", [
    (_plain_client, True, "tls_not_tls"),
    (_tls_client("rogue"), True, "tls_certificate_verify_failed"),
    (_tls_client(None), True, "tls_no_client_certificate"),
    (_tls_client("rogue"), False, "tls_certificate_verify_failed"),  # optional, but one sent is verified
])
def test_handshake_failures_are_named_and_alerted_as_with_ssl_socket(certs, client, require, reason):
    """Each failure gets the reason the SSLSocket path gave it, and the client sees the same outcome
    (OpenSSL's alert is sent: e.g. 'unknown ca' to a client with a rogue certificate)."""
    outcomes = {}
    for name, handshake in (("ssl_socket", _ssl_socket_handshake), ("stream", _stream_handshake)):
        server = _Server(lambda raw: handshake(raw, _server_ctx(certs, require), time.monotonic() + 5))
        seen_by_client = client(server.port, certs)
        server.join()
        assert server.error is not None, f"{name}: the handshake succeeded"
        named = handshake_failure(server.error)
        outcomes[name] = (named[0] if named else type(server.error).__name__,
                          getattr(seen_by_client, "reason", type(seen_by_client).__name__))
    assert outcomes["stream"][0] == outcomes["ssl_socket"][0] == reason, outcomes
    if client is not _plain_client:  # (a plain client sees a close or a reset, by timing)
        assert outcomes["stream"][1] == outcomes["ssl_socket"][1], outcomes
    if reason == "tls_certificate_verify_failed":
        assert outcomes["stream"][1] == "TLSV1_ALERT_UNKNOWN_CA"


def test_handshake_deadline_is_absolute_and_silent_peers_time_out(certs):
    """A peer that trickles its ClientHello a byte at a time still meets the absolute deadline."""
    def serve(raw):
        started = time.monotonic()
        try:
            TlsStream(raw, _server_ctx(certs)).do_handshake(started + 0.6)
        except TimeoutError:
            return time.monotonic() - started
        return None

    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)
    for trickle in (False, True):
        server = _Server(serve)
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            for byte in hello if trickle else b"":
                s.sendall(bytes([byte]))
                time.sleep(0.05)
                if not server.thread.is_alive():
                    break
            server.join(10)
        assert server.error is None, server.error
        assert server.result is not None and 0.55 <= server.result < 2.0, server.result


def test_ragged_end_of_stream_and_pending_bytes(certs):
    """Data then a TCP close without close_notify: the data, then 0 (as SSLSocket's suppress_ragged_eofs).
    Bytes decrypted but not yet read are visible to pending() though select() sees nothing."""
    def serve(raw):
        stream = TlsStream(raw, _server_ctx(certs))
        stream.do_handshake(time.monotonic() + 10)
        stream.settimeout(10)
        first = bytearray(1)
        assert stream.recv_into(first, 1) == 1
        time.sleep(0.3)  # the rest has arrived, into the stream's buffers or the socket
        readable, _, _ = select.select([stream], [], [], 0)
        if not readable:
            assert stream.pending() > 0
        rest = bytearray()
        while True:
            chunk = stream.recv(4096)
            if not chunk:
                break
            rest += chunk
        return bytes(first + rest)

    server = _Server(serve)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        tls = _client_ctx(certs).wrap_socket(raw)
        tls.settimeout(0.3)
        with pytest.raises(TimeoutError):
            tls.recv(1)  # takes the TLS 1.3 session tickets, so that the close below is no reset
        tls.sendall(b"x" * 3000)
        time.sleep(0.1)
        raw_fd = tls.detach()  # close the TCP connection without a TLS close_notify
        socket.socket(fileno=raw_fd).close()
    server.join()
    assert server.error is None, server.error
    assert server.result == b"x" * 3000


# -- through the node's Storage SCP ---------------------------------------------------------

@pytest.fixture
def tls_scp(tmp_path, certs):
    """An in-process Storage SCP (AE AINODE) with a TLS port only; idle timeout 1.5 s."""
    saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv,
             dimse_messages.NamedTemporaryFile)
    port = socket.create_server(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    cfg = load_config(None, {"node.ae_title": "AINODE", "node.port": 0, "node.storage": str(tmp_path / "st"),
                             "node.reserve_free_mb": 1, "node.max_pdu_size": 131072,
                             "peers": ["PACS@127.0.0.1:1"], "limits.idle_seconds": 1.5,
                             "tls.port": free, "tls.plain_port": False,
                             "tls.certificate": str(certs["node"][0]), "tls.private_key": str(certs["node"][1]),
                             "tls.ca_bundle": str(certs["ca"][0])})
    store = JobStore(cfg.layout.jobstore)
    server = StorageSCP(cfg, store)
    server.start()
    yield server
    server.stop()
    (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv,
     dimse_messages.NamedTemporaryFile) = saved


def _stored(scp: StorageSCP, ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(scp.layout.spool_study(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm")


def test_pynetdicom_and_dcmtk_stores_over_tls_are_stored_byte_for_byte(tls_scp, certs, tmp_path):
    """Images of 3-17 PDUs each through the TLS port: Success only with the file in the spool, and
    its pixel data exactly what was sent (pynetdicom TLS 1.3 and 1.2, then dcmtk storescu +tls)."""
    study = generate_uid()
    sent = [make_mg(lat, "CC", study, generate_uid(), i + 1, shape=(1200, 900), seed=30 + i)
            for i, lat in enumerate("LRLR")]
    ae = AE(ae_title="PACS")
    ae.add_requested_context(DigitalMammographyXRayImageStorageForPresentation)
    for ds, version in zip(sent[:2], (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2)):
        assoc = ae.associate("127.0.0.1", tls_scp.tls_port, ae_title="AINODE",
                             tls_args=(_client_ctx(certs, maximum_version=version), None))
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0000
        assert _stored(tls_scp, ds).PixelData == ds.PixelData
    files = []
    for ds in sent[2:]:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    r = subprocess.run(["storescu", "-v", "-aet", "PACS", "-aec", "AINODE", "+tls", str(certs["pacs"][1]),
                        str(certs["pacs"][0]), "+cf", str(certs["ca"][0]), "127.0.0.1", str(tls_scp.tls_port),
                        *map(str, files)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.count("Received Store Response (Success)") == 2, r.stderr
    for ds, path in zip(sent[2:], files):
        assert _stored(tls_scp, ds).PixelData == pydicom.dcmread(path).PixelData


def test_a_stalled_pdu_over_tls_is_aborted_after_the_idle_timeout(tls_scp, certs, tmp_path):
    """Over TLS as on plain TCP: a P-DATA-TF that stops half-way is answered A-ABORT once
    limits.idle_seconds (1.5 s) pass, and logged as pdu_stalled."""
    log = tmp_path / "scp.log"
    logs.configure("scp", "INFO", log)
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(DigitalMammographyXRayImageStorageForPresentation)
        assoc = ae.associate("127.0.0.1", tls_scp.tls_port, ae_title="AINODE", tls_args=(_client_ctx(certs), None))
        assert assoc.is_established
        started = time.monotonic()
        assoc.dul.socket.socket.sendall(bytes([4, 0]) + struct.pack(">I", 1000) + bytes(10))
        deadline = started + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        waited = time.monotonic() - started
    finally:
        logs.configure("node", "INFO", None)
    assert assoc.is_aborted, "the node did not abort the stalled association"
    assert 1.3 <= waited < 6, waited
    assert [e["seconds"] for e in log_events(log, "connection_refused") if e["reason"] == "pdu_stalled"] == [1.5]
