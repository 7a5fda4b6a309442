"""Shared helpers of the node tests: peers (dcmtk, Orthanc), node processes, small MG studies.

Everything listens on 127.0.0.1 on ports the OS hands out, and every process started here
is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_ai.core.findings import ImageScore, ModelIdentity, ModelOutput, ProbabilityMap

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PYTHON = sys.executable
MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
PATIENT_NAME = "Secret^Patientname"
PATIENT_ID = "PID-77123-SECRET"
ACCESSION = "ACC-99887-SECRET"

_ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"], ("L", "MLO"): ["A", "F"], ("R", "MLO"): ["P", "F"]}
_VIEW_CODE = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_mg(laterality: str, view: str, study_uid: str, series_uid: str, number: int,
            shape: tuple[int, int] = (96, 64), seed: int = 0) -> Dataset:
    """A small dciodvfy-clean MG For Presentation image (recipe of dicom-tooling.md 2.1)."""
    rng = np.random.default_rng(seed + number)
    rows, cols = shape
    r, c = np.mgrid[0:rows, 0:cols]
    x = c if laterality == "L" else cols - 1 - c
    breast = (r - rows / 2) ** 2 + (x * 1.3) ** 2 < (0.45 * rows) ** 2
    img = np.where(breast, 2400 + rng.normal(0, 120, shape), 80).clip(0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MG_PRESENTATION
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID, ds.SOPInstanceUID = MG_PRESENTATION, sop_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, "19600101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ACCESSION
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MG", 1, number
    ds.Manufacturer = "TEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20260101", "120000", "20260101120000"
    ds.PatientOrientation = _ORIENTATION[(laterality, view)]
    ds.ImageLaterality, ds.ViewPosition = laterality, view
    code, meaning = _VIEW_CODE[view]
    vc = Dataset()
    vc.CodeValue, vc.CodingSchemeDesignator, vc.CodeMeaning = code, "SCT", meaning
    vc.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [vc]
    ar = Dataset()
    ar.CodeValue, ar.CodingSchemeDesignator, ar.CodeMeaning = "76752008", "SCT", "Breast"
    ds.AnatomicRegionSequence = [ar]
    ds.BodyPartExamined = ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent, ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "NO", "00"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = ds.PixelSpacing = [0.1, 0.1]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = 660, 620
    ds.EstimatedRadiographicMagnificationFactor = 660 / 620
    ds.PositionerPrimaryAngle = 0 if view == "CC" else 45
    ds.KVP, ds.ExposureTime, ds.XRayTubeCurrent, ds.Exposure = 28, 1000, 100, 100
    ds.AnodeTargetMaterial, ds.BodyPartThickness = "TUNGSTEN", 50
    ds.AcquisitionContextSequence = []
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = img.tobytes()
    return ds


def write_study(folder: Path, shape: tuple[int, int] = (96, 64), views=None, study_uid: str | None = None,
                seed: int = 0) -> list[Path]:
    """Write a four-view (or ``views``) study as MG files; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    views = views or [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
    paths = []
    for i, (lat, view) in enumerate(views, start=1):
        ds = make_mg(lat, view, study_uid, series_uid, i, shape=shape, seed=seed)
        p = folder / f"{lat}{view}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


# -- the stand-in pipeline the node's worker loads in tests ---------------------------------

class StandInPipeline:
    """Deterministic findings without a network: a disc where the image is brightest.

    ``DICOM_AI_TEST_INFER_SECONDS`` makes each four-view study take that long, a quarter per
    image (the worker runs the pipeline image by image), to kill the node during inference.
    """

    identity = ModelIdentity(name="stand-in", version="0.0")

    def run(self, datasets):
        from dicom_ai.core.findings import ImageFindings

        delay = float(os.environ.get("DICOM_AI_TEST_INFER_SECONDS", "0"))
        if delay:
            marker = os.environ.get("DICOM_AI_TEST_INFER_MARKER")
            if marker:
                Path(marker).write_text(str(os.getpid()))
            time.sleep(delay * len(datasets) / 4)
        out = []
        for ds in datasets:
            # Decoding here (not torch) keeps the worker start fast; it still exercises every
            # transfer syntax's decoder.
            pixels = ds.pixel_array.astype(np.float32)
            rows, cols = pixels.shape
            r, c = np.mgrid[0:rows, 0:cols]
            cy, cx = np.unravel_index(int(np.argmax(pixels)), pixels.shape)
            # A 16-pixel disc: above the writers' minimum region area (3 mm2) at 0.1 mm pixels,
            # and cheap to encode on the large images of the crash tests.
            radius = min(16, min(rows, cols) // 3)
            prob = np.where((r - cy) ** 2 + (c - cx) ** 2 < radius ** 2, 0.9, 0.05)
            f = ImageFindings(sop_instance_uid=str(ds.SOPInstanceUID))
            f.add(ModelOutput(maps=[ProbabilityMap("malignant_lesion", prob.astype(np.float32), 0.5, self.identity)],
                              scores=[ImageScore("malignant", 0.8, self.identity)]))
            out.append(f)
        return out


def stand_in_pipeline(models, device):
    return StandInPipeline()


# -- processes --------------------------------------------------------------------------------

class Proc:
    """A started program we stop by PID."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        self.args = args
        self.log = log
        self._fh = open(log, "ab")
        self.popen = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._fh.close()

    def kill(self) -> None:
        """SIGKILL the process (and its worker, which dies with its parent)."""
        self.stop(signal.SIGKILL)


def log_events(log: Path, name: str) -> list[dict]:
    """The JSON log records of event ``name`` in ``log`` (lines that are not JSON are skipped)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            out.append(record)
    return out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_port(port: int, timeout: float = 20) -> None:
    def ok():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_for(ok, timeout, f"port {port} to listen")


def start_storescp(folder: Path, ae_title: str = "PACS", port: int | None = None,
                   extra: list[str] | None = None) -> tuple[Proc, int]:
    """dcmtk's storescp as the PACS receiving results into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    # A port picked by free_port can be taken by another process before storescp binds it
    # ("Address already in use"): storescp then exits, and a picked port is tried again.
    for attempt in range(3):
        chosen = port or free_port()
        proc = Proc(["storescp", "-v", "--aetitle", ae_title, "--output-directory", str(folder), "+xa", "-fe",
                     ".dcm", *(extra or []), str(chosen)], folder.parent / f"storescp-{ae_title}-{chosen}.log")
        wait_for(lambda: _listening(chosen) or not proc.alive(), 20, f"port {chosen} to listen")
        time.sleep(0.2)  # a port another program listens on answers too: storescp must still be running
        if proc.alive() and _listening(chosen):
            return proc, chosen
        proc.stop()
        if port:
            break
    raise AssertionError(f"storescp did not start on port {chosen}: {proc.log.read_text(errors='replace')[-500:]}")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def write_node_config(path: Path, storage: Path, port: int, peers: list[tuple[str, int]], **sections) -> Path:
    """A node.toml for tests: stand-in pipeline, short timings; ``sections`` override keys."""
    cfg = {
        "node": {"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": port, "storage": str(storage),
                 "reserve_free_mb": 1},
        "study": {"grace_seconds": 0.5, "idle_seconds": 3.0},
        "pipeline": {"factory": "node_harness:stand_in_pipeline", "device": "cpu", "previews": False},
        "retry": {"max_attempts": 5, "initial_delay_seconds": 0.5, "max_delay_seconds": 2.0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    lines = []
    for section in ("node", "study", "pipeline", "results", "limits", "retry", "logging", "jobstore", "workers"):
        if section in cfg:
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in cfg[section].items()]
    for ae, p in peers:
        lines += ["[[peers]]", f'ae_title = "{ae}"', 'host = "127.0.0.1"', f"port = {p}"]
    for ae, p in cfg.get("destinations", []):
        lines += ["[[destinations]]", f'ae_title = "{ae}"', 'host = "127.0.0.1"', f"port = {p}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def node_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def start_node(config: Path, port: int, log: Path, env: dict | None = None) -> Proc:
    proc = Proc([PYTHON, "-m", "dicom_ai", "serve", "--config", str(config)], log, env=env or node_env(),
                cwd=REPO)
    try:
        wait_port(port, timeout=60)
    except AssertionError:
        proc.stop()
        raise AssertionError(f"node did not start; log:\n{log.read_text()[-3000:]}")
    return proc


_TABLES = ("studies", "instances", "jobs", "deliveries", "outbox", "sent", "notices")


def store_status(storage: Path, url: str | None = None) -> dict:
    """States straight from the job store (read-only): the SQLite file in ``storage``, or the
    PostgreSQL database at ``url``."""
    if url:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(url, row_factory=dict_row, connect_timeout=5) as pg:
            return {t: [dict(r) for r in pg.execute(f"SELECT * FROM {t} ORDER BY 1")] for t in _TABLES}
    conn = sqlite3.connect(f"file:{storage / 'jobs.sqlite'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return {t: [dict(r) for r in conn.execute(f"SELECT * FROM {t}")]
                for t in ("studies", "instances", "jobs", "deliveries", "outbox", "sent", "notices")}
    finally:
        conn.close()


def storescu(port: int, files: list[Path], calling: str = "PACS", called: str = "AINODE",
             extra: list[str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-v", "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=timeout)


def received(folder: Path) -> list[pydicom.Dataset]:
    """Data sets (headers only) a storescp wrote into ``folder``."""
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]


# -- Orthanc ------------------------------------------------------------------------------------

class Orthanc:
    """A throw-away Orthanc (no plugins) with the node registered as modality ``ainode``."""

    def __init__(self, folder: Path, node_port: int, node_ae: str = "AINODE", ae_title: str = "ORTHANC",
                 config: dict | None = None, modality: dict | None = None):
        """``config`` adds or replaces top-level Orthanc settings (plugins, DICOM TLS, Lua
        scripts ...); ``modality`` adds settings to the node's DicomModalities entry."""
        folder.mkdir(parents=True, exist_ok=True)
        self.http = free_port()
        self.dicom = free_port()
        self.ae_title = ae_title
        cfg = {"Name": "NODE-TEST", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
               "Plugins": [], "HttpServerEnabled": True, "HttpPort": self.http, "RemoteAccessAllowed": False,
               "AuthenticationEnabled": False, "DicomServerEnabled": True, "DicomAet": ae_title,
               "DicomPort": self.dicom, "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
               "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False,
               "DicomModalities": {"ainode": {"AET": node_ae, "Host": "127.0.0.1", "Port": node_port}},
               "StableAge": 1, "SaveJobs": False}
        cfg["DicomModalities"]["ainode"].update(modality or {})
        cfg.update(config or {})
        (folder / "orthanc.json").write_text(json.dumps(cfg))
        self.proc = Proc(["Orthanc", f"--logdir={folder}", str(folder / "orthanc.json")], folder / "orthanc.stdout")
        wait_for(lambda: self._ping(), 30, "Orthanc HTTP")

    def _ping(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body) -> object:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.stop()


def delivered_uids(pacs_folder: Path, study_uid: str | None = None) -> list[str]:
    """SOP Instance UIDs of the result objects (not MG) a storescp PACS holds."""
    return sorted(str(ds.SOPInstanceUID) for ds in received(pacs_folder)
                  if ds.Modality != "MG" and (study_uid is None or ds.StudyInstanceUID == study_uid))


def wait_delivered(storage: Path, jobs: int, timeout: float = 60, url: str | None = None) -> dict:
    """Wait until ``jobs`` jobs are done and all their deliveries are done; returns the store."""
    def done():
        try:
            s = store_status(storage, url)
        except Exception as exc:  # PostgreSQL restarting: ask again
            if url and type(exc).__module__.startswith("psycopg"):
                return None
            raise
        failed = [j for j in s["jobs"] if j["state"] == "failed"]
        if failed:
            raise AssertionError(f"job {failed[0]['id']} failed: {failed[0]['error']}")
        finished = [j for j in s["jobs"] if j["state"] == "done"]
        ds = [d for d in s["deliveries"] if d["job_id"] in {j["id"] for j in finished}]
        return s if len(finished) >= jobs and ds and all(d["state"] == "done" for d in ds) else None
    return wait_for(done, timeout, f"{jobs} job(s) processed and delivered", interval=0.2)


def outbox_uids(status: dict, job_id: int) -> list[str]:
    return sorted(o["sop_instance_uid"] for o in status["outbox"] if o["job_id"] == job_id)


# -- PostgreSQL and Redis (the scale-out's engines) ------------------------------------------

def _pg_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries (/usr/lib/postgresql/<version>/bin), if installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


class Postgres:
    """A throw-away PostgreSQL cluster on a loopback port (``initdb`` + ``pg_ctl`` in a temp folder).

    PostgreSQL refuses to run as root, so as root the server runs as ``nobody`` (``setpriv``)
    in a folder owned by it. Trust authentication on 127.0.0.1 only. ``durable=False`` (tests)
    sets ``fsync = off``: tests stop it with ``-m immediate``, which the OS page cache survives;
    benchmarks keep PostgreSQL's durable default, as the embedded SQLite store fsyncs too.
    """

    available = _pg_bin() is not None

    def __init__(self, durable: bool = False):
        self.durable = durable
        import pwd
        import shutil
        import tempfile

        self.bin = _pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql (make debs)")
        self.folder = Path(tempfile.mkdtemp(prefix="dicom-ai-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
            self.as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        self._rmtree = shutil.rmtree
        self.port = free_port()
        self.data = self.folder / "data"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()
        self._databases = 0

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
        return subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                              env=env, check=check, timeout=120, cwd=self.folder)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                        f"-c fsync={'on' if self.durable else 'off'} -c max_connections=200", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Crash-stop the server (``-m immediate``: every connection breaks), wait, start it again."""
        self.stop("immediate")
        time.sleep(down_seconds)
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        self._databases += 1
        name = f"t{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        self._rmtree(self.folder, ignore_errors=True)


class Redis:
    """A throw-away redis-server on a loopback port, without persistence (a restart loses every
    queued message, which is what the tests want to survive)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: Proc | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = Proc(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(self.folder)], self.folder / "redis.log")
        wait_port(self.port)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.proc.kill()
        time.sleep(down_seconds)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
