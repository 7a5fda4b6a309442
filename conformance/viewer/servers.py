"""The two servers the viewer check needs, both on loopback and both stopped on exit.

- ``Orthanc``: the Debian Orthanc with only its DICOMweb plugin, in a temporary folder, on
  free ports. It plays the PACS the node sends its results to.
- ``OhifServer``: serves the built OHIF application (the ``dist`` folder of ``@ohif/app``)
  with our own ``app-config.js``, and forwards ``/dicom-web/`` to Orthanc, so the browser
  sees one origin and Orthanc needs no CORS headers.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_ROOT = "/dicom-web/"


def free_port() -> int:
    """A TCP port the OS says is free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """Orthanc in the foreground with a temporary config; use as a context manager."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        exe = shutil.which("Orthanc")
        if exe is None:
            raise FileNotFoundError("Orthanc not found; install the Debian packages orthanc orthanc-dicomweb")
        if not DICOMWEB_PLUGIN.is_file():
            raise FileNotFoundError(f"{DICOMWEB_PLUGIN} not found; install the Debian package orthanc-dicomweb")
        self.exe = exe
        self.timeout_s = timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix="viewer-orthanc-"))
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> "Orthanc":
        config = {
            "Name": "VIEWER-CHECK",
            "StorageDirectory": str(self.dir / "db"), "IndexDirectory": str(self.dir / "db"),
            # Only the DICOMweb plugin: the system folder also holds worklists and serve-folders.
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpServerEnabled": True, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            # Orthanc 1.10 cannot bind loopback only, so DICOM stays off: uploads go over REST.
            "DicomServerEnabled": False, "DicomPort": self.dicom_port,
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": False,
                         "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
            "SaveJobs": False,
        }
        cfg = self.dir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=1))
        self.log = open(self.dir / "orthanc.stdout", "wb")
        self.proc = subprocess.Popen([self.exe, f"--logdir={self.dir}", str(cfg)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.dir}/orthanc.stdout")
            try:
                with urllib.request.urlopen(self.url + "/system", timeout=2) as r:
                    json.load(r)
                with urllib.request.urlopen(self.url + "/plugins", timeout=2) as r:
                    if "dicom-web" not in json.load(r):
                        raise RuntimeError("Orthanc started without its DICOMweb plugin")
                return self
            except (OSError, ValueError):
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {self.timeout_s} s")

    def upload(self, path: Path) -> dict:
        """POST one DICOM file to /instances; returns Orthanc's answer."""
        req = urllib.request.Request(self.url + "/instances", data=Path(path).read_bytes(),
                                     headers={"Content-Type": "application/dicom"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc refused {path.name}: {answer}")
        return answer

    def delete_all(self) -> None:
        """Forget every study, so the next upload starts from an empty PACS."""
        with urllib.request.urlopen(self.url + "/studies", timeout=10) as r:
            studies = json.load(r)
        for sid in studies:
            urllib.request.urlopen(urllib.request.Request(self.url + f"/studies/{sid}", method="DELETE"),
                                   timeout=10).close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.stop()


# OHIF 3.13.2 with lazy study loading makes the SEG display sets before the MG ones and then
# attaches every SEG to the first MG view of the referenced series (a series holding several
# views is split into one display set per image for MG): see conformance/viewer.md.
LAZY = False


def ohif_config(data_source_name: str = "orthanc") -> str:
    """OHIF's ``app-config.js``: one DICOMweb source on our own origin (the proxy below)."""
    root = DICOMWEB_ROOT.rstrip("/")
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": data_source_name,
        "configuration": {
            "friendlyName": "Orthanc (viewer check)", "name": "orthanc",
            "wadoUriRoot": root, "qidoRoot": root, "wadoRoot": root,
            "qidoSupportsIncludeField": False, "imageRendering": "wadors",
            "thumbnailRendering": "wadors", "enableStudyLazyLoad": LAZY,
            "supportsFuzzyMatching": False, "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/", "extensions": [], "modes": [], "customizationService": {},
        "showStudyList": True, "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False, "showCPUFallbackMessage": False,
        "showLoadingIndicator": True, "strictZSpacingForVolumeViewport": True,
        "showErrorDetails": "always",
        "defaultDataSourceName": data_source_name, "dataSources": [source],
    }
    # OHIF calls this on every failed image load; it must be a function, which JSON cannot carry.
    handler = ("window.config.httpErrorHandler = function (error) {\n"
               "  console.error('image load failed', error && (error.status || error.message || String(error)), error && error.stack);\n"
               "};\n")
    return "window.config = " + json.dumps(config, indent=1) + ";\n" + handler


class OhifServer:
    """Static server for OHIF's dist folder plus a /dicom-web/ proxy; a context manager."""

    def __init__(self, dist: Path, orthanc_url: str) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"{dist}/index.html missing; the OHIF build was not unpacked")
        self.dist = dist
        self.port = free_port()
        target = urllib.request.urlparse(orthanc_url)
        config = ohif_config().encode()
        directory = str(dist)

        class Handler(SimpleHTTPRequestHandler):
            extensions_map = {**SimpleHTTPRequestHandler.extensions_map,
                              ".wasm": "application/wasm", ".js": "text/javascript"}

            def __init__(self, *a, **kw):
                super().__init__(*a, directory=directory, **kw)

            def log_message(self, *args) -> None:  # the check reports failures itself
                pass

            def _proxy(self) -> None:
                body = None
                if "Content-Length" in self.headers:
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("accept", "content-type", "range")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("content-type", "etag", "last-modified"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            def do_GET(self) -> None:
                if self.path.startswith(DICOMWEB_ROOT):
                    return self._proxy()
                path = self.path.split("?", 1)[0]
                if path == "/app-config.js":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/javascript")
                    self.send_header("Content-Length", str(len(config)))
                    self.end_headers()
                    self.wfile.write(config)
                    return
                if path != "/" and not (Path(directory) / path.lstrip("/")).exists():
                    self.path = "/index.html"  # a single-page app: /viewer?... is index.html
                return super().do_GET()

            def do_POST(self) -> None:
                if self.path.startswith(DICOMWEB_ROOT):
                    return self._proxy()
                self.send_error(405)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "OhifServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
