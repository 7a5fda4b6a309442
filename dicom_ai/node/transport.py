"""The node's network layer under pynetdicom: who may connect, how PDUs are read, what is refused.

pynetdicom's AE runs the DICOM upper layer; this module holds the places where the node
changes how the acceptor uses the network, and the one process-wide setting its C-STORE
receive needs (:func:`install_receive_path`).

Connection policy (the numbers are ``[node]`` and ``[limits]`` of the configuration)
    * **Slots.** Every accepted TCP connection holds one of ``node.max_associations`` slots
      from ``accept()`` until the connection is closed, whether or not it has sent anything.
      ``limits.reserved_peer_associations`` of them can only be taken by connections from a
      configured peer's host (``[[peers]] host``, resolved to addresses when the SCP starts);
      other addresses share the rest. When no slot of its class is free a connection is still
      accepted, up to ``node.max_associations`` such connections, only to answer its
      A-ASSOCIATE-RQ with A-ASSOCIATE-RJ (rejected-transient, service-provider presentation
      related, local-limit-exceeded); beyond that it is closed at once.
    * **Per address.** At most ``limits.max_connections_per_address`` concurrent connections
      from one IP address (peers included); one more is closed before any PDU (TCP close).
    * **A-ASSOCIATE-RQ deadline.** The complete A-ASSOCIATE-RQ must have arrived
      ``limits.association_request_seconds`` after ``accept()`` (absolute: bytes arriving do
      not extend it); otherwise the connection is closed without a PDU, as on ARTIM expiry
      (PS3.8 AA-2). It is read here, by the connection's own thread, before pynetdicom
      creates an association: a connection that never sends one costs one thread and no
      association, and a connection closed before sending one frees its slot at once.
    * **Established associations.** ``limits.idle_seconds`` is pynetdicom's network timeout
      (no PDU for that long: A-ABORT, source 0, reason 0) and also the time each PDU header,
      and then each PDU body, has to arrive once started (else A-ABORT, source 2, reason 0).
      pynetdicom's ACSE timeout (its ARTIM timer: waiting for the peer to close after a
      release, rejection or abort) is ``limits.association_request_seconds`` too.
    * **PDU size.** A P-DATA-TF longer than ``node.max_pdu_size`` (the maximum length the node
      offers; 0 = unlimited) and any other PDU longer than :data:`MAX_CONTROL_PDU` is refused
      from its 6-byte header: A-ABORT (source 2 service provider, reason 6 invalid PDU
      parameter value), then close. No buffer is ever sized from a declared length: PDUs are
      read into a buffer that grows as the bytes arrive (:func:`_recv_growing`).

Threads: one per connection until its A-ASSOCIATE-RQ is in, then three (that one, waiting
for the association, and pynetdicom's association and DUL threads); all end when the
connection does. At most ``2 * node.max_associations`` connections exist at once.

DICOM TLS (``[tls]``, :mod:`~dicom_ai.node.tls`). A TLS listener is a second
:class:`NodeServer` of the same AE, sharing its slots, per-address counts and refusal log, so
every limit above holds for both ports together. pynetdicom's server would run the TLS
handshake inside its accept loop (one silent client would stop all accepts); here the
accept loop only accepts, and the connection's own thread runs the handshake against the
same absolute ``limits.association_request_seconds`` deadline, then reads the
A-ASSOCIATE-RQ through TLS. The TLS connection is a :class:`~dicom_ai.node.tls_stream.TlsStream`
(OpenSSL over ``ssl.MemoryBIO``, 256 KiB socket reads) rather than an ``SSLSocket``, which
reads each 16 KiB record with two system calls; the context, verification and alerts are the same. A failed handshake (a plain DICOM client on the TLS port, no
client certificate, a certificate from an unknown CA, TLS < ``tls.min_version``) is
refused with TCP close under the name :func:`~dicom_ai.node.tls.handshake_failure` gives it
(``tls_not_tls``, ``tls_no_client_certificate``, ``tls_certificate_verify_failed``, ...).

AE titles and decoding. Once read, the A-ASSOCIATE-RQ's Calling and Called AE Title fields
must be AE values as sent (PS3.5 Table 6.2-1: no control characters, backslash or bytes
outside ASCII, not only spaces; pynetdicom would strip a TAB and match ``PACS<TAB>`` to
``PACS``): else A-ASSOCIATE-RJ rejected-permanent, service-user, reason 3 (calling) or 7
(called), reasons ``invalid_calling_ae`` / ``invalid_called_ae``. A request pynetdicom could
not decode is answered A-ABORT (source 2, reason 6; ``undecodable_association_request``)
here, as pynetdicom's would be, but without its association thread then waiting the ACSE
timeout for an indication that never comes: the slot is free as soon as the peer has the
answer.

Peer identity. After the A-ASSOCIATE-RQ is read and before pynetdicom sees it, the
server's ``identity_check(calling_ae, address, certificate)`` (from
:mod:`~dicom_ai.node.scp`) may refuse it (it returns ``(reason, why)``, e.g.
``peer_address_mismatch``, ``peer_certificate_missing``, ``peer_certificate_mismatch``): A-ASSOCIATE-RJ rejected-permanent, source
service-user, reason 3 (calling AE title not recognized), logged with its reason.

Every refusal is logged as a ``connection_refused`` event (address, reason, what was sent),
once per (reason, address) and then as one summary line with the number of repeats per
:data:`REFUSAL_LOG_WINDOW` seconds (:class:`_RefusalLog`): no line per attacker connection.
Each such line is also one audit Security Alert (PS3.15 A.5, Node Authentication) with the
reason and the address, rate-limited the same way.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE, _config, dimse_messages, dul, evt, transport
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.sop_class import Verification

from dicom_ai.node import audit, logs, metrics
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.tls import handshake_failure
from dicom_ai.node.tls_stream import TlsStream

#: The largest PDU other than P-DATA-TF the node reads (A-ASSOCIATE-RQ included): 256 KiB.
#: 128 presentation contexts of 20 maximal-length transfer syntaxes each fit (about 180 KiB).
MAX_CONTROL_PDU = 256 * 1024

#: Seconds over which repeated refusals of one (reason, address) are summed into one line.
REFUSAL_LOG_WINDOW = 60.0

#: Listen backlog: connections the kernel completes before the accept loop takes them.
#: socketserver's default of 5 drops SYNs (1 s client retransmits) under a burst of connects.
LISTEN_BACKLOG = 128

# A PDU is read into a buffer of at most this size first, then grown as the bytes arrive:
# doubled, by at most _GROWTH_STEP at a time. The buffer never exceeds the bytes received
# plus max(_FIRST_CHUNK, min(received, _GROWTH_STEP)).
_FIRST_CHUNK = 256 * 1024
_GROWTH_STEP = 1024 * 1024

# Per-connection read-ahead buffer of an established association (:class:`_ReceiveSocket`).
_READ_AHEAD = 256 * 1024

# After a refusal PDU (A-ABORT, A-ASSOCIATE-RJ) the node half-closes and discards what the
# peer still sends for this long (at most _LINGER_BYTES), so that the peer reads the PDU
# before the connection goes; then it closes.
_LINGER_SECONDS = 0.5
_LINGER_BYTES = 1024 * 1024

_PDU_TYPES = frozenset(range(0x01, 0x08))
_P_DATA_TF = 0x04
_A_ASSOCIATE_RQ = 0x01
_A_ABORT = 0x07

# A-ABORT reasons when the source is the DICOM UL service provider (PS3.8 Table 9-26).
_ABORT_NOT_SPECIFIED = 0x00
_ABORT_UNRECOGNIZED_PDU = 0x01
_ABORT_UNEXPECTED_PDU = 0x02
_ABORT_INVALID_PARAMETER = 0x06


def _abort_pdu(reason: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # DICOM UL service-provider initiated abort
    pdu.reason_diagnostic = reason
    return pdu.encode()


def _local_limit_rj() -> bytes:
    pdu = A_ASSOCIATE_RJ()
    pdu.result = 0x02  # rejected-transient
    pdu.source = 0x03  # DICOM UL service-provider (presentation related function)
    pdu.reason_diagnostic = 0x02  # local-limit-exceeded
    return pdu.encode()


#: A-ASSOCIATE-RJ reasons (source: DICOM UL service-user) for the AE title fields.
_CALLING_AE_NOT_RECOGNIZED = 0x03
_CALLED_AE_NOT_RECOGNIZED = 0x07


def _identity_rj(reason: int = _CALLING_AE_NOT_RECOGNIZED) -> bytes:
    pdu = A_ASSOCIATE_RJ()
    pdu.result = 0x01  # rejected-permanent
    pdu.source = 0x01  # DICOM UL service-user
    pdu.reason_diagnostic = reason
    return pdu.encode()


def _calling_ae_of(pdu: bytes) -> str | None:
    """The Calling AE Title of an A-ASSOCIATE-RQ PDU (bytes 26-41), stripped; None if it has none."""
    if len(pdu) < 42:
        return None
    return pdu[26:42].decode("ascii", "replace").strip() or None


def _ae_title_problem(field: bytes) -> str | None:
    """Why a 16-byte AE title field of an A-ASSOCIATE-RQ is not an AE value, or None.

    PS3.5 Table 6.2-1: the default character repertoire without backslash and control
    characters, not only spaces; PS3.8 9.3.2 pads it with spaces. pynetdicom strips
    whitespace (a TAB included) before it compares, so ``PACS<TAB>`` would pass as ``PACS``:
    the bytes are checked here, as sent.
    """
    if not field.strip(b" "):
        return "only spaces"
    if any(b < 0x20 or b > 0x7E for b in field):
        return "a control character or a byte outside ASCII"
    if b"\\" in field:
        return "a backslash"
    return None


def _decode_request(pdu: bytes) -> tuple[A_ASSOCIATE_RQ | None, str | None]:
    """This A-ASSOCIATE-RQ decoded by pynetdicom, as its DUL would decode it, or why it cannot be.

    Returns ``(request, None)``, or ``(None, exception name)``: pynetdicom's DUL would answer
    A-ABORT and its association thread then wait for an indication that never comes, holding
    the connection's slot for the ACSE timeout. The decoded request is handed to the DUL
    (:class:`_ReceiveDUL`), which then does not decode it again (10-20 ms of UID checks for a
    sender proposing 128 presentation contexts, as dcmtk's storescu does by default)."""
    try:
        request = A_ASSOCIATE_RQ()
        request.decode(pdu)
        request.to_primitive()
    except Exception as exc:  # pynetdicom raises many types on hostile bytes
        return None, type(exc).__name__
    return request, None


def normalise_address(address: str) -> str:
    """The IP address as the node compares it: IPv4-mapped IPv6 as IPv4, no scope."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def resolve_peer_addresses(hosts) -> frozenset[str]:
    """Every address the peers' host names resolve to now (names that do not resolve are logged)."""
    found: set[str] = set()
    for host in dict.fromkeys(hosts):
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            logs.event("peer_host_unresolved", level="WARNING", host=host, error=str(exc)[:200])
            continue
        found.update(normalise_address(info[4][0]) for info in infos)
    return frozenset(found)


# -- reading ---------------------------------------------------------------------------------

def _recv_growing(sock: socket.socket, nr_bytes: int, deadline: float | None) -> bytearray:
    """Read ``nr_bytes`` from ``sock``, fewer if the peer closes first; never allocate ahead of the data.

    The buffer starts at ``min(nr_bytes, 256 KiB)`` and grows (doubling, by at most 1 MiB at
    a time) only when it is full, so a peer that declares 4 GiB and sends nothing costs at
    most 256 KiB here. ``deadline`` (``time.monotonic()``) bounds the whole read:
    :class:`TimeoutError` when it passes; ``None`` blocks as the socket is set up to.
    """
    buf = bytearray(min(nr_bytes, _FIRST_CHUNK))
    view = memoryview(buf)
    nr_read = 0
    try:
        while nr_read < nr_bytes:
            if nr_read == len(buf):
                view.release()
                size = len(buf)
                buf += bytes(min(nr_bytes, size + min(size, _GROWTH_STEP)) - size)
                view = memoryview(buf)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("read deadline passed")
                sock.settimeout(remaining)
            got = sock.recv_into(view[nr_read:], len(buf) - nr_read)
            if not got:  # connection closed: return what was read, as pynetdicom does
                break
            nr_read += got
    finally:
        view.release()
    del buf[nr_read:]
    return buf


def _send_and_finish(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` (a refusal PDU, or nothing), half-close, and let the peer read it.

    Discards what the peer still sends, for at most 0.5 s and 1 MiB, so that closing does
    not reset the connection before the PDU is read; the caller closes the socket.
    """
    try:
        sock.settimeout(_LINGER_SECONDS)
        if data:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _LINGER_SECONDS
        scratch = bytearray(16384)
        drained = 0
        while drained < _LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            got = sock.recv_into(scratch)
            if not got:
                break
            drained += got
    except OSError:
        pass


class _Refused(Exception):
    """Raised inside pynetdicom's DUL read to end an association the node refuses to read on.

    Deliberately not an ``OSError``: pynetdicom's reactor then takes its "exception in the
    DUL" path, which stops the DUL thread at once and lets the association thread finish,
    whatever the association was doing (an ``OSError`` would be a closed connection, whose
    handling races with an abort the association may have queued meanwhile).
    """


class _ReceiveSocket(transport.AssociationSocket):
    """An ``AssociationSocket`` that reads whole PDUs with few, large reads and without trusting
    their declared length.

    * :meth:`read_pdu` (called by :class:`_ReceiveDUL`) returns one PDU, 6-byte header and
      body, in one ``bytearray``: the body is read straight into it (``recv_into``), nothing is
      concatenated per PDU. Socket reads go through a per-connection read-ahead buffer of
      :data:`_READ_AHEAD` bytes: one ``recv_into`` takes whatever the socket has (on plain TCP
      usually the rest of one 128 KiB PDU and the next header), so a PDU costs about one system
      call instead of a header read, a body read and a timeout change per read; a large rest
      is read directly into the PDU. Over TLS (a :class:`~dicom_ai.node.tls_stream.TlsStream`)
      every read goes straight into the PDU: OpenSSL's decrypted record is the read-ahead there.
      ``benchmarks/results/tls_ingest_profile_*.md`` are the profiles.
    * The header's type is checked before the body is read: longer than the maximum length the
      node offers (P-DATA-TF; the acceptor's ``maximum_length``, 0 = unlimited) or than
      :data:`MAX_CONTROL_PDU` (any other type) -> A-ABORT and the association ends
      (:class:`_Refused`). A body up to 256 KiB is read into a buffer of its size; a longer
      one (only with ``max_pdu_size`` above that or 0) into a buffer that grows as the bytes
      arrive, as :func:`_recv_growing` does, so a declared length is never an allocation.
    * The header, and then the body, must each arrive within the association's network
      timeout (the node's ``limits.idle_seconds``) from when their read starts; a peer that
      starts a PDU and then trickles it is aborted.
    * ``recv(n)`` (pynetdicom's interface) reads through the same buffer and checks.
    * :meth:`preload`: bytes already read from the connection (the A-ASSOCIATE-RQ, read by
      :class:`_RequestHandler` before the association existed) are put in the read-ahead
      buffer; the socket reports itself ready while any bytes are buffered.

    State of its own is only class-level defaults until the first read, so an
    ``AssociationSocket`` can become one by changing its class.
    """

    _ahead: bytearray | None = None  # read-ahead buffer, allocated on first use
    _ahead_view: memoryview | None = None
    _start = 0  # buffered bytes are _ahead[_start:_end]
    _end = 0
    _header_type: int | None = None  # type of the PDU whose header the last recv() returned
    _refusals: "_RefusalLog | None" = None

    @property
    def ready(self) -> bool:
        if self._end > self._start:
            return True
        # A TlsStream may hold decrypted bytes, or TLS bytes already read, that select() cannot see.
        sock = self.socket
        if isinstance(sock, TlsStream) and self._is_connected and sock.pending():
            return True
        return super().ready

    def preload(self, data: bytes) -> None:
        """Put ``data`` (bytes read before the association existed) ahead of the socket's bytes."""
        self._ensure_buffer(len(data))
        self._ahead[:len(data)] = data
        self._start, self._end = 0, len(data)

    def _ensure_buffer(self, at_least: int = 0) -> None:
        if self._ahead is None or len(self._ahead) < at_least:
            self._ahead = bytearray(max(_READ_AHEAD, at_least))
            self._ahead_view = memoryview(self._ahead)

    def _limit_for(self, pdu_type: int) -> int:
        if pdu_type == _P_DATA_TF:
            return self.assoc.acceptor.maximum_length or 0
        return MAX_CONTROL_PDU

    def _check_length(self, pdu_type: int, length: int) -> None:
        limit = self._limit_for(pdu_type)
        if limit and length > limit:
            self._refuse("pdu_too_large", _ABORT_INVALID_PARAMETER, pdu_type=f"0x{pdu_type:02X}", limit=limit)

    def _read_into(self, dest: memoryview, deadline: float | None) -> int:
        """Fill ``dest`` from the read-ahead buffer, then the socket; fewer bytes only if the peer closed.

        :class:`TimeoutError` when ``deadline`` (``time.monotonic()``) passes first.
        """
        want = len(dest)
        got = min(want, self._end - self._start)
        if got:
            dest[:got] = self._ahead_view[self._start:self._start + got]
            self._start += got
        if got == want:
            return got
        self._ensure_buffer()
        self._start = self._end = 0
        sock = self.socket
        # OpenSSL's decrypted record is the read-ahead of a TlsStream: read it straight into
        # ``dest`` (a 6-byte header read decrypts one record and leaves the rest there), not
        # into the buffer here first, which would copy most of every PDU once more.
        direct = isinstance(sock, TlsStream)
        timeout_set = None
        while got < want:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("read deadline passed")
                # A timeout change costs a system call: only when the deadline has moved by more
                # than 10 ms since the last one (a read can then end at most 10 ms late).
                if timeout_set is None or timeout_set - remaining > 0.01:
                    sock.settimeout(remaining)
                    timeout_set = remaining
            rest = want - got
            if direct or rest >= len(self._ahead) // 2:  # large, or TLS: straight into the destination
                n = sock.recv_into(dest[got:], rest)
                if not n:
                    break
                got += n
            else:  # small: as much as the socket has, the surplus stays buffered
                n = sock.recv_into(self._ahead_view, len(self._ahead))
                if not n:
                    break
                k = min(n, rest)
                dest[got:got + k] = self._ahead_view[:k]
                got += k
                self._start, self._end = k, n
        return got

    def _read_timed(self, nr_bytes: int, header: bytes | bytearray = b"") -> bytearray:
        """``header`` followed by ``nr_bytes`` read (fewer if the peer closes first), in one buffer.

        The buffer holds at most 256 KiB beyond what has arrived (:func:`_recv_growing`'s
        policy); the read must end within the association's network timeout.
        """
        seconds = self.assoc.network_timeout
        deadline = None if seconds is None else time.monotonic() + seconds
        base = len(header)
        buf = bytearray(base + min(nr_bytes, _FIRST_CHUNK))
        buf[:base] = header
        nr_read = 0
        try:
            while True:
                with memoryview(buf) as view, view[base + nr_read:] as dest:
                    n = self._read_into(dest, deadline)
                nr_read += n
                if base + nr_read < len(buf) or nr_read == nr_bytes:  # closed, or complete
                    break
                buf.extend(bytes(min(nr_bytes - nr_read, min(nr_read, _GROWTH_STEP))))
        except TimeoutError:
            self._refuse("pdu_stalled", _ABORT_NOT_SPECIFIED, seconds=seconds)
        finally:
            if deadline is not None and self.socket is not None:
                try:
                    self.socket.settimeout(seconds)  # for pynetdicom's sends: a peer that stops reading
                except OSError:
                    pass
        del buf[base + nr_read:]
        return buf

    def read_pdu(self) -> bytearray:
        """The next PDU, header and body in one buffer; shorter than its header says if the peer
        closed first, only the header if its type is unknown. Raises :class:`_Refused` (after
        A-ABORT) for a length over the limit or a stalled read; ``OSError`` as the socket does."""
        pdu = self._read_timed(6)
        if len(pdu) < 6 or pdu[0] not in _PDU_TYPES:
            return pdu
        length = int.from_bytes(pdu[2:6], "big")
        self._check_length(pdu[0], length)
        return self._read_timed(length, pdu) if length else pdu

    def recv(self, nr_bytes: int) -> bytearray:
        """pynetdicom's read: ``recv(6)`` for a header, then ``recv(length)`` for its body, checked."""
        body_of, self._header_type = self._header_type, None
        if body_of is not None:
            self._check_length(body_of, nr_bytes)
        buf = self._read_timed(nr_bytes)
        if body_of is None and nr_bytes == 6 and len(buf) == 6 and buf[0] in _PDU_TYPES:
            self._header_type = buf[0]
        return buf

    def _refuse(self, reason: str, abort_reason: int, **fields) -> None:
        address = normalise_address(self.assoc.requestor.address)
        (self._refusals or _RefusalLog.direct).note(reason, address, response="A-ABORT", **fields)
        if self.socket is not None:
            _send_and_finish(self.socket, _abort_pdu(abort_reason))
        raise _Refused(f"{reason}: association aborted by the node")


class _ReceiveDUL(dul.DULServiceProvider):
    """pynetdicom's DUL whose PDU read is one :meth:`_ReceiveSocket.read_pdu` call.

    pynetdicom's own read asks the socket for the 6-byte header, then for the body, and
    concatenates the two into a third buffer (one copy of every PDU); here the PDU arrives in
    one buffer. What follows the read is pynetdicom's: the same state machine events for a
    closed connection (Evt17), an unknown or undecodable PDU (Evt19), and ``_decode_pdu``
    (EVT_PDU_RECV handlers included) for the rest; the A-ASSOCIATE-RQ the connection's thread
    has already decoded (:func:`_decode_request`) is not decoded a second time.
    """

    _decoded_request: tuple[bytes, A_ASSOCIATE_RQ] | None = None  # (its bytes, decoded)

    def _decode_pdu(self, bytestream: bytearray):
        cached, self._decoded_request = self._decoded_request, None
        if cached is not None and bytestream == cached[0]:
            data, request = cached
            # The events pynetdicom's own decoding triggers, with what it would pass.
            evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": data})
            evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": request})
            return request, "Evt6"
        if bytestream[0] == _P_DATA_TF and not self.assoc.get_handlers(evt.EVT_DATA_RECV):
            # pynetdicom copies every PDU to bytes for EVT_DATA_RECV (nobody listens here), and
            # its decoding then slices the copy three more times before the fragment is written
            # (PDU body, PDV item, value): decoded from a memoryview, the fragment the C-STORE
            # file receives is a view of the PDU as read, not its fifth copy.
            pdu = P_DATA_TF()
            pdu.decode(memoryview(bytestream))
            evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
            return pdu, "Evt10"
        return super()._decode_pdu(bytestream)

    def _read_pdu_data(self) -> None:
        try:
            pdu = self.socket.read_pdu()
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")  # transport connection closed
            return
        if len(pdu) < 6:
            self.event_queue.put("Evt17")
            return
        if pdu[0] not in _PDU_TYPES:
            self.event_queue.put("Evt19")  # unrecognised PDU
            return
        if len(pdu) != 6 + int.from_bytes(pdu[2:6], "big"):
            self.event_queue.put("Evt17")  # closed before the whole PDU came
            return
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception:  # pynetdicom raises many types on hostile bytes
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)


# -- refusals, slots -------------------------------------------------------------------------

class _RefusalLog:
    """``connection_refused`` events: the first of each (reason, address) at once, then one summary.

    Repeats within :data:`REFUSAL_LOG_WINDOW` seconds of the first are counted and written as
    one line (``repeated``) when the window closes (:meth:`flush`, called by the server's
    loop). At most ``max_keys`` (reason, address) pairs are tracked per window; refusals of
    further addresses are summed under the address ``"*"``. The fields are the node's own
    (address, reason, limit): nothing the peer sent is written.
    """

    direct: "_RefusalLog"  # an instance for sockets that belong to no server (set below)

    def __init__(self, window: float = REFUSAL_LOG_WINDOW, max_keys: int = 1024, clock=time.monotonic):
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], list] = {}  # (reason, address) -> [first seen, repeats, fields]

    def note(self, reason: str, address: str, **fields) -> None:
        metrics.CONNECTIONS_REFUSED.labels(reason=reason).inc()
        now = self._clock()
        ended = None
        with self._lock:
            key = (reason, address)
            if key not in self._open and len(self._open) >= self.max_keys:
                key = (reason, "*")
            entry = self._open.get(key)
            if entry is not None and now - entry[0] < self.window:
                entry[1] += 1
                return
            if entry is not None and entry[1]:  # its window is over and nobody flushed it
                ended = entry
            self._open[key] = [now, 0, fields]
        if ended is not None:
            self._summary(key, ended[1], ended[2])
        logs.event("connection_refused", level="WARNING", address=key[1], reason=reason, **fields)
        _audit_refusal(reason, key[1], fields)

    def _summary(self, key: tuple[str, str], repeats: int, fields: dict) -> None:
        logs.event("connection_refused", level="WARNING", address=key[1], reason=key[0], repeated=repeats,
                   window_seconds=self.window, **fields)
        _audit_refusal(key[0], key[1], fields, repeats, self.window)

    def flush(self, force: bool = False) -> None:
        now = self._clock()
        due = []
        with self._lock:
            for key, (first, repeats, fields) in list(self._open.items()):
                if force or now - first >= self.window:
                    del self._open[key]
                    if repeats:
                        due.append((key, repeats, fields))
        for key, repeats, fields in due:
            self._summary(key, repeats, fields)


_RefusalLog.direct = _RefusalLog()


def _audit_refusal(reason: str, address: str, fields: dict, repeats: int = 0, window: float = 0.0) -> None:
    """One PS3.15 A.5 Security Alert (110113, Node Authentication 110126) for a refused connection.

    Sent where the refusal log writes a line: the first refusal of each (reason, address) at
    once, later ones of the same window as one message with their number, so a flood costs
    at most one message per reason, address and window (and 1024 addresses per window).
    """
    text = f"connection refused ({reason}"
    text += f", {fields['response']})" if fields.get("response") else ")"
    if fields.get("why"):
        text += f": {fields['why']}"
    elif fields.get("limit"):
        text += f": limit {fields['limit']}"
    elif fields.get("seconds"):
        text += f": nothing complete after {fields['seconds']} s"
    if repeats:
        text = f"{repeats} more times in {window:g} s: {text}"
    calling = fields.get("calling_ae") or ""
    audit.security_alert(("110126", "Node Authentication"), text,
                         audit.Participant(calling or address, audit.SOURCE_ROLE, True, address))


@dataclass(frozen=True)
class ConnectionLimits:
    """What the acceptor allows a TCP connection before and around its association.

    ``node.max_associations``, ``node.max_pdu_size`` and ``limits.idle_seconds`` are the AE's
    ``maximum_associations``, ``maximum_pdu_size`` and ``network_timeout``, read from the AE
    when they are needed; the rest is here.
    """

    association_request_seconds: float = 10.0
    max_connections_per_address: int = 4
    reserved_peer_associations: int = 2
    #: Normalised IP addresses of the configured peers' hosts.
    peer_addresses: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: NodeConfig) -> "ConnectionLimits":
        lim = config.limits
        return cls(association_request_seconds=float(lim.association_request_seconds),
                   max_connections_per_address=int(lim.max_connections_per_address),
                   reserved_peer_associations=int(lim.reserved_peer_associations),
                   peer_addresses=resolve_peer_addresses(p.host for p in config.peers))


@dataclass
class _Connection:
    """One accepted TCP connection, from ``accept()`` to close."""

    address: str
    peer: bool
    slot: bool  # holds an association slot; False: accepted only to be answered A-ASSOCIATE-RJ
    deadline: float  # time.monotonic() by which the whole A-ASSOCIATE-RQ must have arrived
    request: socket.socket  # the TLS socket once the handshake has started
    handed_over: bool = False  # an Association reads the socket now
    certificate: dict | None = None  # the verified TLS client certificate (getpeercert())


class _Slots:
    """Counts connections per address and association slots per class (peer / any address)."""

    def __init__(self, ae: AE, limits: ConnectionLimits):
        self._ae = ae
        self._limits = limits
        self._lock = threading.Lock()
        self._per_address: dict[str, int] = {}
        self.slots = 0  # connections holding a slot
        self.waiting = 0  # connections held only to be rejected

    @property
    def total(self) -> int:
        return max(1, int(self._ae.maximum_associations))

    @property
    def reserved(self) -> int:
        """Slots only peers' addresses may take (none while no peer address is known)."""
        if not self._limits.peer_addresses:
            return 0
        return max(0, min(self._limits.reserved_peer_associations, self.total - 1))

    def _open_to(self, peer: bool) -> int:
        return self.total if peer else self.total - self.reserved

    def admit(self, address: str, peer: bool) -> str:
        """``"slot"``, ``"wait"`` (accept, then A-ASSOCIATE-RJ) or the reason to close at once."""
        with self._lock:
            if self._per_address.get(address, 0) >= self._limits.max_connections_per_address:
                return "per_address_limit"
            if self.slots < self._open_to(peer):
                self.slots += 1
                kind = "slot"
            elif self.waiting < self.total:
                self.waiting += 1
                kind = "wait"
            else:
                return "no_free_slot"
            self._per_address[address] = self._per_address.get(address, 0) + 1
            return kind

    def upgrade(self, conn: _Connection) -> str | None:
        """Give a waiting connection a slot if one of its class is free now; else why not."""
        with self._lock:
            if conn.slot:
                return None
            if self.slots < self._open_to(conn.peer):
                self.slots += 1
                self.waiting -= 1
                conn.slot = True
                return None
            return "local_limit_exceeded" if conn.peer or self.slots >= self.total else "reserved_for_peers"

    def release(self, conn: _Connection) -> None:
        with self._lock:
            if conn.slot:
                self.slots -= 1
            else:
                self.waiting -= 1
            left = self._per_address.get(conn.address, 1) - 1
            if left > 0:
                self._per_address[conn.address] = left
            else:
                self._per_address.pop(conn.address, None)

    def in_use(self) -> dict[str, int]:
        with self._lock:
            return {"slots": self.slots, "waiting": self.waiting, "addresses": len(self._per_address)}


# -- the acceptor ----------------------------------------------------------------------------

class _RequestHandler(transport.RequestHandler):
    """Serves one accepted connection of a :class:`NodeServer` until it is closed.

    Reads the A-ASSOCIATE-RQ itself, against the connection's absolute deadline and
    :data:`MAX_CONTROL_PDU`; answers A-ASSOCIATE-RJ when the connection holds no slot; else
    hands the socket, with the request already read, to a pynetdicom association (socket
    class :class:`_ReceiveSocket`) and waits for that association to end, so the slot is
    held exactly as long as the connection. Used by a plain pynetdicom server it behaves as
    pynetdicom's handler (with the :class:`_ReceiveSocket`).
    """

    _association_request: bytes = b""
    _decoded_request: A_ASSOCIATE_RQ | None = None

    def handle(self) -> None:
        server = self.server
        conn = server.connection_of(self.request) if isinstance(server, NodeServer) else None
        if conn is None:
            super().handle()
            return
        if server.tls_context is not None and not self._handshake(server, conn):
            return
        pdu = self._read_association_request(server, conn)
        if pdu is None:
            return
        # Refused here, by the connection's own thread, so the slot is free when it returns.
        for reason, field, rj_reason in (("invalid_calling_ae", bytes(pdu[26:42]), _CALLING_AE_NOT_RECOGNIZED),
                                         ("invalid_called_ae", bytes(pdu[10:26]), _CALLED_AE_NOT_RECOGNIZED)):
            why = _ae_title_problem(field) if len(pdu) >= 42 else "A-ASSOCIATE-RQ too short"
            if why is not None:
                server.refusals.note(reason, conn.address, response="A-ASSOCIATE-RJ", why=f"AE title with {why}",
                                     ae_title=field.decode("ascii", "backslashreplace"))
                _send_and_finish(self.request, _identity_rj(rj_reason))
                return
        request, error = _decode_request(bytes(pdu))
        if error is not None:
            server.refusals.note("undecodable_association_request", conn.address, response="A-ABORT", error=error)
            _send_and_finish(self.request, _abort_pdu(_ABORT_INVALID_PARAMETER))
            return
        if server.identity_check is not None:
            calling = _calling_ae_of(pdu)
            problem = None if calling is None else server.identity_check(calling, conn.address, conn.certificate)
            if problem is not None:
                reason, why = problem
                server.refusals.note(reason, conn.address, response="A-ASSOCIATE-RJ", calling_ae=calling, why=why)
                _send_and_finish(self.request, _identity_rj())
                return
        why_not = server.slots.upgrade(conn)
        if why_not is not None:
            server.refusals.note(why_not, conn.address, response="A-ASSOCIATE-RJ")
            _send_and_finish(self.request, _local_limit_rj())
            return
        self.request.settimeout(self.ae.network_timeout)
        self._association_request = bytes(pdu)
        self._decoded_request = request
        assoc = self._create_association()
        conn.handed_over = True
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()

    def _handshake(self, server: "NodeServer", conn: _Connection) -> bool:
        """Run the TLS handshake against the connection's deadline; False once refused and closed."""
        try:
            # A connection closed before its first byte (a port probe, a load balancer's TCP
            # check) is no refusal, as on the plain port: nothing to log or audit.
            self.request.settimeout(max(0.001, conn.deadline - time.monotonic()))
            if not self.request.recv(1, socket.MSG_PEEK):
                return False
        except TimeoutError:
            server.refusals.note("association_request_timeout", conn.address, response="TCP close",
                                 seconds=server.limits.association_request_seconds, during="TLS handshake")
            return False
        except OSError:
            return False
        try:
            tls = TlsStream(self.request, server.tls_context)
        except (ssl.SSLError, ValueError):
            return False
        # The TLS stream owns the plain socket now: it is what is read, shut down and closed.
        self.request = conn.request = tls
        try:
            tls.do_handshake(conn.deadline)
        except TimeoutError:
            server.refusals.note("association_request_timeout", conn.address, response="TCP close",
                                 seconds=server.limits.association_request_seconds, during="TLS handshake")
            return False
        except (ssl.SSLError, OSError) as exc:
            # Each kind of failure is its own reason, so one never hides behind another in the
            # rate-limited log and audit (a plain client and an unknown CA from one address).
            reason, why = handshake_failure(exc) or ("tls_handshake_failed", f"connection lost during the TLS "
                                                                             f"handshake ({type(exc).__name__})")
            server.refusals.note(reason, conn.address, response="TCP close", why=why[:300])
            return False
        conn.certificate = tls.getpeercert() or None
        return True

    def _read_association_request(self, server: "NodeServer", conn: _Connection) -> bytearray | None:
        """The complete A-ASSOCIATE-RQ PDU, or ``None`` once the connection has been dealt with."""
        sock = self.request
        try:
            header = _recv_growing(sock, 6, conn.deadline)
            if len(header) < 6:
                return None  # closed before a PDU: nothing to answer, nothing to report
            pdu_type, length = header[0], int.from_bytes(header[2:6], "big")
            if pdu_type != _A_ASSOCIATE_RQ:
                if pdu_type != _A_ABORT:  # an A-ABORT first: the peer gave up, just close
                    server.refusals.note("not_an_association_request", conn.address, response="A-ABORT")
                    _send_and_finish(sock, _abort_pdu(_ABORT_UNEXPECTED_PDU if pdu_type in _PDU_TYPES
                                                      else _ABORT_UNRECOGNIZED_PDU))
                return None
            if length > MAX_CONTROL_PDU:
                server.refusals.note("pdu_too_large", conn.address, response="A-ABORT", pdu_type="0x01",
                                     limit=MAX_CONTROL_PDU)
                _send_and_finish(sock, _abort_pdu(_ABORT_INVALID_PARAMETER))
                return None
            body = _recv_growing(sock, length, conn.deadline)
        except TimeoutError:
            server.refusals.note("association_request_timeout", conn.address, response="TCP close",
                                 seconds=server.limits.association_request_seconds)
            return None
        except OSError:  # reset by the peer, or closed by the server's shutdown
            return None
        if len(body) < length:
            return None
        header += body
        return header

    def _create_association(self):
        assoc = super()._create_association()
        # pynetdicom builds the socket inside this method and its constructor queues the
        # "transport connection open" event, so a second socket cannot simply replace it;
        # the subclass keeps its state in class-level defaults, so changing the class of this
        # one is equivalent.
        sock = assoc.dul.socket
        sock.__class__ = _ReceiveSocket
        sock.preload(self._association_request)
        assoc.dul.__class__ = _ReceiveDUL
        if self._decoded_request is not None:
            assoc.dul._decoded_request = (self._association_request, self._decoded_request)
        sock._refusals = getattr(self.server, "refusals", None)
        return assoc


class NodeServer(transport.ThreadedAssociationServer):
    """pynetdicom's threaded association server with the node's connection policy.

    Each accepted connection is admitted (per-address cap, slot class) in the accept loop and
    then served by a daemon thread of its own (:class:`_RequestHandler`), which holds its
    slot until the connection is closed. ``shutdown()`` stops accepting and closes the
    connections that have not sent their A-ASSOCIATE-RQ yet; established associations run on,
    as with pynetdicom's server.
    """

    request_queue_size = LISTEN_BACKLOG

    def __init__(self, ae, address, ae_title, contexts, ssl_context=None, evt_handlers=None,
                 request_handler=None, limits: ConnectionLimits | None = None, slots: "_Slots | None" = None,
                 refusals: _RefusalLog | None = None, identity_check=None):
        self.limits = limits or ConnectionLimits()
        self.refusals = refusals or _RefusalLog()
        self.slots = slots or _Slots(ae, self.limits)
        #: TLS context of this listener; the handshake runs in each connection's thread.
        self.tls_context: ssl.SSLContext | None = ssl_context
        #: ``(calling_ae, address, certificate) -> (reason, why) or None``: refuses who is not who it claims.
        self.identity_check = identity_check
        self._connections: dict[socket.socket, _Connection] = {}
        self._connections_lock = threading.Lock()
        #: Connections accepted from the listening socket so far, refused ones included.
        self.connections_accepted = 0
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers, request_handler or _RequestHandler)
        logs.event("scp_connection_limits", tls=ssl_context is not None, max_associations=self.slots.total,
                   reserved_for_peers=self.slots.reserved, peer_addresses=",".join(sorted(self.limits.peer_addresses)),
                   max_connections_per_address=self.limits.max_connections_per_address,
                   association_request_seconds=self.limits.association_request_seconds,
                   idle_seconds=ae.network_timeout, max_pdu_size=ae.maximum_pdu_size,
                   max_control_pdu=MAX_CONTROL_PDU)

    def connection_of(self, request: socket.socket) -> _Connection | None:
        return self._connections.get(request)

    def process_request(self, request, client_address) -> None:
        """Admit a just-accepted connection and start its thread, or close it at once."""
        self.connections_accepted += 1
        address = normalise_address(str(client_address[0]))
        peer = address in self.limits.peer_addresses
        kind = self.slots.admit(address, peer)
        if kind not in ("slot", "wait"):
            self.refusals.note(kind, address, response="TCP close")
            self.shutdown_request(request)
            return
        conn = _Connection(address=address, peer=peer, slot=kind == "slot",
                           deadline=time.monotonic() + self.limits.association_request_seconds, request=request)
        with self._connections_lock:
            self._connections[request] = conn
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address, conn),
                                  name=f"NodeConnection@{address}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: the connection cannot be served
            self._end(request, conn)
            self.refusals.note("no_thread", address, response="TCP close")

    def _serve_connection(self, request, client_address, conn: _Connection) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._end(request, conn)

    def _end(self, request, conn: _Connection) -> None:
        with self._connections_lock:
            self._connections.pop(request, None)
        self.slots.release(conn)
        self.shutdown_request(conn.request)  # the TLS socket, if the plain one was wrapped

    def service_actions(self) -> None:
        super().service_actions()
        self.refusals.flush()

    def server_close(self) -> None:
        super().server_close()
        with self._connections_lock:
            waiting = [c for c in self._connections.values() if not c.handed_over]
        for conn in waiting:  # wakes their threads, which then end and free their slots
            try:
                conn.request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.refusals.flush(force=True)


class ReceivingAE(AE):
    """pynetdicom's AE whose servers are :class:`NodeServer` with :class:`_RequestHandler`.

    ``start_server`` builds its server through ``make_server``, which hands extra keywords to
    the server's constructor; that is pynetdicom's way to choose the server and request
    handler classes. ``limits`` is the connection policy its servers apply.
    """

    def __init__(self, ae_title: str = "PYNETDICOM", limits: ConnectionLimits | None = None, identity_check=None):
        super().__init__(ae_title=ae_title)
        self.connection_limits = limits or ConnectionLimits()
        self.identity_check = identity_check
        # One set for all of this AE's servers (plain and TLS port): the limits are the node's.
        self.slots = _Slots(self, self.connection_limits)
        self.refusals = _RefusalLog()

    def make_server(self, address, ae_title=None, contexts=None, ssl_context=None, evt_handlers=None,
                    server_class=None, **kwargs):
        if server_class in (None, transport.AssociationServer, transport.ThreadedAssociationServer):
            server_class = NodeServer
        kwargs.setdefault("request_handler", _RequestHandler)
        if isinstance(server_class, type) and issubclass(server_class, NodeServer):
            kwargs.setdefault("limits", self.connection_limits)
            kwargs.setdefault("slots", self.slots)
            kwargs.setdefault("refusals", self.refusals)
            kwargs.setdefault("identity_check", self.identity_check)
        return super().make_server(address, ae_title=ae_title, contexts=contexts, ssl_context=ssl_context,
                                   evt_handlers=evt_handlers, server_class=server_class, **kwargs)


_receive_dir: Path | None = None


# Paths of received data sets whose file could not be written (disk full), -> the error.
_failed_receives: dict[str, OSError] = {}
_failed_lock = threading.Lock()


class _ReceiveFile:
    """The temporary file of one received data set, as pynetdicom writes it while it arrives.

    pynetdicom writes each fragment from its reader thread; an ``OSError`` there (ENOSPC on a
    full disk) aborts the association, and the sender sees a dropped connection rather than
    the status the node owes it. So a write error is recorded instead, the partial file is
    given up (its space freed) and the rest of the data set is discarded; the C-STORE handler
    asks :func:`receive_failed` and answers Out of Resources.
    """

    def __init__(self, ntf):
        self._ntf = ntf
        self.name = ntf.name
        self.file = self  # pynetdicom calls ``.file.flush()`` after each fragment

    def _give_up(self, exc: OSError) -> None:
        with _failed_lock:
            _failed_receives[self.name] = exc
        try:
            self._ntf.close()
        except OSError:
            pass  # the buffered bytes that did not fit: dropped on purpose
        try:
            with open(self.name, "wb"):
                pass  # truncate: the space goes back to the spool at once
        except OSError:
            pass

    def write(self, data) -> int:
        if self.name not in _failed_receives:
            try:
                return self._ntf.write(data)
            except OSError as exc:
                self._give_up(exc)
        return len(data)

    def flush(self) -> None:
        if self.name not in _failed_receives:
            try:
                self._ntf.file.flush()
            except OSError as exc:
                self._give_up(exc)

    def close(self) -> None:
        try:
            self._ntf.close()
        except OSError:
            pass

    def __enter__(self) -> "_ReceiveFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name):
        return getattr(self._ntf, name)


def receive_failed(path: str | Path) -> OSError | None:
    """The error with which writing the received data set at ``path`` failed, or None (once)."""
    with _failed_lock:
        return _failed_receives.pop(str(path), None)


def _receive_tempfile(*args, **kwargs):
    """``NamedTemporaryFile`` as pynetdicom calls it, in the installed receive folder."""
    kwargs.setdefault("dir", _receive_dir)
    return _ReceiveFile(tempfile.NamedTemporaryFile(*args, **kwargs))


def install_receive_path(incoming: Path) -> None:
    """Make pynetdicom stream each received C-STORE data set to a file in ``incoming``.

    Streaming keeps memory flat for 17 MB images, and a file on the storage file system can
    be renamed into the spool (atomic, no copy). pynetdicom 3.0 has no per-server setting for
    either, hence two process-wide changes, both confined to pynetdicom's C-STORE receive:

    * ``pynetdicom._config.STORE_RECV_CHUNKED_DATASET = True``, pynetdicom's documented
      switch (it concerns SCPs only, and the SCP here is the process's only one);
    * ``pynetdicom.dimse_messages.NamedTemporaryFile``, the one call that creates the file
      (without a folder), gets ``dir=incoming``. ``tempfile.tempdir`` and every other
      temporary file of the process are left alone.

    Idempotent. One receive folder per process: a later call with another folder re-points
    it (the node runs one SCP; tests start one at a time).
    """
    global _receive_dir
    if not hasattr(dimse_messages, "NamedTemporaryFile"):  # pynetdicom changed: do not fail silently
        raise RuntimeError("pynetdicom.dimse_messages no longer creates received data sets with "
                           "NamedTemporaryFile; install_receive_path needs updating")
    _receive_dir = Path(incoming)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _receive_tempfile


def build_receiving_ae(config: NodeConfig, storage_contexts: dict[str, list[str]],
                       verification_syntaxes: list[str], identity_check=None) -> ReceivingAE:
    """The acceptor AE of the node: its AE title, connection and association limits, timeouts, contexts.

    Resolves the peers' host names now (:func:`resolve_peer_addresses`): the addresses that
    may use the reserved slots are those of this moment.

    Parameters
    ----------
    config
        The node configuration (``[node]``, ``[limits]`` and ``[[peers]]``).
    storage_contexts
        Storage SOP Class UID -> the transfer syntax UIDs accepted for it.
    verification_syntaxes
        Transfer syntax UIDs accepted for Verification (C-ECHO).
    identity_check
        ``(calling_ae, address, certificate) -> (reason, why) or None``, applied to every
        A-ASSOCIATE-RQ before pynetdicom sees it; None: AE titles only.
    """
    ae = ReceivingAE(ae_title=config.node.ae_title, limits=ConnectionLimits.from_config(config),
                     identity_check=identity_check)
    ae.maximum_associations = config.node.max_associations
    ae.maximum_pdu_size = config.node.max_pdu_size
    ae.require_called_aet = True
    if not config.node.allow_any_caller:
        ae.require_calling_aet = [p.ae_title for p in config.peers]
    # ACSE: the A-ASSOCIATE-RQ is read by the node against the same deadline; pynetdicom uses
    # this for its ARTIM timer (waiting for the peer to close after a release or an abort).
    ae.acse_timeout = config.limits.association_request_seconds
    ae.dimse_timeout = 60
    ae.network_timeout = config.limits.idle_seconds
    ae.add_supported_context(Verification, list(verification_syntaxes))
    for uid, syntaxes in storage_contexts.items():
        ae.add_supported_context(uid, list(syntaxes))
    return ae
