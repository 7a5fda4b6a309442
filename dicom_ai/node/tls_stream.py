"""The server side of one DICOM TLS connection, run over ``ssl.MemoryBIO`` instead of an ``SSLSocket``.

Python's ``SSLSocket`` lets OpenSSL read the socket itself, and OpenSSL (without read-ahead,
which pynetdicom's ``select``-based ``ready`` cannot see) reads each TLS record with two system
calls: its 5-byte header, then its body, at most 16 KiB. A 17 MB mammogram is about 1100
records, so 2200 ``recv`` calls and as many GIL round trips on the node's reading thread.
:class:`TlsStream` reads the socket itself, up to :data:`READ_SIZE` bytes a call, into an
``ssl.MemoryBIO`` from which an ``ssl.SSLObject`` decrypts (``benchmarks/bench_receive_path.py``
measures the reading thread's CPU both ways).

Only the transport changes: the handshake, certificate verification and the client-certificate
policy are OpenSSL's with the listener's ``ssl.SSLContext`` (:func:`dicom_ai.node.tls.server_context`),
failures raise the same ``ssl.SSLError`` (named by :func:`dicom_ai.node.tls.handshake_failure`),
and the alerts OpenSSL produces on failure are sent to the peer as an ``SSLSocket`` sends them.

It offers the part of the socket interface the node and pynetdicom use on an accepted
connection: ``recv``/``recv_into`` (as an ``SSLSocket`` with ``suppress_ragged_eofs``: 0 bytes
at the end of the stream, with or without the peer's close_notify), ``send``/``sendall``,
``settimeout``, ``shutdown`` (sends close_notify once before the TCP half-close), ``close``,
``fileno`` (for ``select``), ``pending``, ``getpeercert``, ``version``, ``cipher``,
``setsockopt``. Timeouts are the plain socket's, per system call, as with ``SSLSocket``;
:meth:`TlsStream.do_handshake` also takes an absolute deadline.

Threads: pynetdicom reads and sends from the association's DUL thread, but the server may
shut a connection down from another thread; every ``SSLObject`` call is made under one lock,
and producing encrypted bytes and sending them happen under a second one, so records leave in
the order OpenSSL made them. Socket reads are made outside both locks.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

__all__ = ["READ_SIZE", "TlsStream"]

#: Bytes asked of the socket per read: up to 16 TLS records of 16 KiB.
READ_SIZE = 256 * 1024


class TlsStream:
    """A server-side TLS connection on the accepted socket ``raw`` (which it then owns).

    Parameters
    ----------
    raw : socket.socket
        The accepted TCP connection, before any TLS byte has been read from it.
    context : ssl.SSLContext
        The listener's server context: certificate, CA bundle, verify mode, versions, ciphers.
    """

    def __init__(self, raw: socket.socket, context: ssl.SSLContext):
        self._raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._chunk = bytearray(READ_SIZE)
        self._chunk_view = memoryview(self._chunk)
        self._ssl_lock = threading.Lock()  # every SSLObject call
        self._send_lock = threading.Lock()  # encrypt-and-send, in order (taken before _ssl_lock)
        self._eof = False  # the socket returned end of stream (written to the incoming BIO)
        self._handshake_done = False
        self._close_notify_sent = False

    # -- plain socket ---------------------------------------------------------------------

    def fileno(self) -> int:
        return self._raw.fileno()

    def settimeout(self, seconds: float | None) -> None:
        self._raw.settimeout(seconds)

    def gettimeout(self) -> float | None:
        return self._raw.gettimeout()

    def setsockopt(self, *args) -> None:
        self._raw.setsockopt(*args)

    def getsockopt(self, *args):
        return self._raw.getsockopt(*args)

    def getpeername(self):
        return self._raw.getpeername()

    def getsockname(self):
        return self._raw.getsockname()

    def close(self) -> None:
        self._raw.close()

    # -- TLS state ------------------------------------------------------------------------

    def version(self) -> str | None:
        """The negotiated protocol (``"TLSv1.3"``), None before the handshake."""
        return self._tls.version()

    def cipher(self):
        return self._tls.cipher()

    def getpeercert(self, binary_form: bool = False):
        """The peer's verified certificate, as ``SSLSocket.getpeercert`` gives it."""
        return self._tls.getpeercert(binary_form)

    def pending(self) -> int:
        """Bytes held here that a ``select`` on the socket cannot see: decrypted data, and TLS
        bytes already read from the socket (possibly part of a record)."""
        return self._tls.pending() + self._incoming.pending

    # -- internals ------------------------------------------------------------------------

    def _fill(self, deadline: float | None = None) -> None:
        """Read once from the socket into the incoming BIO (end of stream: its EOF).

        ``TimeoutError`` when ``deadline`` (``time.monotonic()``) has passed or the socket's
        timeout expires; ``OSError`` as the socket raises it.
        """
        if self._eof:
            return
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("TLS handshake deadline passed")
            self._raw.settimeout(remaining)
        n = self._raw.recv_into(self._chunk_view, READ_SIZE)
        with self._ssl_lock:
            if n:
                self._incoming.write(self._chunk_view[:n])
            else:
                self._eof = True
                self._incoming.write_eof()

    def _flush(self) -> None:
        """Send what OpenSSL has produced (handshake messages, alerts, session tickets)."""
        with self._send_lock:
            with self._ssl_lock:
                data = self._outgoing.read()
            if data:
                self._raw.sendall(data)

    def _flush_quietly(self) -> None:
        """:meth:`_flush` where the connection is failing anyway (an alert to a peer that may be gone)."""
        try:
            self._flush()
        except OSError:
            pass

    # -- handshake, reading, sending --------------------------------------------------------

    def do_handshake(self, deadline: float | None = None) -> None:
        """Run the server handshake; ``deadline`` (``time.monotonic()``) bounds all of it.

        Raises ``ssl.SSLError`` as ``SSLSocket.do_handshake`` does (after sending OpenSSL's
        alert), ``TimeoutError``, or ``OSError`` (the peer closed or reset: ``ssl.SSLEOFError``
        when it closed mid-handshake).
        """
        while True:
            try:
                with self._ssl_lock:
                    self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill(deadline)
            except ssl.SSLError:
                self._flush_quietly()
                raise
        self._handshake_done = True
        self._flush()  # the server's Finished (TLS 1.2) or session tickets (TLS 1.3)

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        """Decrypted bytes into ``buffer`` (at most ``nbytes``, 0 = its length): at least one,
        blocking as the socket's timeout allows; 0 at the end of the stream.

        Returns as much as is decrypted without another socket read (several records), so a
        caller reading a 128 KiB PDU body makes one call per socket read, not one per record.
        """
        nbytes = nbytes or len(buffer)
        if nbytes <= 0:
            return 0
        view = memoryview(buffer).cast("B") if not isinstance(buffer, memoryview) else buffer
        got = 0
        try:
            while got < nbytes:
                try:
                    with self._ssl_lock:
                        n = self._tls.read(nbytes - got, view[got:] if got else view)
                except ssl.SSLWantReadError:
                    if got or self._eof:
                        break  # return what there is rather than wait for more
                    if self._outgoing.pending:  # e.g. the answer to a TLS 1.3 KeyUpdate
                        self._flush()
                    self._fill()
                    continue
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    break  # end of stream, with or without close_notify
                except ssl.SSLError:
                    if got:
                        break  # the error comes again on the next read
                    self._flush_quietly()
                    raise
                if not n:
                    break  # close_notify received
                got += n
        finally:
            if view is not buffer:
                view.release()
        return got

    def recv(self, bufsize: int) -> bytes:
        buf = bytearray(bufsize)
        n = self.recv_into(buf, bufsize)
        del buf[n:]
        return bytes(buf)

    def sendall(self, data) -> None:
        """Encrypt ``data`` and send all of it (``OSError``/``TimeoutError`` as the socket raises)."""
        with memoryview(data) as view, view.cast("B") as flat:
            with self._send_lock:
                sent = 0
                while sent < len(flat):
                    with self._ssl_lock:
                        sent += self._tls.write(flat[sent:])
                        out = self._outgoing.read()
                    self._raw.sendall(out)

    def send(self, data) -> int:
        """As :meth:`sendall` (pynetdicom loops on ``send``): returns ``len(data)``."""
        self.sendall(data)
        return len(data)

    def shutdown(self, how: int) -> None:
        """Send TLS close_notify (once, after a completed handshake) before a write shutdown,
        then shut the socket down; ``OSError`` as ``socket.shutdown`` raises it."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and self._handshake_done and not self._close_notify_sent:
            self._close_notify_sent = True
            try:
                with self._ssl_lock:
                    self._tls.unwrap()
            except (ssl.SSLError, ValueError):
                pass  # SSLWantReadError: close_notify is written, the peer's not yet read (not waited for)
            self._flush_quietly()
        self._raw.shutdown(how)
