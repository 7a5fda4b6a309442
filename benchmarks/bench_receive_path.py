"""CPU of the node's PDU read path alone: 68 MB of 128 KiB P-DATA-TF PDUs over loopback, plain and TLS.

A sender process writes 520 P-DATA-TF PDUs of 128 KiB (the size ``bench_tls_ingest.py``'s
receivers offer) to a socket as fast as it can (TLS 1.3 through Python's ``ssl`` for the TLS
rows); the reading thread's CPU seconds (``time.thread_time``) to take all of them, per way
of reading:

* ``concatenating``: what the node did before (pynetdicom's DUL: ``recv(6)`` into a
  bytearray, then ``recv(length)`` read by ``_recv_growing`` and appended, a timeout change
  around each read);
* ``read_pdu``: :meth:`dicom_ai.node.transport._ReceiveSocket.read_pdu` (read-ahead buffer,
  the body read into the PDU's own buffer);
* ``read_pdu`` over TLS: through Python's ``SSLSocket`` (the node before issue 28t: OpenSSL
  reads each 16 KiB TLS record with two system calls);
* ``read_pdu_tls_stream`` (TLS only): ``read_pdu`` over :class:`dicom_ai.node.tls_stream.TlsStream`,
  the node's TLS path now (256 KiB socket reads into an ``ssl.MemoryBIO``, an ``SSLObject``
  decrypts);
* ``memory_bio`` (TLS only, a lower bound, no node code): the bare loop of raw ``recv_into`` of
  256 KiB into an ``ssl.MemoryBIO`` and ``SSLObject.read`` straight into each PDU's buffer.

Medians over rounds; all ways in every round. Writes benchmarks/results/receive_path.json.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from dicom_ai.node import transport  # noqa: E402
from dicom_ai.node.tls_stream import TlsStream  # noqa: E402
from tls_certs import make_all  # noqa: E402

PDU = 131072
COUNT = 520
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
SENDER = r'''
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
if sys.argv[2] == "tls": s = ctx.wrap_socket(s)
pdu = bytes([4, 0]) + (131072 - 6).to_bytes(4, "big") + bytes(131072 - 6)
for _ in range(520): s.sendall(pdu)
s.recv(1); s.close()
'''


def _concatenating(conn) -> None:
    for _ in range(COUNT):
        pdu = bytearray()
        pdu.extend(transport._recv_growing(conn, 6, time.monotonic() + 30))
        conn.settimeout(30)
        pdu += transport._recv_growing(conn, int.from_bytes(pdu[2:6], "big"), time.monotonic() + 30)
        conn.settimeout(30)
        assert len(pdu) == PDU


def _read_pdu_tls_stream(raw, context) -> float:
    """Reader CPU seconds after the handshake (as for ``SSLSocket``, whose handshake is untimed)."""
    stream = TlsStream(raw, context)
    stream.do_handshake()
    started = time.thread_time()
    _read_pdu(stream)
    seconds = time.thread_time() - started
    stream.sendall(b"x")
    return seconds


def _read_pdu(conn) -> None:
    sock = object.__new__(transport._ReceiveSocket)
    sock.socket = conn
    sock._assoc = types.SimpleNamespace(network_timeout=30, acceptor=types.SimpleNamespace(maximum_length=PDU),
                                        requestor=types.SimpleNamespace(address="127.0.0.1"))
    for _ in range(COUNT):
        assert len(sock.read_pdu()) == PDU


def _memory_bio(raw, context) -> float:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    chunk = bytearray(256 * 1024)
    view = memoryview(chunk)

    def pump() -> None:
        if outgoing.pending:
            raw.sendall(outgoing.read())
        n = raw.recv_into(view)
        if not n:
            raise ConnectionError("closed")
        incoming.write(view[:n])

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump()
    if outgoing.pending:
        raw.sendall(outgoing.read())
    started = time.thread_time()
    for _ in range(COUNT):
        pdu = bytearray(PDU)
        with memoryview(pdu) as dest:
            got = 0
            while got < PDU:
                try:
                    got += tls.read(PDU - got, dest[got:])
                except ssl.SSLWantReadError:
                    pump()
    seconds = time.thread_time() - started
    tls.write(b"x")
    raw.sendall(outgoing.read())
    return seconds


def run(way: str, tls: bool, context: ssl.SSLContext) -> float:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(listener.getsockname()[1]), "tls" if tls else "plain"])
    conn, _ = listener.accept()
    try:
        if way in ("memory_bio", "read_pdu_tls_stream"):
            conn.settimeout(30)
            return (_memory_bio if way == "memory_bio" else _read_pdu_tls_stream)(conn, context)
        if tls:
            conn = context.wrap_socket(conn, server_side=True)
        conn.settimeout(30)
        started = time.thread_time()
        (_concatenating if way == "concatenating" else _read_pdu)(conn)
        seconds = time.thread_time() - started
        conn.sendall(b"x")
        return seconds
    finally:
        sender.wait(timeout=60)
        conn.close()
        listener.close()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_all(Path(tmp))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs["node"][0], certs["node"][1])
        cases = [("plain", "concatenating"), ("plain", "read_pdu"), ("tls", "concatenating"), ("tls", "read_pdu"),
                 ("tls", "read_pdu_tls_stream"), ("tls", "memory_bio")]
        cpu = {f"{t}/{w}": [] for t, w in cases}
        for _ in range(ROUNDS):
            for t, w in cases:
                cpu[f"{t}/{w}"].append(run(w, t == "tls", context))
    med = {k: round(statistics.median(v), 4) for k, v in cpu.items()}
    result = {"benchmark": "receive_path", "bytes": PDU * COUNT, "pdu_bytes": PDU, "rounds": ROUNDS,
              "what": "reading thread CPU seconds to read 520 P-DATA-TF PDUs of 128 KiB from loopback",
              "reader_cpu_seconds": {k: [round(x, 4) for x in v] for k, v in cpu.items()},
              "median_reader_cpu_seconds": med,
              "cpu_cores": os.cpu_count(), "load_average_1min_after": round(os.getloadavg()[0], 2),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = REPO / "benchmarks" / "results" / "receive_path.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':<28}{'reader CPU s (median)':>22}")
    for k, v in med.items():
        print(f"{k:<28}{v:>22.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
