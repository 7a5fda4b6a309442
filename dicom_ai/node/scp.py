"""The node's Storage SCP: C-ECHO and C-STORE of digital mammograms into a durable spool.

Association policy
    * Both AE titles must be AE values as sent: no control character (a TAB included), no
      backslash, no byte outside ASCII, not only spaces (else rejected permanently, reason 3
      for the calling, 7 for the called AE title; logged as ``connection_refused``).
    * The Called AE Title must be the node's AE title (else rejected, reason 7).
    * The Calling AE Title must be a configured peer unless ``allow_any_caller`` (else
      rejected permanently, reason 3 "calling AE title not recognized").
    * Peer identity (optional, per ``[[peers]]``): ``require_address = true`` accepts the AE
      title only from the addresses its ``host`` resolves to at start; ``certificate_subject``
      accepts it only over TLS with a verified client certificate whose subject CN or a DNS/IP
      SAN is that name. Otherwise rejected permanently, reason 3, with the reason logged
      (``connection_refused``, reasons ``peer_address_mismatch``,
      ``peer_certificate_missing``, ``peer_certificate_mismatch``) and audited (Security Alert, Node
      Authentication). Checked on the A-ASSOCIATE-RQ before pynetdicom sees it
      (:mod:`~dicom_ai.node.transport`).
    * Listeners: ``node.port`` (plain) and, with ``tls.port``, a DICOM TLS port (PS3.15 Annex
      B, BCP 195: :mod:`~dicom_ai.node.tls`); ``tls.plain_port = false`` leaves only the TLS one.
    * At most ``max_associations`` concurrent associations; more are rejected transiently.
    * Presentation contexts: Verification, and the two SOP classes of
      :data:`SUPPORTED_SOP_CLASSES`, each with every transfer syntax of
      :data:`SUPPORTED_TRANSFER_SYNTAXES`; any other abstract syntax or transfer syntax is
      refused at negotiation (result 3 / 4). The node is SCP only (no SCP/SCU role selection).

C-STORE statuses
    * ``0x0000`` Success: only after the data set passed :mod:`~dicom_ai.node.admission`,
      is in the spool (temporary file fsynced, renamed, directory fsynced) and recorded in
      the job store. A SOP Instance UID already in the store is answered Success without
      storing or processing it again.
    * ``0xA700`` Refused: Out of Resources (transient: resend later): less than
      ``reserve_free_mb`` free, disk full, an I/O error of the storage, or the job store
      cannot commit (``sqlite3.OperationalError``).
    * ``0xA900`` Error: Data Set Does Not Match SOP Class (permanent): readable, but no Pixel
      Data, a required attribute missing or of the wrong type, SOP Class or Modality not
      mammography, not single-frame MONOCHROME1/2 with one sample and 8 or 16 bits
      allocated, an Image Pixel attribute outside its allowed values (High Bit not Bits
      Stored - 1, Pixel Representation or Planar Configuration not 0/1), beyond ``[limits]`` (``max_rows``, ``max_columns``, ``max_pixels``,
      ``max_dataset_mb`` as received or inflated).
    * ``0xC000`` Error: Cannot Understand (permanent): the data set does not parse to the end
      of the file (cut off, trailing bytes, bad VR, unterminated sequence, broken deflate
      stream), its native Pixel Data is not one frame long (shorter or longer), its
      encapsulated Pixel Data holds no frame or more than one, the codestream is not of its
      transfer syntax or states other dimensions than Rows/Columns (a JPEG 2000 height 0),
      or the Affected SOP Instance UID is missing, empty or invalid.
    * ``0x0110`` Processing Failure: a fault of the node itself while recording (logged as
      ``store_failed``).
    Failure responses carry an Error Comment saying why (no value of the data set other than
    sizes). Nothing enters the spool before everything about the instance is computed; when
    recording fails the file is taken out again, and at start spool files the job store
    does not know (a crash between rename and commit) are removed: their sender never got
    Success and resends.

The data set is kept exactly as received (same transfer syntax, every element including
private ones); nothing is coerced. pynetdicom streams it to a temporary file in
``<storage>/incoming`` while it arrives, so memory stays flat for large images
(:func:`install_receive_path`, the one process-wide setting the SCP needs).
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import time
from pathlib import Path

from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom.dsutils import decode, encode

from dicom_ai.core.errors import ConfigError
from dicom_ai.node import audit, logs, metrics
from dicom_ai.node.admission import (CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS, Rejected,
                                     check_dataset, is_valid_uid)
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.jobstore import Instance, SqlJobStore
from dicom_ai.node.storage import fsync_dir, fsync_file, is_disk_full, is_storage_error
from dicom_ai.node.tls import certificate_names, server_context
from dicom_ai.node.transport import (build_receiving_ae, install_receive_path, normalise_address, receive_failed,
                                     resolve_peer_addresses)

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

_C_STORE_RQ = 0x0001
#: Stands in for a missing, empty or over-long Affected SOP Instance UID (never a real one:
#: no registered root starts with 0.0) so pynetdicom can write the file meta; refused below.
NO_USABLE_UID = "0.0.0.0"


def _on_pdu_received(event: evt.Event) -> None:
    """Give a C-STORE-RQ without a usable Affected SOP Instance UID the stand-in :data:`NO_USABLE_UID`.

    pynetdicom 3.0.4 (``DIMSEMessage.decode_msg``, chunked receive) writes the file meta
    from the command set before any handler runs: when the Affected SOP Instance UID is
    missing or empty the association's reader thread dies with an AttributeError and the
    sender never gets a reply; when it is longer than 64 characters the primitive is refused
    and the association aborted. With the stand-in the request reaches ``_on_store``, which
    answers it with a failure status. EVT_PDU_RECV is the one public hook between the
    network and that decoder: it sees each P-DATA-TF before the DIMSE layer, so the command
    fragment is rewritten here. Only a command set wholly in one fragment (every SCU we know
    sends it so) can be rewritten; ``test_admission`` fails if pynetdicom stops honouring it.
    """
    for item in getattr(event.pdu, "presentation_data_value_items", ()):
        data = item.presentation_data_value
        if not data or data[0] & 0b11 != 0b11:  # not the last (here: only) command fragment
            continue
        fixed = _command_with_usable_uid(bytes(data[1:]))
        if fixed is not None:
            item.presentation_data_value = bytes(data[:1]) + fixed  # data may be a memoryview (transport)


def _command_with_usable_uid(command: bytes) -> bytes | None:
    """The command set re-encoded with an empty Affected SOP Instance UID, or None if it needs none."""
    try:
        cs = decode(BytesIO(command), True, True)
        if cs.get("CommandField") != _C_STORE_RQ:
            return None
        uid = cs.get("AffectedSOPInstanceUID") if "AffectedSOPInstanceUID" in cs else None
        if uid and _config.VALIDATORS["UI"](uid)[0]:
            return None
        cs.AffectedSOPInstanceUID = NO_USABLE_UID
        del cs.CommandGroupLength
        body = encode(cs, True, True)
        cs.CommandGroupLength = len(body)
        return encode(cs, True, True)
    except Exception:  # not a command set we can read: leave it to pynetdicom
        return None


class StorageSCP:
    """Receives into ``<storage>/spool/<Study Instance UID>/<SOP Instance UID>.dcm``."""

    def __init__(self, config: NodeConfig, store: SqlJobStore):
        self.config = config
        self.store = store
        self.layout = config.layout
        self.storage = self.layout.root
        self.spool = self.layout.spool
        self.incoming = self.layout.incoming
        self.server = None
        self._ae = None
        self.servers: list = []
        self.port: int | None = None
        self.tls_port: int | None = None
        self._peer_addresses: dict[str, frozenset[str]] = {}
        # Association -> {Study Instance UID: (SOP Class UID -> instances, a spool path)}, for the audit trail.
        self._received: dict[int, dict[str, tuple[dict[str, int], str]]] = {}

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
        self.reconcile_spool()
        install_receive_path(self.incoming)
        tls = self.config.tls
        context = server_context(tls) if tls.port else None  # before listening: a bad key is a ConfigError
        self._peer_addresses = {p.ae_title: resolve_peer_addresses([p.host]) for p in self.config.peers
                                if p.require_address}
        ae = build_receiving_ae(self.config, {uid: list(SUPPORTED_TRANSFER_SYNTAXES) for uid in SUPPORTED_SOP_CLASSES},
                                list(VERIFICATION_TRANSFER_SYNTAXES), identity_check=self.identity_problem)
        self._ae = ae
        handlers = [(evt.EVT_CONN_OPEN, self._on_connection), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_PDU_RECV, _on_pdu_received),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_RELEASED, self._on_released),
                    (evt.EVT_CONN_CLOSE, self._on_connection_closed)]
        address = self.config.node.bind_address
        if tls.plain_port:
            self.server = ae.start_server((address, self.config.node.port), block=False, evt_handlers=handlers)
            self.servers.append(self.server)
            self.port = int(self.server.server_address[1])
        if context is not None:
            server = ae.start_server((address, tls.port), block=False, evt_handlers=handlers, ssl_context=context)
            self.servers.append(server)
            self.server = self.server or server
            self.tls_port = int(server.server_address[1])
            self.port = self.port or self.tls_port
        logs.event("scp_listening", ae_title=self.config.node.ae_title, address=address,
                   port=self.port if tls.plain_port else None, tls_port=self.tls_port,
                   tls_min_version=tls.min_version if context else None,
                   allow_any_caller=self.config.node.allow_any_caller,
                   peers=",".join(p.ae_title for p in self.config.peers))
        return self.port

    @property
    def accepting(self) -> bool:
        """True while every configured listener is open (``/readyz``)."""
        return bool(self.servers) and all(s.socket is not None and s.socket.fileno() >= 0 for s in self.servers)

    def stop(self) -> None:
        """Stop accepting; established associations (C-STOREs in progress) run to their end."""
        for server in self.servers:
            server.shutdown()
        self.servers = []
        self.server = None

    def wait_idle(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the associations in progress to end; True when none is left."""
        deadline = time.monotonic() + seconds
        while self._ae is not None and self._ae.active_associations:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # -- peer identity -------------------------------------------------------------------

    def identity_problem(self, calling_ae: str, address: str, certificate: dict | None) -> tuple[str, str] | None:
        """Why an A-ASSOCIATE-RQ from ``calling_ae`` at ``address`` is not that peer: (reason, text); None if it may be.

        Parameters
        ----------
        calling_ae : str
            The Calling AE Title of the request.
        address : str
            The caller's IP address (normalised).
        certificate : dict or None
            Its verified TLS client certificate (``getpeercert()``), None without TLS or
            without a certificate.
        """
        peer = self.config.peer(calling_ae)
        if peer is None:
            return None  # not a peer: the AE title check (require_calling_aet) answers it
        why = reason = None
        if peer.require_address and normalise_address(address) not in self._peer_addresses.get(peer.ae_title, ()):
            reason = "peer_address_mismatch"
            why = f"AE title {calling_ae} is configured for host {peer.host}, not {address} (peers.require_address)"
        elif peer.certificate_subject:
            names = certificate_names(certificate)
            if not names:
                reason = "peer_certificate_missing"
                why = (f"AE title {calling_ae} must connect over TLS with a client certificate for "
                       f"{peer.certificate_subject!r} (peers.certificate_subject)")
            elif peer.certificate_subject not in names:
                reason = "peer_certificate_mismatch"
                why = (f"the client certificate names {', '.join(names)[:200]}, not {peer.certificate_subject!r} "
                       f"configured for AE title {calling_ae}")
        if why is not None:
            return reason, why  # logged and audited (Security Alert) by the refusal log
        return None

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
        metrics.ASSOCIATIONS.labels(outcome="accepted").inc()
        tls = a.dul.socket is not None and hasattr(a.dul.socket.socket, "version")
        logs.event("association_accepted", calling_ae=a.requestor.ae_title, address=a.requestor.address,
                   contexts=len(a.accepted_contexts), refused_contexts=len(a.rejected_contexts),
                   tls=a.dul.socket.socket.version() if tls else None)
        self._received[id(a)] = {}
        audit.association_started(a.requestor.ae_title, a.requestor.address)

    def _on_rejected(self, event: evt.Event) -> None:
        a = event.assoc
        metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
        # pynetdicom's own A-ASSOCIATE-RJ (AE titles): one refusal like the transport's, so
        # it is logged and audited (Security Alert) with the rest.
        calling = a.requestor.ae_title
        called = str(getattr(a.requestor.primitive, "called_ae_title", "") or "").strip()
        if self._ae.require_calling_aet and calling not in self._ae.require_calling_aet:
            reason, why = "calling_ae_not_recognised", (f"calling AE title {calling!r} is no configured peer "
                                                        f"(peers.ae_title, node.allow_any_caller = false)")
        elif called != self.config.node.ae_title:
            reason, why = "called_ae_not_recognised", (f"called AE title {called!r}; this node is "
                                                       f"{self.config.node.ae_title!r} (node.ae_title)")
        else:
            reason, why = "association_rejected", "rejected by the DICOM upper layer"
        self._ae.refusals.note(reason, normalise_address(a.requestor.address), response="A-ASSOCIATE-RJ",
                               calling_ae=calling, why=why)

    def _on_aborted(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS.labels(outcome="aborted").inc()
        logs.event("association_aborted", level="WARNING", calling_ae=event.assoc.requestor.ae_title)
        self._association_ended(event.assoc, aborted=True)

    def _on_released(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS.labels(outcome="released").inc()
        self._association_ended(event.assoc, aborted=False)

    def _on_connection_closed(self, event: evt.Event) -> None:
        # A peer that drops the connection without release or abort: its studies are audited
        # here (as aborted), and nothing of the association is kept.
        self._association_ended(event.assoc, aborted=True)

    def _association_ended(self, a, aborted: bool) -> None:
        """Audit what the association brought: one DICOM Instances Transferred per study."""
        studies = self._received.pop(id(a), None)
        if not studies:
            return
        objects = []
        for study_uid, (classes, path) in studies.items():
            patient = ""
            if self.config.audit.include_patient_ids:
                try:
                    patient = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
                                  .get("PatientID", ""))
                except Exception:
                    patient = ""
            objects.append(audit.StudyObject(study_uid, dict(classes), patient))
        audit.instances_transferred(audit.Participant(a.requestor.ae_title, audit.SOURCE_ROLE, True,
                                                      a.requestor.address),
                                    audit.node_participant(audit.DESTINATION_ROLE), objects,
                                    audit.MINOR_FAILURE if aborted else audit.SUCCESS,
                                    "association aborted" if aborted else "")

    def _on_store(self, event: evt.Event) -> Dataset | int:
        started = time.monotonic()
        req = event.request
        calling_ae = event.assoc.requestor.ae_title
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        tmp = Path(event.dataset_path)
        write_error = receive_failed(tmp)
        try:
            if sop_uid == NO_USABLE_UID or not is_valid_uid(sop_uid):
                raise Rejected(CANNOT_UNDERSTAND, "Affected SOP Instance UID missing or invalid")
            if write_error is not None:
                raise Rejected(OUT_OF_RESOURCES, "storage full while receiving" if is_disk_full(write_error)
                               else f"storage error while receiving: {write_error.strerror}")
            status, detail = self._store(tmp, calling_ae, str(req.AffectedSOPClassUID), sop_uid,
                                         str(event.context.transfer_syntax))
        except Rejected as exc:
            logs.event("store_refused", level="WARNING", calling_ae=calling_ae,
                       sop_instance_uid=sop_uid if is_valid_uid(sop_uid) else "(invalid)",
                       status=f"0x{exc.status:04X}", reason=exc.comment)
            tmp.unlink(missing_ok=True)
            metrics.C_STORE_STATUS.labels(status=f"0x{exc.status:04X}").inc()
            rsp = Dataset()
            rsp.Status = exc.status
            rsp.ErrorComment = exc.comment[:64]
            return rsp
        seconds = time.monotonic() - started
        logs.event("instance_received" if status == "stored" else "instance_duplicate", calling_ae=calling_ae,
                   sop_instance_uid=sop_uid, seconds=round(seconds, 4), **detail)
        metrics.C_STORE_STATUS.labels(status=f"0x{SUCCESS:04X}").inc()
        metrics.RECEIVE_SECONDS.observe(seconds)
        if status == "stored":
            metrics.INSTANCES_RECEIVED.inc()
            metrics.BYTES_RECEIVED.inc(detail["bytes"])
            studies = self._received.setdefault(id(event.assoc), {})
            study_uid = detail["study_instance_uid"]
            spooled = str(self.layout.spool_study(study_uid) / f"{sop_uid}.dcm")
            classes, _ = studies.setdefault(study_uid, ({}, spooled))
            sop_class = str(req.AffectedSOPClassUID)
            classes[sop_class] = classes.get(sop_class, 0) + 1
        return SUCCESS

    # -- the store itself ----------------------------------------------------------------

    def _store(self, tmp: Path, calling_ae: str, sop_class: str, sop_uid: str, ts: str) -> tuple[str, dict]:
        try:
            known = self.store.find_instance(sop_uid)
        except Exception as exc:  # the disk, a locked SQLite file, PostgreSQL unreachable: may pass
            if not (isinstance(exc, (OSError, sqlite3.OperationalError)) or is_storage_error(exc)):
                raise
            raise Rejected(OUT_OF_RESOURCES, f"job store error: {type(exc).__name__}") from exc
        if known:
            tmp.unlink(missing_ok=True)
            return "duplicate", {}
        reserve = self.config.node.reserve_free_mb * 1024 * 1024
        try:
            free = shutil.disk_usage(self.storage).free
        except OSError as exc:
            raise Rejected(OUT_OF_RESOURCES, f"storage not usable: {exc.strerror}") from exc
        if free < reserve:
            raise Rejected(OUT_OF_RESOURCES, f"storage below reserve ({free // 2**20} MiB free)")
        # Everything that could fail about the instance is computed before it enters the spool.
        admitted = check_dataset(tmp, sop_class, sop_uid, ts, self.config.limits)
        study_uid = admitted.study_uid
        target_dir = self.layout.spool_study(study_uid)
        target = target_dir / f"{sop_uid}.dcm"
        instance = Instance(sop_instance_uid=sop_uid, sop_class_uid=sop_class, transfer_syntax=ts,
                            laterality=admitted.laterality, view=admitted.view, path=str(target))
        renamed = False
        try:
            new_dir = not target_dir.exists()
            target_dir.mkdir(parents=True, exist_ok=True)
            fsync_file(tmp)
            size = tmp.stat().st_size
            os.rename(tmp, target)
            renamed = True
            fsync_dir(target_dir)
            if new_dir:
                fsync_dir(self.spool)
            new = self.store.record_instance(study_uid=study_uid, calling_ae=calling_ae, instance=instance,
                                             size=size)
        except OSError as exc:
            self._unspool(target if renamed else None)
            raise Rejected(OUT_OF_RESOURCES, "storage full" if is_disk_full(exc)
                           else f"storage error: {exc.strerror}") from exc
        except sqlite3.OperationalError as exc:  # locked, disk I/O error, database full: may pass
            self._unspool(target if renamed else None)
            raise Rejected(OUT_OF_RESOURCES, f"job store error: {type(exc).__name__}") from exc
        except Exception as exc:  # not the sender's fault, and not one a resend would cure
            self._unspool(target if renamed else None)
            if is_storage_error(exc):  # PostgreSQL unreachable or restarting: a resend later will pass
                raise Rejected(OUT_OF_RESOURCES, f"job store error: {type(exc).__name__}") from exc
            logs.event("store_failed", level="ERROR", sop_instance_uid=sop_uid, error=type(exc).__name__)
            raise Rejected(PROCESSING_FAILURE, f"node error recording the instance ({type(exc).__name__})") from exc
        if not new:  # recorded meanwhile by a concurrent association: the spool file is that one's
            return "duplicate", {}
        detail = {"study_instance_uid": study_uid, "transfer_syntax": ts, "bytes": size,
                  "laterality": instance.laterality, "view": instance.view}
        return "stored", detail

    def _unspool(self, target: Path | None) -> None:
        """Take back a spool file whose recording failed: the sender gets a failure and resends."""
        if target is None:
            return
        try:
            target.unlink(missing_ok=True)
            fsync_dir(target.parent)
        except OSError as exc:  # reconciled at the next start (reconcile_spool)
            logs.event("spool_cleanup_failed", level="ERROR", path=str(target), error=exc.strerror or type(exc).__name__)

    def reconcile_spool(self) -> int:
        """Remove spool files that no instance row of the job store names; returns how many.

        Such an orphan is left by a crash between the rename into the spool and the job store
        commit. Its sender never got Success, so it resends; keeping the file would only leak
        disk (and patient data nobody tracks).
        """
        removed = 0
        for study_dir in sorted(p for p in self.spool.iterdir() if p.is_dir()):
            for path in sorted(study_dir.glob("*.dcm")):
                if self.store.find_instance(path.stem) is None:
                    path.unlink(missing_ok=True)
                    removed += 1
            try:
                study_dir.rmdir()  # only when now empty
            except OSError:
                pass
        if removed:
            fsync_dir(self.spool)
        logs.event("spool_reconciled", level="WARNING" if removed else "INFO", orphans_removed=removed)
        return removed
