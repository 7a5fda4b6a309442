"""The node's HTTP endpoints for IT: ``/metrics``, ``/healthz``, ``/readyz`` and a read-only status page.

One :class:`http.server.ThreadingHTTPServer` (stdlib) in the receiving process, bound to
``[http] bind_address`` (loopback by default) and ``[http] port`` (0: no server). GET only;
there is no form, button or other way to change anything here (``dicom-ai retry`` stays a
CLI action, audited).

* ``/metrics``: Prometheus text format from :data:`dicom_ai.node.metrics.REGISTRY`.
* ``/healthz``: 200 while the process answers (liveness).
* ``/readyz``: 200 when every check passes, else 503; the body is JSON with each check:
  ``scp_accepting`` (every listener open), ``worker_alive`` (the worker child; in distributed
  mode: false only while jobs wait and no worker's heartbeat is within
  ``workers.lease_seconds``), ``job_store_writable`` (the write lock can be taken within 1 s)
  and ``disk_above_reserve``; when one fails, ``reasons`` says why (check -> text).
* ``/`` : the status page (:func:`render_status_page`): the node's version, workers (distributed
  mode: last heartbeat, current job, alive / lost), deliveries, jobs (with their worker) and
  studies with their states, times (local, with UTC offset) and errors, failed deliveries
  first; UIDs and AE titles only, never patient data (the job store holds none); refreshes
  itself every 10 s.
"""

from __future__ import annotations

import html
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_ai import __version__
from dicom_ai.node import logs
from dicom_ai.node.liveness import describe_workers
from dicom_ai.node.metrics import REGISTRY

__all__ = ["StatusServer", "render_status_page"]

#: Seconds between refreshes of the status page.
REFRESH_SECONDS = 10

_FAILED_FIRST = {"failed": 0, "pending": 1, "sending": 2}


def _when(ts: float | None) -> str:
    """Local time with its UTC offset (a reader in another time zone, or at a DST change, is not misled)."""
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts)) if ts else "-"


def _models(text: str | None) -> str:
    """``jobs.models`` (JSON name -> version) as "glam 0.2.0, dunet 1.0"; "-" before any result."""
    try:
        return ", ".join(f"{k} {v}" for k, v in sorted(json.loads(text).items())) if text else "-"
    except (ValueError, AttributeError):
        return "-"


def _table(title: str, columns: list[str], rows: list[list], row_class: Callable[[list], str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cls = row_class(r) if row_class else ""
        cells = "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return (f"<h2>{html.escape(title)} ({len(rows)})</h2><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body) or '<tr><td colspan=99>none</td></tr>'}</tbody></table>")


def render_status_page(status: dict, ae_title: str, ready: dict[str, bool], reasons: dict[str, str] | None = None,
                       lease_seconds: float | None = None) -> str:
    """The HTML status page from :meth:`JobStore.status` (UIDs, AE titles, states, times, errors).

    Parameters
    ----------
    status : dict
        ``JobStore.status()``: notices, studies, jobs, deliveries.
    ae_title : str
        The node's AE title (the page title).
    ready : dict
        The ``/readyz`` checks (name -> passed).
    reasons : dict, optional
        Why a failing check fails (name -> text).
    lease_seconds : float, optional
        ``workers.lease_seconds`` in distributed mode: the Workers table (alive / lost); None: no table.
    """

    deliveries = sorted(status["deliveries"], key=lambda d: (_FAILED_FIRST.get(d["state"], 3), -d["id"]))
    checks = " ".join(f'<span class="{"ok" if v else "bad"}">{html.escape(k)}: {"ok" if v else "FAILING"}</span>'
                      for k, v in ready.items())
    notices = "".join(f'<p class="bad">NOT READY ({html.escape(k)}): {html.escape(v)}</p>'
                      for k, v in (reasons or {}).items())
    notices += "".join(f'<p class="bad">PROBLEM ({html.escape(n["key"])}, {_when(n["updated"])}): '
                      f'{html.escape(n["message"])}</p>' for n in status["notices"])
    notices += "".join(f'<p class="bad">{html.escape(note)}</p>' for note in status.get("research", ()))
    parts = [
        _table("Deliveries", ["id", "job", "state", "sent", "to", "attempts", "next attempt", "error"],
               [[d["id"], d["job_id"], d["state"], f'{d["sent"]}/{d["total"]}',
                 f'{d["ae_title"]}@{d["host"]}:{d["port"]}', d["attempts"],
                 _when(d["next_attempt"]) if d["state"] == "pending" else "-", d["error"]] for d in deliveries],
               lambda r: "bad" if r[2] == "failed" else ""),
        _table("Jobs", ["id", "state", "study", "from", "attempts", "results", "models", "worker", "created",
                        "updated", "error"],
               [[j["id"], j["state"], j["study_uid"], j["calling_ae"], j["attempts"], j["results"],
                 _models(j.get("models")), j.get("worker") or "-", _when(j["created"]), _when(j["updated"]),
                 j["error"]]
                for j in reversed(status["jobs"])],
               lambda r: "bad" if r[1] == "failed" else ""),
        _table("Studies", ["id", "state", "study", "from", "images", "last received"],
               [[s["id"], s["state"], s["study_uid"], s["calling_ae"], s["instances"], _when(s["last_received"])]
                for s in reversed(status["studies"])]),
    ]
    if lease_seconds is not None:
        workers = describe_workers(status.get("workers", []), lease_seconds)
        parts.insert(0, _table(
            f"Workers (lost after {lease_seconds:g} s without a heartbeat)",
            ["worker", "state", "last heartbeat", "current job", "pid", "started"],
            [[w["name"], w["state"], f'{_when(w["seen"])} ({w["age"]:.0f} s ago)',
              ", ".join(map(str, w["jobs"])) or "idle", w["pid"], _when(w["started"])] for w in workers],
            lambda r: "bad" if r[1] == "lost" else ""))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>{html.escape(ae_title)} - dicom-ai node status</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: left; }}
th {{ background: #eee; }}
tr.bad td {{ background: #fdd; }}
.ok {{ color: #060; margin-right: 1em; }} .bad {{ color: #a00; margin-right: 1em; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(ae_title)}: dicom-ai node {html.escape(__version__)}</h1>
<p>Read-only; refreshes every {REFRESH_SECONDS} s; shown {_when(time.time())}. Failed deliveries are re-queued with
<code>dicom-ai retry</code>.</p>
<p>{checks}</p>{notices}
{''.join(parts)}
</body></html>
"""


class StatusServer:
    """The HTTP server thread; ``status()`` and ``ready()`` are read from the node on each request.

    Parameters
    ----------
    address, port : str, int
        Where to listen (``[http]``; port 0 is not allowed here: the caller does not start one).
    ae_title : str
        The node's AE title for the page.
    status : callable
        Returns ``JobStore.status()``.
    ready : callable
        Returns the readiness checks, name -> bool.
    reasons : callable, optional
        Returns why failing checks fail (name -> text), after ``ready()``.
    lease_seconds : float, optional
        ``workers.lease_seconds`` in distributed mode (the Workers table).
    """

    def __init__(self, address: str, port: int, ae_title: str, status: Callable[[], dict],
                 ready: Callable[[], dict[str, bool]], reasons: Callable[[], dict[str, str]] | None = None,
                 lease_seconds: float | None = None):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
                    elif path == "/healthz":
                        self._send(200, "text/plain; charset=utf-8", b"ok\n")
                    elif path == "/readyz":
                        checks = outer.ready()
                        body = dict(checks)
                        if not all(checks.values()) and outer.reasons():
                            body["reasons"] = outer.reasons()  # why, for a person reading it
                        self._send(200 if all(checks.values()) else 503, "application/json",
                                   json.dumps(body).encode())
                    elif path in ("/", "/status"):
                        ready = outer.ready()
                        page = render_status_page(outer.status(), outer.ae_title, ready, outer.reasons(),
                                                  outer.lease_seconds)
                        self._send(200, "text/html; charset=utf-8", page.encode())
                    else:
                        self._send(404, "text/plain; charset=utf-8", b"not found: /metrics /healthz /readyz /\n")
                except Exception as exc:  # a job store that cannot be read: say so, keep serving
                    self._send(503, "text/plain; charset=utf-8", f"unavailable: {type(exc).__name__}\n".encode())

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:
                pass  # scrapes every few seconds would flood the node's log

        self.ae_title, self.status, self.ready = ae_title, status, ready
        self.reasons = reasons or dict
        self.lease_seconds = lease_seconds
        self.httpd = ThreadingHTTPServer((address, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        logs.event("http_listening", address=self.httpd.server_address[0], port=self.port,
                   endpoints="/metrics,/healthz,/readyz,/")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
