"""Result delivery: C-STORE SCU of outbox objects to each destination, with retries.

Each acknowledged object is recorded at once, so after a crash only the object that was in
flight is sent again; it carries the same SOP Instance UID, so the PACS keeps one copy. A
failed attempt (association refused, peer down, failure status) is retried after
``initial_delay * backoff_factor ** (attempt - 1)`` seconds (capped at ``max_delay``) until
``retry.max_attempts``; then the delivery is ``failed`` and shown by ``dicom-ai status``
until ``dicom-ai retry`` re-queues it.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicom_ai.node import logs
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.jobstore import Delivery, JobStore


def _ok(status: pydicom.Dataset) -> bool:
    """Success or Warning (PS3.4 Annex B: the peer stored the object, perhaps coerced)."""
    return "Status" in status and code_to_category(int(status.Status)) in (STATUS_SUCCESS, STATUS_WARNING)


class DeliveryAgent:
    """Sends due deliveries, one destination association at a time."""

    def __init__(self, config: NodeConfig, store: JobStore):
        self.config = config
        self.store = store

    def run_due(self) -> int:
        """Attempt every delivery that is due now; returns how many were attempted."""
        due = self.store.due_deliveries()
        for d in due:
            self.attempt(d)
        return len(due)

    def attempt(self, d: Delivery) -> str:
        """One attempt at one delivery; returns the delivery's new state."""
        if not d.pending:
            self.store.delivery_done(d.id)
            return "done"
        error = self._send(d)
        if error is None:
            self.store.delivery_done(d.id)
            logs.event("delivery_done", delivery_id=d.id, job_id=d.job_id, destination=d.ae_title,
                       objects=len(d.pending))
            return "done"
        retry = self.config.retry
        state = self.store.delivery_attempt_failed(d.id, error, retry.max_attempts, retry.delay)
        logs.event("delivery_attempt_failed", level="WARNING" if state == "pending" else "ERROR",
                   delivery_id=d.id, job_id=d.job_id, destination=f"{d.ae_title}@{d.host}:{d.port}",
                   attempt=d.attempts + 1, state=state, error=error,
                   retry_in_s=round(retry.delay(d.attempts + 1), 1) if state == "pending" else None)
        return state

    def _send(self, d: Delivery) -> str | None:
        """Send the pending objects; None on success, else why it stopped."""
        contexts: dict[str, set[str]] = {}
        for _, sop_class, path in d.pending:
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
            contexts.setdefault(sop_class, set()).add(str(meta.TransferSyntaxUID))
        ae = AE(ae_title=self.config.node.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, sorted(syntaxes))
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if assoc.is_established and assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
            # Without TCP_NODELAY each C-STORE waits ~90 ms for Nagle + delayed ACK on the
            # small PDUs at the start and end of the message.
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not assoc.is_established:
            if assoc.is_rejected:
                return "association rejected by the destination (check its AE title and that it knows this node)"
            return "could not connect or association aborted (destination down or unreachable)"
        try:
            for msg_id, (uid, _, path) in enumerate(d.pending, start=1):
                status = assoc.send_c_store(Path(path), msg_id=msg_id)
                if not _ok(status):
                    code = f"0x{int(status.Status):04X}" if "Status" in status else "no response"
                    comment = str(status.get("ErrorComment", ""))
                    return f"C-STORE of {uid} answered {code} {comment}".strip()
                self.store.mark_sent(d.id, uid)
                logs.event("object_sent", delivery_id=d.id, destination=d.ae_title, sop_instance_uid=uid,
                           status=f"0x{int(status.Status):04X}")
        except Exception as exc:  # a peer that drops the connection mid-send
            return f"sending failed: {type(exc).__name__}: {exc}"
        finally:
            if assoc.is_established:
                assoc.release()
        return None


class DeliveryThread(threading.Thread):
    """Polls the job store for due deliveries until stopped."""

    def __init__(self, agent: DeliveryAgent, poll_seconds: float = 0.2):
        super().__init__(name="delivery", daemon=True)
        self.agent = agent
        self.poll_seconds = poll_seconds
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.agent.run_due()
            except Exception as exc:  # keep delivering; the error is in the log
                logs.event("delivery_loop_error", level="ERROR", error=f"{type(exc).__name__}: {exc}")
            self.stopping.wait(self.poll_seconds)
