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
import shutil
import socket
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import evt

from dicom_ai.core.errors import ConfigError
from dicom_ai.core.views import laterality_of, view_of
from dicom_ai.node import logs
from dicom_ai.node.admission import OUT_OF_RESOURCES, SUCCESS, Rejected, check_dataset
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.jobstore import Instance, JobStore
from dicom_ai.node.storage import fsync_dir, fsync_file
from dicom_ai.node.transport import build_receiving_ae, install_receive_path

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
        ae = build_receiving_ae(self.config, {uid: list(SUPPORTED_TRANSFER_SYNTAXES) for uid in SUPPORTED_SOP_CLASSES},
                                list(VERIFICATION_TRANSFER_SYNTAXES))
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
        ds = check_dataset(tmp, sop_class, sop_uid, ts)
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
