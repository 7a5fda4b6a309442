"""Result delivery: C-STORE SCU of outbox objects to each destination, with retries.

Exactly once. Before each C-STORE the object's intent is recorded (a "sending" row), and
the destination's acknowledgement is recorded at once (a "sent" row). So after any stop (a
SIGKILL, a power cut, a job store that could not take the record) only an object that has a
"sending" row and no "sent" row is *in doubt*; every other object is either known to be at
the destination and never sent again, or known not to be and sent. For an object in doubt
the next attempt first asks the destination: a C-FIND at IMAGE level in the Study Root
Query/Retrieve Information Model - FIND (keys Study, Series and SOP Instance UID), proposed
only when something is in doubt. A destination that holds it gets nothing more
(``delivery_confirmed_in_doubt``); one that does not, or that does not accept that
presentation context, or whose C-FIND fails, gets it again under the same SOP Instance UID
(``delivery_resent_in_doubt``) and is relied upon to keep one copy per SOP Instance UID, as
PS3.4 B.4.1 lets a Storage SCP do. An acknowledgement the job store cannot record is kept in
memory, so this process never sends that object again, and the delivery backs off in
memory (``delivery_store_unavailable``) until the store takes writes again.

Retries. A failed attempt (association refused, peer down, failure status) is retried after
``initial_delay * backoff_factor ** (attempt - 1)`` seconds (capped at ``max_delay``) until
``retry.max_attempts``; then the delivery is ``failed`` and shown by ``dicom-ai status``
until ``dicom-ai retry`` re-queues it.

Several delivery processes. With workers on other hosts (``[workers] broker_url``) the node
and, with ``deliver_on_workers``, every worker run deliveries against the shared job store.
Each attempt first leases its delivery (:meth:`~dicom_ai.node.jobstore.SqlJobStore.claim_delivery`,
a conditional UPDATE; renewed with every object it starts), so one delivery is attempted by
one process at a time, and the per-object sending/sent rows above keep exactly-once across
processes as they do across restarts. A process that dies mid-attempt leaves its lease to
expire; the next holder finds its last object in doubt and asks the destination first.

Independence. :class:`DeliveryThread` runs each destination's deliveries in a thread of that
destination, so a destination that is down or hangs delays only its own results; every
network wait (TCP connect, A-ASSOCIATE, each DIMSE response, the socket) is bounded by
``retry.timeout_seconds``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from pynetdicom.status import STATUS_PENDING, STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicom_ai.node import audit, logs, metrics
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.jobstore import DELIVERY_LEASE_SECONDS, Delivery, SqlJobStore
from dicom_ai.node.storage import is_storage_error
from dicom_ai.node.stow import StowSender, is_dicomweb
from dicom_ai.node.tls import client_context, probe_handshake

__all__ = ["DeliveryAgent", "DeliveryThread"]

_FIND = StudyRootQueryRetrieveInformationModelFind

#: The longest the delivery thread waits between two looks for due deliveries, in seconds: a
#: job's results are queued by the worker (another process), so this is how late their sending
#: may start. A look is one indexed read of the job store.
DELIVERY_POLL_SECONDS = 0.05


def _ok(status: pydicom.Dataset) -> bool:
    """Success or Warning (PS3.4 Annex B: the peer stored the object, perhaps coerced)."""
    return "Status" in status and code_to_category(int(status.Status)) in (STATUS_SUCCESS, STATUS_WARNING)


@dataclass
class _Hold:
    """A delivery whose outcome the job store could not take: not tried again before ``until``."""

    until: float
    times: int


class DeliveryAgent:
    """Attempts deliveries; safe to call from one thread per destination at the same time."""

    def __init__(self, config: NodeConfig, store: SqlJobStore):
        self.config = config
        self.store = store
        # Leases only where several processes deliver (workers on other hosts); the embedded
        # node is the only sender, so it needs none.
        self.lease_seconds = (max(DELIVERY_LEASE_SECONDS, 3 * config.retry.timeout_seconds)
                              if config.workers.distributed else 0.0)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        # Delivery id -> backoff while the job store cannot record its outcome.
        self._held: dict[int, _Hold] = {}
        # Delivery id -> SOP Instance UIDs the destination acknowledged that the store has not
        # recorded yet: never sent again by this process.
        self._acked: dict[int, set[str]] = {}

    def run_due(self) -> int:
        """Attempt every delivery that is due now, one after the other; returns how many were attempted."""
        due = self.store.due_deliveries()
        for d in due:
            self.attempt(d)
        return len(due)

    def is_held(self, delivery_id: int) -> bool:
        """True while a delivery backs off in memory because the job store could not take its outcome."""
        with self._lock:
            hold = self._held.get(delivery_id)
            return hold is not None and time.monotonic() < hold.until

    def attempt(self, d: Delivery) -> str:
        """One attempt at one delivery; returns its new state, or ``held`` when the job store
        could not record what happened (the delivery then backs off in memory)."""
        if self.is_held(d.id):
            return "held"
        try:
            if self.lease_seconds:
                leased = self.store.claim_delivery(d.id, self.owner, self.lease_seconds)
                if leased is None:
                    return "busy"  # another process attempts it now, or it is no longer pending
                d = leased
            state = self._attempt(d)
        except Exception as exc:  # the job store (or a bug): never a reason to send again at once
            if not is_storage_error(exc):
                # Not the store (an outbox file gone, a bug): an attempt that failed, counted,
                # so the delivery ends failed and visible rather than retried for ever.
                try:
                    retry = self.config.retry
                    state = self.store.delivery_attempt_failed(d.id, f"{type(exc).__name__}: {exc}",
                                                               retry.max_attempts, retry.delay)
                    logs.event("delivery_attempt_failed", level="ERROR", delivery_id=d.id, job_id=d.job_id,
                               destination=f"{d.ae_title}@{d.host}:{d.port}", attempt=d.attempts + 1,
                               state=state, error=f"{type(exc).__name__}: {exc}")
                    return state
                except Exception:
                    pass
            with self._lock:
                hold = self._held.get(d.id) or _Hold(0.0, 0)
                hold.times += 1
                delay = self.config.retry.delay(hold.times)
                hold.until = time.monotonic() + delay
                self._held[d.id] = hold
            logs.event("delivery_store_unavailable", level="ERROR", delivery_id=d.id, job_id=d.job_id,
                       destination=d.ae_title, storage_problem=is_storage_error(exc),
                       error=f"{type(exc).__name__}: {exc}", retry_in_s=round(delay, 1))
            return "held"
        with self._lock:
            self._held.pop(d.id, None)
        return state

    def _attempt(self, d: Delivery) -> str:
        with self._lock:
            unrecorded = set(self._acked.get(d.id, ()))
        for uid in sorted(unrecorded):  # acknowledged earlier; only the record was missing
            self._record_sent(d.id, uid)
        # Only the result kinds this destination takes (its ``objects`` key, read at send time
        # since the job store keeps no per-destination outbox); the rest are never sent to it.
        remote = self.config.remote(d.ae_title)
        pending = [p for p in d.pending if p[0] not in unrecorded and (remote is None or remote.takes(p[1]))]
        if not pending:
            self.store.delivery_done(d.id)
            return "done"
        error = self._send(d, pending)
        if error is None:
            self.store.delivery_done(d.id)
            logs.event("delivery_done", delivery_id=d.id, job_id=d.job_id, destination=d.ae_title,
                       objects=len(pending))
            self._audit(d, pending, None)
            return "done"
        retry = self.config.retry
        state = self.store.delivery_attempt_failed(d.id, error, retry.max_attempts, retry.delay)
        metrics.DELIVERY_ATTEMPTS_FAILED.labels(destination=d.ae_title).inc()
        if state == "failed":
            self._audit(d, pending, error)
        logs.event("delivery_attempt_failed", level="WARNING" if state == "pending" else "ERROR",
                   delivery_id=d.id, job_id=d.job_id, destination=f"{d.ae_title}@{d.host}:{d.port}",
                   attempt=d.attempts + 1, state=state, error=error,
                   retry_in_s=round(retry.delay(d.attempts + 1), 1) if state == "pending" else None)
        return state

    @property
    def _renewal(self) -> float:
        return self.lease_seconds or DELIVERY_LEASE_SECONDS

    def _audit(self, d: Delivery, objects: list[tuple[str, str, str]], error: str | None) -> None:
        """DICOM Instances Transferred: results sent (``error`` None) or the delivery failed for good."""
        classes: dict[str, int] = {}
        for _, sop_class, _ in objects:
            classes[sop_class] = classes.get(sop_class, 0) + 1
        try:
            head = pydicom.dcmread(objects[0][2], stop_before_pixels=True,
                                   specific_tags=["StudyInstanceUID", "PatientID"])
            study = audit.StudyObject(str(head.StudyInstanceUID), classes, str(head.get("PatientID", "")))
        except Exception:  # the audit message goes out without the study rather than not at all
            study = None
        audit.instances_transferred(audit.node_participant(audit.SOURCE_ROLE),
                                    audit.Participant(d.ae_title, audit.DESTINATION_ROLE, False, d.host),
                                    [study] if study else [], audit.SUCCESS if error is None else audit.SERIOUS_FAILURE,
                                    "" if error is None else f"delivery failed: {error}")

    def _record_sent(self, delivery_id: int, uid: str) -> None:
        with self._lock:
            self._acked.setdefault(delivery_id, set()).add(uid)
        self.store.mark_sent(delivery_id, uid)  # raises when the store cannot take it: the UID stays in memory
        with self._lock:
            acked = self._acked.get(delivery_id)
            if acked is not None:
                acked.discard(uid)
                if not acked:
                    del self._acked[delivery_id]

    def _association(self, d: Delivery, contexts: dict[str, set[str]], ask_first: bool) -> Association:
        ae = AE(ae_title=self.config.node.ae_title)
        timeout = self.config.retry.timeout_seconds
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, sorted(syntaxes))
        if ask_first:
            ae.add_requested_context(_FIND)
        # DICOM TLS for a peer/destination configured with tls = true (the [tls] certificate,
        # key and CA bundle; the destination's certificate must name its host).
        remote = self.config.remote(d.ae_title)
        tls_args = None
        if remote is not None and remote.tls:
            tls_args = (client_context(self.config.tls), d.host)
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, tls_args=tls_args)
        if assoc.is_established and assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
            # Without TCP_NODELAY each C-STORE waits ~90 ms for Nagle + delayed ACK on the
            # small PDUs at the start and end of the message.
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return assoc

    def _tls_problem(self, d: Delivery) -> str | None:
        """For a ``tls = true`` destination whose association failed: the TLS handshake failure, named."""
        remote = self.config.remote(d.ae_title)
        if remote is None or not remote.tls:
            return None
        found = probe_handshake(client_context(self.config.tls), d.host, d.port, self.config.retry.timeout_seconds)
        if found is None:
            return None
        reason, text = found
        return f"TLS handshake with the destination failed ({reason}): {text}"

    def _send(self, d: Delivery, pending: list[tuple[str, str, str]]) -> str | None:
        """Send the pending objects; None on success, else why it stopped.

        Job-store errors are not caught here: the attempt then ends without a record and
        :meth:`attempt` holds the delivery. A DICOMweb destination gets STOW-RS under the same
        rules (:mod:`dicom_ai.node.stow`).
        """
        if is_dicomweb(d.host, d.port):
            return StowSender(d.host, self.config.retry.timeout_seconds,
                              mark_sending=lambda uid: self.store.mark_sending(d.id, uid, self._renewal),
                              clear_sending=lambda uid: self.store.clear_sending(d.id, uid),
                              record_sent=lambda uid: self._record_sent(d.id, uid),
                              event=logs.event,
                              stored=lambda uid: metrics.OBJECTS_SENT.labels(destination=d.ae_title).inc(),
                              ).send(pending, d.in_doubt, d.id, d.ae_title)
        contexts: dict[str, set[str]] = {}
        headers: dict[str, Dataset] = {}
        for uid, sop_class, path in pending:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            headers[uid] = header
            contexts.setdefault(sop_class, set()).add(str(header.file_meta.TransferSyntaxUID))
        in_doubt = d.in_doubt & set(headers)
        assoc = self._association(d, contexts, ask_first=bool(in_doubt))
        if not assoc.is_established:
            if assoc.is_rejected:
                return "association rejected by the destination (check its AE title and that it knows this node)"
            tls_problem = self._tls_problem(d)
            if tls_problem is not None:
                return tls_problem
            return "could not connect, association aborted or timed out (destination down, unreachable or hung)"
        can_ask = any(cx.abstract_syntax == _FIND for cx in assoc.accepted_contexts)
        try:
            for msg_id, (uid, _, path) in enumerate(pending, start=1):
                if uid in in_doubt:
                    held = self._destination_holds(assoc, headers[uid]) if can_ask else None
                    if held:
                        self._record_sent(d.id, uid)
                        logs.event("delivery_confirmed_in_doubt", delivery_id=d.id, destination=d.ae_title,
                                   sop_instance_uid=uid, rule="C-FIND found it: not sent again")
                        continue
                    logs.event("delivery_resent_in_doubt", level="WARNING", delivery_id=d.id,
                               destination=d.ae_title, sop_instance_uid=uid,
                               rule="destination does not hold it" if held is False else
                               "no C-FIND answer from the destination: resent under the same SOP Instance UID")
                self.store.mark_sending(d.id, uid, self._renewal)
                try:
                    status = assoc.send_c_store(Path(path), msg_id=msg_id)
                except Exception as exc:  # a peer that drops the connection mid-send
                    return f"sending failed: {type(exc).__name__}: {exc}"
                if not _ok(status):
                    code = f"0x{int(status.Status):04X}" if "Status" in status else "no response"
                    if "Status" in status:  # a failure status: known not stored, no longer in doubt
                        self.store.clear_sending(d.id, uid)
                    comment = str(status.get("ErrorComment", ""))
                    return f"C-STORE of {uid} answered {code} {comment}".strip()
                logs.event("object_sent", delivery_id=d.id, destination=d.ae_title, sop_instance_uid=uid,
                           status=f"0x{int(status.Status):04X}")
                metrics.OBJECTS_SENT.labels(destination=d.ae_title).inc()
                self._record_sent(d.id, uid)
        finally:
            if assoc.is_established:
                assoc.release()
        return None

    @staticmethod
    def _destination_holds(assoc: Association, header: Dataset) -> bool | None:
        """Whether the destination has this SOP instance (C-FIND, IMAGE level); None when it did not say."""
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = header.StudyInstanceUID
        query.SeriesInstanceUID = header.SeriesInstanceUID
        query.SOPInstanceUID = header.SOPInstanceUID
        found = False
        try:
            for status, identifier in assoc.send_c_find(query, _FIND):
                if "Status" not in status:
                    return None  # no response in time, or the association went away
                category = code_to_category(int(status.Status))
                if category == STATUS_PENDING:
                    found |= identifier is not None and identifier.get("SOPInstanceUID") == header.SOPInstanceUID
                elif category in (STATUS_SUCCESS, STATUS_WARNING):
                    return found
                else:
                    return None
        except Exception:  # a C-FIND the destination answers badly is the same as none
            return None
        return found


class DeliveryThread(threading.Thread):
    """Polls the job store for due deliveries and runs each destination's in a thread of its own.

    A destination whose thread is still busy (sending, or waiting out a hung peer for up to
    ``retry.timeout_seconds`` per step) is skipped until it is done; the others go on.
    """

    def __init__(self, agent: DeliveryAgent, poll_seconds: float = 0.2):
        super().__init__(name="delivery", daemon=True)
        self.agent = agent
        self.poll_seconds = poll_seconds
        self.stopping = threading.Event()
        self._lanes: dict[tuple[str, str, int], threading.Thread] = {}

    def run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                due = self.agent.store.due_deliveries()
            except Exception as exc:  # keep delivering; back off while the store cannot be read
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    logs.event("delivery_loop_error", level="ERROR", error=f"{type(exc).__name__}: {exc}",
                               storage_problem=is_storage_error(exc), failures=failures)
                self.stopping.wait(min(10.0, self.poll_seconds * 2 ** failures))
                continue
            failures = 0
            by_destination: dict[tuple[str, str, int], list[Delivery]] = {}
            for d in due:
                if not self.agent.is_held(d.id):
                    by_destination.setdefault((d.ae_title, d.host, d.port), []).append(d)
            for key, deliveries in by_destination.items():
                lane = self._lanes.get(key)
                if lane is not None and lane.is_alive():
                    continue
                lane = threading.Thread(target=self._deliver, args=(deliveries,), daemon=True,
                                        name=f"delivery-{key[0]}@{key[1]}:{key[2]}")
                self._lanes[key] = lane
                lane.start()
            self.stopping.wait(self.poll_seconds)
        for lane in list(self._lanes.values()):
            lane.join(self.agent.config.retry.timeout_seconds + 5)

    def _deliver(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            if self.stopping.is_set():
                return
            try:
                self.agent.attempt(d)
            except Exception as exc:  # keep delivering; the error is in the log
                logs.event("delivery_loop_error", level="ERROR", delivery_id=d.id, error=f"{type(exc).__name__}: {exc}")
