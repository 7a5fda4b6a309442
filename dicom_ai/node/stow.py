"""Result delivery over DICOMweb: STOW-RS of outbox objects, QIDO-RS for objects in doubt.

A destination with ``url = "http://host:port/dicom-web"`` (``[[destinations]]`` or
``[[peers]]``, see :mod:`dicom_ai.node.config`) gets its results by STOW-RS (PS3.18 10.5), one
instance per request, with the same rules as C-STORE (:mod:`dicom_ai.node.delivery`):

* Before each request the object's intent is recorded (a ``sending`` row); the server's answer
  that it stored the instance (the instance in the response's Referenced SOP Sequence) is
  recorded at once (a ``sent`` row).
* An object in doubt (``sending`` without ``sent``) is first looked for with a QIDO-RS search
  for instances (PS3.18 10.6) by Study, Series and SOP Instance UID. Found: recorded as sent,
  not sent again. Not found, or no usable answer: sent again under the same SOP Instance UID
  (a STOW-RS origin server keeps one copy per SOP Instance UID, PS3.18 10.5.3).
* An answer that the instance was not stored (an HTTP 4xx/5xx status, or the instance in the
  Failed SOP Sequence) clears the intent: the object is known not to be there, and the attempt
  fails and is retried with the ``[retry]`` backoff. No answer (connection refused, reset,
  timeout) leaves the object in doubt.

The job store's rows are keyed by the delivery, whose ``host`` column holds the URL and whose
``port`` is 0 (:func:`is_dicomweb`). dicomweb-client's own HTTP retries are switched off: the
delivery's backoff is the only one. Every request is bounded by ``retry.timeout_seconds``.

This module is imported by the delivery process; it needs dicomweb-client (and requests), not
highdicom.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

__all__ = ["is_dicomweb", "StowSender", "holds_instance"]

# dicomweb-client logs every request's URL (with study UIDs) at INFO.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)


def is_dicomweb(host: str, port: int) -> bool:
    """Whether a delivery (``host``, ``port``) is a DICOMweb destination: port 0 and a URL as host."""
    return port == 0 and host.startswith(("http://", "https://"))


def _client(url: str, timeout: float) -> DICOMwebClient:
    client = DICOMwebClient(url=url.rstrip("/"), timeout=timeout)
    client.set_http_retry_params(retry=False)
    return client


def holds_instance(client: DICOMwebClient, header: pydicom.Dataset) -> bool | None:
    """Whether the server has this SOP instance (QIDO-RS); None when it gave no usable answer."""
    try:
        found = client.search_for_instances(study_instance_uid=str(header.StudyInstanceUID),
                                            series_instance_uid=str(header.SeriesInstanceUID),
                                            search_filters={"SOPInstanceUID": str(header.SOPInstanceUID)})
    except Exception:  # an error answer, a timeout, a body that is not JSON: the same as none
        return None
    uid = str(header.SOPInstanceUID)
    return any(item.get("00080018", {}).get("Value", [None])[0] == uid for item in found)


class StowSender:
    """Sends one delivery's pending objects to a DICOMweb server under the exactly-once rules.

    Parameters
    ----------
    url
        The server's DICOMweb base URL (``.../studies`` is appended for STOW-RS and QIDO-RS).
    timeout
        Seconds for each request's connect and for each read.
    mark_sending, clear_sending, record_sent
        The delivery's job-store records (``sop_instance_uid`` in, raising when the store
        cannot take the write, which ends the attempt unrecorded).
    event
        ``event(name, level=..., **fields)``: the node's structured log.
    stored
        Called with the SOP Instance UID of each object the server acknowledged (the node's
        objects-sent metric); not for objects found already there.
    """

    def __init__(self, url: str, timeout: float, *, mark_sending: Callable[[str], None],
                 clear_sending: Callable[[str], None], record_sent: Callable[[str], None],
                 event: Callable[..., None], stored: Callable[[str], None] | None = None):
        self.url = url
        self.client = _client(url, timeout)
        self.mark_sending, self.clear_sending, self.record_sent = mark_sending, clear_sending, record_sent
        self.event = event
        self.stored = stored

    def send(self, pending: list[tuple[str, str, str]], in_doubt: frozenset[str] | set[str],
             delivery_id: int, destination: str) -> str | None:
        """STOW-RS each ``(sop_instance_uid, sop_class_uid, path)``; None when all are stored, else why it stopped."""
        for uid, _, path in pending:
            ds = pydicom.dcmread(path)
            if uid in in_doubt:
                held = holds_instance(self.client, ds)
                if held:
                    self.record_sent(uid)
                    self.event("delivery_confirmed_in_doubt", delivery_id=delivery_id, destination=destination,
                               sop_instance_uid=uid, rule="QIDO-RS found it: not sent again")
                    continue
                self.event("delivery_resent_in_doubt", level="WARNING", delivery_id=delivery_id,
                           destination=destination, sop_instance_uid=uid,
                           rule="destination does not hold it" if held is False else
                           "no QIDO-RS answer from the destination: resent under the same SOP Instance UID")
            self.mark_sending(uid)
            try:
                response = self.client.store_instances([ds])
            except requests.HTTPError as exc:  # the server answered: not stored
                self.clear_sending(uid)
                code = exc.response.status_code if exc.response is not None else "?"
                return f"STOW-RS of {uid} answered HTTP {code}"
            except Exception as exc:  # no answer: connection refused or reset, timeout
                return f"sending failed: {type(exc).__name__}: {exc}"
            stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in response.get("ReferencedSOPSequence", [])}
            if uid not in stored:
                failed = [item for item in response.get("FailedSOPSequence", [])
                          if str(item.get("ReferencedSOPInstanceUID", "")) == uid]
                if failed:
                    self.clear_sending(uid)
                    reason = failed[0].get("FailureReason")
                    return f"STOW-RS of {uid} failed (Failure Reason {reason if reason is not None else 'not given'})"
                return f"STOW-RS of {uid}: the response names neither a stored nor a failed instance"
            self.event("object_sent", delivery_id=delivery_id, destination=destination, sop_instance_uid=uid,
                       transport="STOW-RS")
            if self.stored is not None:
                self.stored(uid)
            self.record_sent(uid)
        return None
