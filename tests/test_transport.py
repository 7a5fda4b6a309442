"""The Storage SCP's network layer against hostile and careless connections (dicom_ai.node.transport).

A real StorageSCP listens on 127.0.0.1; the configured peer (PACS) is 127.0.0.1, and the
"strangers" are other loopback addresses (127.0.0.2, ...) that the client sockets bind to.
The legitimate sender is dcmtk's echoscu (from 127.0.0.1); the rest is raw sockets, so what
the node puts on the wire is checked byte for byte. The memory test runs the SCP in a
subprocess and reads its VmHWM.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
from pynetdicom import _config, dimse_messages
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from dicom_ai.node import logs, transport as transport_module
from dicom_ai.node.config import load_config
from dicom_ai.node.jobstore import JobStore
from dicom_ai.node.scp import StorageSCP
from node_harness import REPO, free_port, node_env

PEER = "127.0.0.1"
STRANGER = "127.0.0.2"

# What the node sends, exactly (PS3.8 9.3.4 and 9.3.8).
RJ_LOCAL_LIMIT = bytes.fromhex("03000000000400020302")  # A-ASSOCIATE-RJ: transient, provider (presentation), 2
ABORT_INVALID_LENGTH = bytes.fromhex("07000000000400000206")  # A-ABORT: provider, invalid PDU parameter value
ABORT_STALLED = bytes.fromhex("07000000000400000200")  # A-ABORT: provider, reason not specified
ABORT_IDLE = bytes.fromhex("07000000000400000000")  # A-ABORT: service user (pynetdicom's network timeout)


def _loopback_aliases_work() -> bool:
    try:
        with socket.socket() as s:
            s.bind((STRANGER, 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _loopback_aliases_work(), reason="needs 127.0.0.0/8 on the loopback interface")


def _config_overrides(tmp_path: Path, port: int, limits: dict) -> dict:
    overrides = {"node.ae_title": "AINODE", "node.port": port, "node.storage": str(tmp_path / "st"),
                 "node.reserve_free_mb": 1, "peers": [f"PACS@{PEER}:1"]}
    overrides.update({f"limits.{k}" if "." not in k else k: v for k, v in limits.items()})
    return overrides


@contextmanager
def running_scp(tmp_path: Path, **limits):
    """An in-process StorageSCP (AE AINODE, peer PACS@127.0.0.1); restores pynetdicom's process-wide settings."""
    saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile)
    cfg = load_config(None, _config_overrides(tmp_path, free_port(), limits))
    server = StorageSCP(cfg, JobStore(cfg.layout.jobstore))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = saved


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "logs" / "node.log"
    logs.configure("scp", "INFO", path, stream=None)
    yield path
    logs.configure("node", "INFO", None)


def _events(path: Path, name: str) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line["event"] == name]


def association_rq(calling: str = "PACS", called: str = "AINODE") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification, as bytes."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.9.9"
    primitive.user_information = [max_length, implementation]
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def connect(port: int, source: str = STRANGER) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """Everything the node sends until it closes: (bytes, seconds until closed or None if still open)."""
    start = time.monotonic()
    data = b""
    sock.settimeout(timeout)
    try:
        while True:
            got = sock.recv(65536)
            if not got:
                break
            data += got
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return data, None
    return data, time.monotonic() - start


def is_open(sock: socket.socket, wait: float = 0.2) -> bool:
    """True if the node has neither sent anything nor closed the connection within ``wait``."""
    readable, _, _ = select.select([sock], [], [], wait)
    return not readable


def read_pdu(sock: socket.socket, timeout: float = 3.0) -> bytes:
    sock.settimeout(timeout)
    header = b""
    while len(header) < 6:
        got = sock.recv(6 - len(header))
        assert got, "connection closed before a PDU"
        header += got
    length = struct.unpack(">I", header[2:6])[0]
    body = b""
    while len(body) < length:
        got = sock.recv(length - len(body))
        assert got
        body += got
    return header + body


def associate(port: int, source: str = PEER) -> socket.socket:
    """A raw connection with an established association (A-ASSOCIATE-AC read)."""
    sock = connect(port, source)
    sock.sendall(association_rq())
    ac = read_pdu(sock)
    assert ac[0] == 0x02, ac[:10].hex()
    return sock


def echoscu(port: int, calling: str = "PACS", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-v", "-aet", calling, "-aec", "AINODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=timeout)


def wait_for(condition, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


# -- (a) idle strangers vs a configured peer --------------------------------------------------

@pytest.mark.parametrize("per_address", [None, 4], ids=["one-address-unlimited", "per-address-default"])
def test_idle_strangers_do_not_lock_out_a_configured_peer(tmp_path, per_address):
    """max_associations + 2 idle connections from a stranger; the peer's echo succeeds within 2 s.

    With the per-address cap out of the way the stranger holds every slot open to it (8 of
    10) and 4 more connections wait to be rejected; the 2 reserved slots stay the peer's.
    """
    limits = {"association_request_seconds": 30.0}
    if per_address is None:
        limits["max_connections_per_address"] = 50
    with running_scp(tmp_path, **limits) as scp:
        n = scp.config.node.max_associations + 2
        idle = [connect(scp.port, STRANGER) for _ in range(n)]
        try:
            accepted = wait_for(lambda: scp.server.slots.in_use()["slots"] + scp.server.slots.in_use()["waiting"]
                                == min(n, per_address or n), timeout=2)
            assert accepted, scp.server.slots.in_use()
            start = time.monotonic()
            result = echoscu(scp.port, timeout=5)
            elapsed = time.monotonic() - start
            assert result.returncode == 0, result.stderr
            assert "Received Echo Response (Success)" in result.stderr
            assert elapsed < 2.0, elapsed
            if per_address is None:
                # Connections beyond the stranger's share are answered A-ASSOCIATE-RJ transient
                # (local limit exceeded) once they send their request; one still within it is accepted.
                idle[-1].sendall(association_rq(calling="STRANGER"))
                assert read_until_closed(idle[-1], 3)[0] == RJ_LOCAL_LIMIT
                idle[0].sendall(association_rq(calling="STRANGER"))
                # calling AE title not recognized (permanent): the slot was there, the title is not
                assert read_pdu(idle[0]) == bytes.fromhex("03000000000400010103")
            else:
                assert all(is_open(s, 0) for s in idle[:per_address])
                for s in idle[per_address:]:  # closed by the per-address cap, before any PDU
                    data, closed_after = read_until_closed(s, 2)
                    assert data == b"" and closed_after is not None
        finally:
            for s in idle:
                s.close()


def test_reserved_slots_are_only_for_peer_addresses(tmp_path, log_file):
    """3 slots, 1 reserved: strangers from two addresses hold 2; a third stranger is rejected, the peer is not."""
    with running_scp(tmp_path, **{"node.max_associations": 3, "reserved_peer_associations": 1,
                                  "association_request_seconds": 30.0}) as scp:
        held = [associate(scp.port, "127.0.0.2"), associate(scp.port, "127.0.0.3")]
        try:
            late = connect(scp.port, "127.0.0.4")
            late.sendall(association_rq())
            assert read_until_closed(late, 3)[0] == RJ_LOCAL_LIMIT
            assert echoscu(scp.port, timeout=5).returncode == 0  # the reserved slot
        finally:
            for s in held:
                s.close()
        assert wait_for(lambda: scp.server.slots.in_use()["slots"] == 0, timeout=2)
        freed = connect(scp.port, "127.0.0.4")  # freed slots are open to strangers again
        freed.sendall(association_rq())
        assert read_pdu(freed)[0] == 0x02
        freed.close()
    (refused,) = [e for e in _events(log_file, "connection_refused") if e["address"] == "127.0.0.4"]
    assert (refused["reason"], refused["response"]) == ("reserved_for_peers", "A-ASSOCIATE-RJ")


# -- (b) the A-ASSOCIATE-RQ deadline ----------------------------------------------------------

def test_slow_association_request_is_closed_at_the_absolute_deadline(tmp_path, log_file):
    """One byte of a valid A-ASSOCIATE-RQ every 0.2 s: closed 1 s after accept, no PDU sent."""
    with running_scp(tmp_path, association_request_seconds=1.0) as scp:
        request = association_rq()
        sock = connect(scp.port, STRANGER)
        start = time.monotonic()
        closed_after = None
        received = b""
        try:
            for i in range(len(request)):
                try:
                    sock.sendall(request[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    closed_after = time.monotonic() - start
                    break
                if not is_open(sock, 0.2):
                    received, _ = read_until_closed(sock, 1)
                    closed_after = time.monotonic() - start
                    break
        finally:
            sock.close()
        assert closed_after is not None and 0.9 <= closed_after <= 1.6, closed_after
        assert received == b""  # a TCP close, as on ARTIM expiry: no PDU
        silent = connect(scp.port, STRANGER)  # nothing at all: the same deadline
        assert read_until_closed(silent, 3)[0] == b""
        silent.close()
        assert echoscu(scp.port).returncode == 0
        assert wait_for(lambda: scp.server.slots.in_use() == {"slots": 0, "waiting": 0, "addresses": 0}, 2)
    refused = _events(log_file, "connection_refused")
    assert [(e["reason"], e["address"], e["response"]) for e in refused] == \
        [("association_request_timeout", STRANGER, "TCP close")] * 2  # first line, then the summary
    assert "repeated" not in refused[0] and refused[1]["repeated"] == 1


# -- (c) connect/close cycles -----------------------------------------------------------------

def _connection_threads() -> list[str]:
    """Threads serving a connection: the node's connection threads, pynetdicom's association threads."""
    return [t.name for t in threading.enumerate() if t.name.startswith(("NodeConnection@", "AcceptorThread@"))]


def test_connect_close_cycles_leave_no_threads_and_free_every_slot(tmp_path):
    with running_scp(tmp_path) as scp:
        assert echoscu(scp.port).returncode == 0  # pynetdicom's lazy imports, one of each thread
        assert wait_for(lambda: not _connection_threads(), timeout=2)
        baseline = threading.active_count()
        seen = scp.server.connections_accepted
        start = time.monotonic()
        for i in range(400):  # from the peer's address and a stranger's, alternately
            connect(scp.port, PEER if i % 2 else STRANGER).close()
        request = association_rq()
        for i in range(50):  # a complete request, then gone before the answer is read
            sock = connect(scp.port, PEER)
            sock.sendall(request)
            sock.close()
        # Every connection has left the kernel's accept queue (the node has seen all 450) ...
        assert wait_for(lambda: scp.server.connections_accepted == seen + 450, timeout=10)
        cycles_seconds = time.monotonic() - start
        # ... and within 2 s every thread it started for them is gone and every slot free.
        assert wait_for(lambda: threading.active_count() <= baseline, timeout=2), \
            (baseline, threading.active_count(), [t.name for t in threading.enumerate()])
        assert not _connection_threads()
        assert scp.server.slots.in_use() == {"slots": 0, "waiting": 0, "addresses": 0}
        results = [echoscu(scp.port) for _ in range(20)]
        assert [r.returncode for r in results] == [0] * 20, [r.stderr[-300:] for r in results if r.returncode]
        assert cycles_seconds < 30, cycles_seconds


# -- (d) per-address cap ----------------------------------------------------------------------

def test_per_address_cap_closes_before_any_pdu_and_logs_once(tmp_path, log_file):
    with running_scp(tmp_path, max_connections_per_address=2, association_request_seconds=30.0) as scp:
        first = [connect(scp.port, STRANGER) for _ in range(2)]
        try:
            assert wait_for(lambda: scp.server.slots.in_use()["slots"] == 2, timeout=2)
            assert all(is_open(s) for s in first)
            for _ in range(20):
                extra = connect(scp.port, STRANGER)
                data, closed_after = read_until_closed(extra, 2)
                extra.close()
                assert data == b"" and closed_after is not None and closed_after < 1.0
            other = connect(scp.port, "127.0.0.3")  # another address is not affected
            assert is_open(other)
            assert echoscu(scp.port).returncode == 0
            other.close()
        finally:
            for s in first:
                s.close()
        assert wait_for(lambda: scp.server.slots.in_use()["slots"] == 0, timeout=2)
        again = connect(scp.port, STRANGER)  # the address's connections were freed
        assert is_open(again, 0.3)
        again.close()
        lines = [e for e in _events(log_file, "connection_refused") if e["reason"] == "per_address_limit"]
        assert len(lines) == 1 and lines[0]["address"] == STRANGER and lines[0]["response"] == "TCP close"
    lines = [e for e in _events(log_file, "connection_refused") if e["reason"] == "per_address_limit"]
    assert [e.get("repeated") for e in lines] == [None, 19]  # the rest summed up when the window closed


# -- (e) declared lengths ---------------------------------------------------------------------

_SUBPROCESS_SCP = r"""
import json, sys
from dicom_ai.node.config import load_config
from dicom_ai.node.jobstore import JobStore
from dicom_ai.node.scp import StorageSCP
cfg = load_config(None, json.loads(sys.argv[1]))
scp = StorageSCP(cfg, JobStore(cfg.layout.jobstore))
scp.start()
print(scp.port, flush=True)
sys.stdin.read()
scp.stop()
"""


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(key)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_declared_pdu_lengths_are_never_allocated(tmp_path):
    """4 GiB A-ASSOCIATE-RQ and P-DATA-TF headers, and one over max_pdu_size: A-ABORT, VmHWM +< 4 MiB.

    The bound: a PDU over its limit costs nothing (refused from its header); one within it
    costs at most 256 KiB before its bytes arrive. Two connections declaring the full
    1 MiB maximum and then sending nothing are held open while the peak is read.
    """
    max_pdu = 1048576
    overrides = _config_overrides(tmp_path, free_port(), {"association_request_seconds": 30.0,
                                                          "node.max_pdu_size": max_pdu,
                                                          "max_connections_per_address": 10})
    proc = subprocess.Popen([sys.executable, "-c", _SUBPROCESS_SCP, json.dumps(overrides)], cwd=REPO,
                            env=node_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(proc.stdout.readline())
        warm = associate(port)  # everything an association imports and allocates, once
        warm.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        read_until_closed(warm, 3)
        warm.close()
        before = _status_kib(proc.pid, "VmHWM")
        for _ in range(2):  # the node used to allocate (and zero) 4 GiB for each
            sock = connect(port, STRANGER)
            sock.sendall(b"\x01\x00\xff\xff\xff\xff")
            assert read_until_closed(sock, 3)[0] == ABORT_INVALID_LENGTH
            sock.close()
        for declared in (0xFFFFFFFF, max_pdu + 1):
            sock = associate(port)
            sock.sendall(b"\x04\x00" + struct.pack(">I", declared))
            data, closed_after = read_until_closed(sock, 3)
            assert data == ABORT_INVALID_LENGTH and closed_after is not None
            sock.close()
        pending = []
        for _ in range(2):
            sock = associate(port)
            sock.sendall(b"\x04\x00" + struct.pack(">I", max_pdu) + b"\x00" * 100)
            pending.append(sock)
        time.sleep(0.3)
        assert all(is_open(s, 0) for s in pending)
        after = _status_kib(proc.pid, "VmHWM")
        for s in pending:
            s.close()
        assert after - before < 4 * 1024, (before, after)
        assert echoscu(port).returncode == 0
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_reads_grow_with_the_data_not_with_the_declared_length():
    """_recv_growing asked for 4 GiB that never come allocates about its first 256 KiB, nothing more."""
    a, b = socket.socketpair()
    try:
        b.sendall(b"x" * 1000)
        b.close()
        tracemalloc.start()
        data = transport_module._recv_growing(a, 4 << 30, time.monotonic() + 5)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert data == b"x" * 1000 and isinstance(data, bytearray)
        assert peak < 300 * 1024, peak
    finally:
        a.close()
    a, b = socket.socketpair()
    try:  # and a large read that does arrive is exact
        payload = os.urandom(3 * 1024 * 1024 + 17)
        sender = threading.Thread(target=b.sendall, args=(payload,))
        sender.start()
        assert transport_module._recv_growing(a, len(payload), None) == payload
        sender.join()
    finally:
        a.close()
        b.close()


# -- established associations: idle and stalled -------------------------------------------------

def test_idle_and_stalled_associations_are_aborted_after_idle_seconds(tmp_path):
    with running_scp(tmp_path, idle_seconds=1.0) as scp:
        quiet = associate(scp.port)
        data, closed_after = read_until_closed(quiet, 4)
        assert data == ABORT_IDLE and closed_after is not None and 0.8 <= closed_after <= 2.5, closed_after
        quiet.close()
        trickle = associate(scp.port)
        trickle.sendall(b"\x04\x00\x00\x00\x01\x00" + b"\x00" * 10)  # 256 bytes declared, 10 sent
        data, closed_after = read_until_closed(trickle, 4)
        assert data in (ABORT_STALLED, ABORT_IDLE), data.hex()  # whichever timer ends it first
        assert closed_after is not None and closed_after <= 2.5, closed_after
        trickle.close()
        assert wait_for(lambda: scp.server.slots.in_use()["slots"] == 0, timeout=2)
        assert echoscu(scp.port).returncode == 0


def test_first_pdu_must_be_an_association_request(tmp_path):
    with running_scp(tmp_path) as scp:
        sock = connect(scp.port)
        sock.sendall(b"\x04\x00\x00\x00\x00\x04abcd")  # P-DATA-TF before any association
        assert read_until_closed(sock, 3)[0] == bytes.fromhex("07000000000400000202")  # unexpected PDU
        sock.close()
        sock = connect(scp.port)
        sock.sendall(b"\x42\x00\x00\x00\x00\x00")  # no such PDU type
        assert read_until_closed(sock, 3)[0] == bytes.fromhex("07000000000400000201")  # unrecognized PDU
        sock.close()
        assert echoscu(scp.port).returncode == 0


def test_refusal_log_writes_the_first_and_then_one_summary_per_window(log_file):
    now = [100.0]
    log = transport_module._RefusalLog(window=60.0, max_keys=3, clock=lambda: now[0])
    for _ in range(50):
        log.note("per_address_limit", "10.0.0.9", response="TCP close")
    log.note("pdu_too_large", "10.0.0.9", response="A-ABORT", limit=262144)
    for i in range(5):  # more addresses than tracked: summed under "*"
        log.note("per_address_limit", f"10.0.1.{i}", response="TCP close")
    now[0] += 30
    log.flush()  # nothing is due yet
    assert len(_events(log_file, "connection_refused")) == 4
    now[0] += 31
    log.flush()
    lines = [(e["reason"], e["address"], e.get("repeated")) for e in _events(log_file, "connection_refused")]
    assert lines == [("per_address_limit", "10.0.0.9", None), ("pdu_too_large", "10.0.0.9", None),
                     ("per_address_limit", "10.0.1.0", None), ("per_address_limit", "*", None),
                     ("per_address_limit", "10.0.0.9", 49), ("per_address_limit", "*", 3)]
    log.note("per_address_limit", "10.0.0.9", response="TCP close")  # a new window: written again
    assert len(_events(log_file, "connection_refused")) == 7


def test_the_association_request_is_decoded_once(tmp_path, monkeypatch):
    """The connection's thread decodes the A-ASSOCIATE-RQ to check it; pynetdicom's DUL takes that
    decoded request instead of decoding the same bytes again (a storescu request with 128
    presentation contexts costs 10-20 ms per decode). The association works as before."""
    decodes = []
    original = A_ASSOCIATE_RQ.decode

    def counting(self, bytestream):
        decodes.append(len(bytestream))
        return original(self, bytestream)

    monkeypatch.setattr(A_ASSOCIATE_RQ, "decode", counting)
    with running_scp(tmp_path) as scp:
        r = echoscu(scp.port)
        assert r.returncode == 0 and "Received Echo Response (Success)" in r.stderr, r.stderr
        r = echoscu(scp.port)
        assert r.returncode == 0, r.stderr
    assert len(decodes) == 2, decodes  # one per association, not two
