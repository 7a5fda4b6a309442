"""The node's network layer under pynetdicom: the acceptor's socket and request handler.

pynetdicom's AE runs the DICOM upper layer; this module holds the few places where the node
changes how the acceptor reads from the network, and the one process-wide setting its C-STORE
receive needs (:func:`install_receive_path`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pynetdicom import AE, _config, dimse_messages, transport
from pynetdicom.sop_class import Verification

from dicom_ai.node.config import NodeConfig

class _ReceiveSocket(transport.AssociationSocket):
    """An ``AssociationSocket`` whose ``recv`` reads straight into one buffer.

    pynetdicom 3.0 reads PDUs 4 KiB at a time and appends each piece to a bytearray; this
    reads the same bytes with ``recv_into`` and returns the same type, so every caller sees
    the same behaviour. Reading four 17 MB images in 128 KiB PDUs over loopback TCP took
    25 ms instead of 38 ms (pynetdicom 3.0.4, a quiet-ish shared 2-core machine); the whole
    receive is benchmarks/bench_ingest.py. No state of its own, so an ``AssociationSocket``
    can become one.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        nr_read = 0
        while nr_read < nr_bytes:
            got = self.socket.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not got:  # connection closed: return what was read, as pynetdicom does
                view.release()
                del buf[nr_read:]
                return buf
            nr_read += got
        view.release()
        return buf


class _RequestHandler(transport.RequestHandler):
    """pynetdicom's acceptor handler, giving each association a :class:`_ReceiveSocket`."""

    def _create_association(self):
        assoc = super()._create_association()
        # pynetdicom builds the socket inside this method and its constructor queues the
        # "transport connection open" event, so a second socket cannot simply replace it;
        # the subclass adds no state, so changing the class of this one is equivalent.
        assoc.dul.socket.__class__ = _ReceiveSocket
        return assoc


class ReceivingAE(AE):
    """pynetdicom's AE whose servers accept with :class:`_RequestHandler`.

    ``start_server`` builds its server through ``make_server``, which hands extra keywords
    to the server's constructor; that is pynetdicom's way to choose the request handler, and
    it keeps the faster socket to this SCP's associations (no other AssociationSocket).
    """

    def make_server(self, *args, **kwargs):
        kwargs.setdefault("request_handler", _RequestHandler)
        return super().make_server(*args, **kwargs)


_receive_dir: Path | None = None


def _receive_tempfile(*args, **kwargs):
    """``NamedTemporaryFile`` as pynetdicom calls it, in the installed receive folder."""
    kwargs.setdefault("dir", _receive_dir)
    return tempfile.NamedTemporaryFile(*args, **kwargs)


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
                       verification_syntaxes: list[str]) -> ReceivingAE:
    """The acceptor AE of the node: its AE title, association limits, timeouts and contexts.

    Parameters
    ----------
    config
        The node configuration (``[node]`` and ``[limits]``; ``[[peers]]`` when callers are
        restricted).
    storage_contexts
        Storage SOP Class UID -> the transfer syntax UIDs accepted for it.
    verification_syntaxes
        Transfer syntax UIDs accepted for Verification (C-ECHO).
    """
    ae = ReceivingAE(ae_title=config.node.ae_title)
    ae.maximum_associations = config.node.max_associations
    ae.maximum_pdu_size = config.node.max_pdu_size
    ae.require_called_aet = True
    if not config.node.allow_any_caller:
        ae.require_calling_aet = [p.ae_title for p in config.peers]
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    ae.add_supported_context(Verification, list(verification_syntaxes))
    for uid, syntaxes in storage_contexts.items():
        ae.add_supported_context(uid, list(syntaxes))
    return ae
