"""The node's Storage SCP: C-ECHO and C-STORE of digital mammograms into a durable spool.

Association policy
    * The Called AE Title must be the node's AE title (else rejected, reason 7).
    * The Calling AE Title must be a configured peer unless ``allow_any_caller`` (else
      rejected permanently, reason 3 "calling AE title not recognized").
    * At most ``max_associations`` concurrent associations; more are rejected transiently.
    * Presentation contexts: Verification, and the two SOP classes of
      :data:`SUPPORTED_SOP_CLASSES`, each with every transfer syntax of
      :data:`SUPPORTED_TRANSFER_SYNTAXES`; any other abstract syntax or transfer syntax is
      refused at negotiation (result 3 / 4). The node is SCP only (no SCP/SCU role selection).

C-STORE statuses
    * ``0x0000`` Success: only after the data set is in the spool (temporary file fsynced,
      renamed, directory fsynced) and recorded in the job store. A SOP Instance UID already
      in the store is answered Success without storing or processing it again.
    * ``0xA700`` Refused: Out of Resources: less than ``reserve_free_mb`` free, disk full or
      another storage/job store error.
    * ``0xA900`` Error: Data Set Does Not Match SOP Class: readable, but no Pixel Data, a
      required attribute missing, SOP Class or Modality not mammography.
    * ``0xC000`` Error: Cannot Understand: the data set or its Pixel Data cannot be parsed.
    Failure responses carry an Error Comment saying why.

The data set is kept exactly as received (same transfer syntax, every element including
private ones); nothing is coerced. pynetdicom streams it to a temporary file in
``<storage>/incoming`` while it arrives, so memory stays flat for large images
(:func:`install_receive_path`, the one process-wide setting the SCP needs).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pynetdicom import AE, _config, dimse_messages, evt, transport
from pynetdicom.sop_class import Verification
from pynetdicom.status import Status

from dicom_ai.core.errors import ConfigError
from dicom_ai.core.views import laterality_of, view_of
from dicom_ai.node import logs
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.jobstore import Instance, JobStore
from dicom_ai.node.storage import fsync_dir, fsync_file

#: Storage SOP classes the node accepts (UID -> name as in PS3.4 Annex B).
SUPPORTED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
}

#: Transfer syntaxes accepted for every storage SOP class (UID -> name as in PS3.6).
SUPPORTED_TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 SV1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless Image Compression",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Lossy (Near-Lossless) Image Compression",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 Image Compression",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}

#: Transfer syntaxes accepted for Verification.
VERIFICATION_TRANSFER_SYNTAXES: tuple[str, ...] = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")

SUCCESS = Status.SUCCESS
# pynetdicom names no storage failure codes (its Status enum has only the general ones, and
# Status.add would change that class for the whole process); these are the first code of each
# PS3.4 B.2.3 range, checked against pynetdicom's STORAGE_SERVICE_CLASS_STATUS in test_scp.py.
OUT_OF_RESOURCES = 0xA700           # "Refused: Out of Resources"
DOES_NOT_MATCH_SOP_CLASS = 0xA900   # "Data Set Does Not Match SOP Class" (Error)
CANNOT_UNDERSTAND = 0xC000          # "Cannot Understand"

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns", "BitsAllocated",
             "SamplesPerPixel", "PhotometricInterpretation")
# First bytes of the first fragment for each encapsulated transfer syntax.
_MARKERS = {
    "1.2.840.10008.1.2.4.70": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.80": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.81": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.90": (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  "),
    "1.2.840.10008.1.2.4.91": (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  "),
}


class Rejected(Exception):
    """A C-STORE that must be answered with a failure ``status``."""

    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment


class StorageSCP:
    """Receives into ``<storage>/spool/<Study Instance UID>/<SOP Instance UID>.dcm``."""

    def __init__(self, config: NodeConfig, store: JobStore):
        self.config = config
        self.store = store
        self.layout = config.layout
        self.storage = self.layout.root
        self.spool = self.layout.spool
        self.incoming = self.layout.incoming
        self.server = None
        self.port: int | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> int:
        """Start listening (non-blocking); returns the bound port.

        Points pynetdicom's receive path at this SCP's ``incoming`` folder first
        (:func:`install_receive_path`, process-wide: see there why).
        """
        if not self.config.node.allow_any_caller and not self.config.peers:
            raise ConfigError("no peers are configured and node.allow_any_caller is false: nobody could send")
        for d in (self.spool, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        # Partial transfers of a previous run: never acknowledged, so the sender resends.
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
        install_receive_path(self.incoming)
        ae = _ReceivingAE(ae_title=self.config.node.ae_title)
        ae.maximum_associations = self.config.node.max_associations
        ae.maximum_pdu_size = self.config.node.max_pdu_size
        ae.require_called_aet = True
        if not self.config.node.allow_any_caller:
            ae.require_calling_aet = [p.ae_title for p in self.config.peers]
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 60
        ae.add_supported_context(Verification, list(VERIFICATION_TRANSFER_SYNTAXES))
        for uid in SUPPORTED_SOP_CLASSES:
            ae.add_supported_context(uid, list(SUPPORTED_TRANSFER_SYNTAXES))
        handlers = [(evt.EVT_CONN_OPEN, self._on_connection), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ABORTED, self._on_aborted)]
        self.server = ae.start_server((self.config.node.bind_address, self.config.node.port), block=False,
                                      evt_handlers=handlers)
        self.port = int(self.server.server_address[1])
        logs.event("scp_listening", ae_title=self.config.node.ae_title, address=self.config.node.bind_address,
                   port=self.port, allow_any_caller=self.config.node.allow_any_caller,
                   peers=",".join(p.ae_title for p in self.config.peers))
        return self.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # -- event handlers ------------------------------------------------------------------

    def _on_connection(self, event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
        if sock is not None:
            # Responses are small PDUs: send them at once rather than after a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_echo(self, event: evt.Event) -> int:
        logs.event("echo", calling_ae=event.assoc.requestor.ae_title, address=event.assoc.requestor.address)
        return SUCCESS

    def _on_accepted(self, event: evt.Event) -> None:
        a = event.assoc
        logs.event("association_accepted", calling_ae=a.requestor.ae_title, address=a.requestor.address,
                   contexts=len(a.accepted_contexts), refused_contexts=len(a.rejected_contexts))

    def _on_rejected(self, event: evt.Event) -> None:
        a = event.assoc
        logs.event("association_rejected", level="WARNING", calling_ae=a.requestor.ae_title,
                   called_ae=a.acceptor.ae_title, address=a.requestor.address)

    def _on_aborted(self, event: evt.Event) -> None:
        logs.event("association_aborted", level="WARNING", calling_ae=event.assoc.requestor.ae_title)

    def _on_store(self, event: evt.Event) -> Dataset | int:
        started = time.monotonic()
        req = event.request
        calling_ae = event.assoc.requestor.ae_title
        sop_uid = str(req.AffectedSOPInstanceUID)
        tmp = Path(event.dataset_path)
        try:
            status, detail = self._store(tmp, calling_ae, str(req.AffectedSOPClassUID), sop_uid,
                                         str(event.context.transfer_syntax))
        except Rejected as exc:
            logs.event("store_refused", level="WARNING", calling_ae=calling_ae, sop_instance_uid=sop_uid,
                       status=f"0x{exc.status:04X}", reason=exc.comment)
            tmp.unlink(missing_ok=True)
            rsp = Dataset()
            rsp.Status = exc.status
            rsp.ErrorComment = exc.comment[:64]
            return rsp
        logs.event("instance_received" if status == "stored" else "instance_duplicate", calling_ae=calling_ae,
                   sop_instance_uid=sop_uid, seconds=round(time.monotonic() - started, 4), **detail)
        return SUCCESS

    # -- the store itself ----------------------------------------------------------------

    def _store(self, tmp: Path, calling_ae: str, sop_class: str, sop_uid: str, ts: str) -> tuple[str, dict]:
        if self.store.find_instance(sop_uid):
            tmp.unlink(missing_ok=True)
            return "duplicate", {}
        reserve = self.config.node.reserve_free_mb * 1024 * 1024
        try:
            free = shutil.disk_usage(self.storage).free
        except OSError as exc:
            raise Rejected(OUT_OF_RESOURCES, f"storage not usable: {exc.strerror}") from exc
        if free < reserve:
            raise Rejected(OUT_OF_RESOURCES, f"storage below reserve ({free // 2**20} MiB free)")
        ds = _read_and_check(tmp, sop_class, sop_uid, ts)
        study_uid = str(ds.StudyInstanceUID)
        target_dir = self.layout.spool_study(study_uid)
        target = target_dir / f"{sop_uid}.dcm"
        try:
            new_dir = not target_dir.exists()
            target_dir.mkdir(parents=True, exist_ok=True)
            fsync_file(tmp)
            os.rename(tmp, target)
            fsync_dir(target_dir)
            if new_dir:
                fsync_dir(self.spool)
            size = target.stat().st_size
            instance = Instance(sop_instance_uid=sop_uid, sop_class_uid=sop_class, transfer_syntax=ts,
                                laterality=laterality_of(ds), view=view_of(ds), path=str(target))
            new = self.store.record_instance(study_uid=study_uid, calling_ae=calling_ae, instance=instance,
                                             size=size)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise Rejected(OUT_OF_RESOURCES, "storage full" if full else f"storage error: {exc.strerror}") from exc
        except Exception as exc:  # the job store (sqlite3 errors) refused the record
            raise Rejected(OUT_OF_RESOURCES, f"job store error: {type(exc).__name__}") from exc
        detail = {"study_instance_uid": study_uid, "transfer_syntax": ts, "bytes": size,
                  "laterality": instance.laterality, "view": instance.view}
        return ("stored" if new else "duplicate"), detail


def _read_and_check(path: Path, sop_class: str, sop_uid: str, ts: str) -> pydicom.Dataset:
    """Parse the received file lazily and check it is a mammogram we can process."""
    try:
        ds = pydicom.dcmread(path, defer_size=4096)
        missing = [k for k in _REQUIRED if k not in ds or ds[k].value in (None, "")]
        ds_class = str(ds.get("SOPClassUID", ""))
        ds_uid = str(ds.get("SOPInstanceUID", ""))
        modality = str(ds.get("Modality", ""))
        has_pixels = "PixelData" in ds
    except Exception as exc:  # pydicom raises many types for malformed streams
        raise Rejected(CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}") from exc
    if ds_class != sop_class:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request")
    if ds_uid != sop_uid:
        raise Rejected(CANNOT_UNDERSTAND, "SOP Instance UID differs from the request")
    if not has_pixels:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data")
    if missing:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"missing {missing[0]}")
    for name, uid in (("SOP Instance UID", ds_uid), ("Study Instance UID", str(ds.StudyInstanceUID))):
        # The UIDs name spool files and folders: only a valid UID may get that far.
        if len(uid) > 64 or not _UID_RE.fullmatch(uid):
            raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"invalid {name}")
    if modality != "MG":
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"Modality is {modality or 'empty'}, not MG")
    try:
        _check_pixel_data(ds, ts)
    except Rejected:
        raise
    except Exception as exc:
        raise Rejected(CANNOT_UNDERSTAND, f"Pixel Data unreadable: {type(exc).__name__}") from exc
    return ds


def _check_pixel_data(ds: pydicom.Dataset, ts: str) -> None:
    """Structural check without decoding: native length, or encapsulation and codec marker."""
    elem = ds.get_item("PixelData", keep_deferred=True)  # do not read 17 MB to learn its length
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if ts in _MARKERS or ts == "1.2.840.10008.1.2.5":
        value = ds.PixelData
        frame = get_frame(value, 0, number_of_frames=frames)
        if ts in _MARKERS:
            if not any(frame.startswith(m) for m in _MARKERS[ts]):
                raise Rejected(CANNOT_UNDERSTAND, "Pixel Data is not a codestream of its transfer syntax")
        elif len(frame) < 64 or not 1 <= int.from_bytes(frame[:4], "little") <= 15:
            raise Rejected(CANNOT_UNDERSTAND, "Pixel Data is not a valid RLE frame")
        return
    expected = rows * cols * spp * frames * bits // 8
    length = elem.length if getattr(elem, "value", None) is None else len(ds.PixelData)
    if length < expected:
        raise Rejected(CANNOT_UNDERSTAND, f"Pixel Data has {length} bytes, expected {expected}")


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


class _ReceivingAE(AE):
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
