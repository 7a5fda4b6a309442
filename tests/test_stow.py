"""Result delivery over DICOMweb (STOW-RS, QIDO-RS for objects in doubt) to a real Orthanc with its
DICOMweb plugin, under the C-STORE rules: exactly once, retries with backoff, per-destination
result kinds."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from _results_sources import built_small
from dicom_ai.core.options import RESULT_OBJECTS, ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.node.config import ConfigError, from_mapping
from dicom_ai.node.delivery import DeliveryAgent
from dicom_ai.node.jobstore import Instance, JobStore
from dicom_ai.node.processing import destinations_for
from dicom_ai.results import build_results
from node_harness import Orthanc, free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
pytestmark = pytest.mark.skipif(not DICOMWEB_PLUGIN.is_file(),
                                reason="Orthanc's DICOMweb plugin not installed (Debian package orthanc-dicomweb)")


class DicomWebOrthanc(Orthanc):
    """tests/node_harness.py's Orthanc with the DICOMweb plugin and no DICOM server."""

    def __init__(self, folder: Path):
        super().__init__(folder, node_port=free_port(), config={
            "Name": "STOW-TEST", "Plugins": [str(DICOMWEB_PLUGIN)], "DicomServerEnabled": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}/dicom-web"

    def instances(self) -> dict[str, str]:
        """SOP Instance UID -> SOP Class UID of everything Orthanc holds."""
        out = {}
        for oid in self.get("/instances"):
            tags = self.get(f"/instances/{oid}/simplified-tags")
            out[tags["SOPInstanceUID"]] = tags["SOPClassUID"]
        return out


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = DicomWebOrthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def results():
    """The small study's results with every kind of object (SEG, SR, CAD SR, GSPS, SC)."""
    sources, findings, _, _ = built_small()
    uids = ResultUIDs.generate([str(d.SOPInstanceUID) for d in sources])
    return sources, build_results(sources, findings, uids, ResultOptions(cad_sr=True, secondary_capture=True)).datasets


def _config(tmp_path: Path, destinations: list[dict], **retry):
    return from_mapping({"node": {"storage": str(tmp_path / "storage"), "ae_title": "AINODE"},
                         "destinations": destinations,
                         "retry": {"initial_delay_seconds": 0, "timeout_seconds": 5, "max_attempts": 3, **retry}})


def _queue(cfg, results, tmp_path: Path):
    """A done job whose outbox holds ``results``, with one delivery per configured destination."""
    sources, datasets = results
    store = JobStore(cfg.storage_dir / "jobs.sqlite")
    for ds in sources:
        store.record_instance(study_uid=ds.StudyInstanceUID, calling_ae="MODALITY", size=1, instance=Instance(
            ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", ds.ImageLaterality, ds.ViewPosition, "x"))
    assert store.close_ready_studies(0.0, 0.0, lambda uids: ResultUIDs.generate(uids).to_json())
    job = store.claim_job()
    outbox = tmp_path / "outbox"
    outbox.mkdir(exist_ok=True)
    entries = []
    for ds in datasets:
        path = outbox / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        entries.append((str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(path)))
    assert store.complete_job(job, entries, destinations_for(cfg, "MODALITY")) == "done"
    return store, entries


def test_stow_round_trip_sends_every_object_once(orthanc, results, tmp_path):
    cfg = _config(tmp_path, [{"ae_title": "WEB", "url": orthanc.url}])
    store, entries = _queue(cfg, results, tmp_path)
    (d,) = store.due_deliveries()
    assert (d.host, d.port) == (orthanc.url, 0)
    agent = DeliveryAgent(cfg, store)
    assert agent.attempt(d) == "done"
    held = orthanc.instances()
    assert {uid: cls for uid, cls, _ in entries}.items() <= held.items()
    kinds = {k for k, classes in RESULT_OBJECTS.items() for _, cls, _ in entries if cls in classes}
    assert kinds == set(RESULT_OBJECTS)  # SEG, SR, CAD SR, GSPS and SC all went over STOW-RS
    # What Orthanc stored is what the outbox holds (WADO-RS metadata of the GSPS).
    gsps = next(e for e in entries if e[1] == RESULT_OBJECTS["GSPS"][0])
    sent = pydicom.dcmread(gsps[2])
    meta = orthanc.get(f"/dicom-web/studies/{sent.StudyInstanceUID}/series/{sent.SeriesInstanceUID}/metadata")
    assert meta[0]["00080018"]["Value"] == [gsps[0]]
    assert meta[0]["00700001"]["Value"][0]["00700008"]["Value"][0]["00700006"]["Value"][0].endswith("%")
    # The delivery is done: nothing is due, nothing is sent again.
    assert store.due_deliveries() == []


def test_per_destination_objects_and_in_doubt_objects_settled_by_qido(orthanc, results, tmp_path, monkeypatch):
    from dicom_ai.node import logs
    events = []
    monkeypatch.setattr(logs, "event", lambda name, **fields: events.append((name, fields.get("sop_instance_uid"))))
    cfg = _config(tmp_path, [{"ae_title": "WEB", "url": orthanc.url, "objects": ["SR", "GSPS"]}])
    store, entries = _queue(cfg, results, tmp_path)
    (d,) = store.due_deliveries()
    before = set(orthanc.instances())
    wanted = {uid for uid, cls, _ in entries if cls in RESULT_OBJECTS["SR"] + RESULT_OBJECTS["GSPS"]}
    # One object is in doubt and the server already holds it (stored here by hand, as if the
    # node had stopped between the server's answer and its record).
    held_uid = min(wanted)
    if held_uid not in before:
        from dicomweb_client.api import DICOMwebClient
        DICOMwebClient(orthanc.url).store_instances([pydicom.dcmread(next(p for u, _, p in entries if u == held_uid))])
    store.mark_sending(d.id, held_uid)
    (d,) = store.due_deliveries()
    assert d.in_doubt == {held_uid}
    agent = DeliveryAgent(cfg, store)
    assert agent.attempt(d) == "done"
    conn = store._conn()
    sent = {r[0] for r in conn.execute("SELECT sop_instance_uid FROM sent WHERE delivery_id = ?", (d.id,))}
    assert sent == wanted  # only SR and GSPS, the in-doubt one confirmed rather than sent
    assert ("delivery_confirmed_in_doubt", held_uid) in events and ("object_sent", held_uid) not in events
    assert {u for name, u in events if name == "object_sent"} == wanted - {held_uid}
    assert not conn.execute("SELECT 1 FROM sending WHERE delivery_id = ?", (d.id,)).fetchall()


def test_in_doubt_object_missing_at_the_server_is_sent_again(orthanc, results, tmp_path):
    sources, datasets = results
    # A fresh study so the server holds none of it.
    fresh_uids = ResultUIDs.generate([str(d.SOPInstanceUID) for d in sources])
    sources_, findings, _, _ = built_small()
    datasets = build_results(sources_, findings, fresh_uids, ResultOptions()).datasets
    cfg = _config(tmp_path, [{"ae_title": "WEB", "url": orthanc.url, "objects": ["GSPS"]}])
    store, entries = _queue(cfg, (sources, datasets), tmp_path)
    (d,) = store.due_deliveries()
    gsps_uids = {uid for uid, cls, _ in entries if cls == RESULT_OBJECTS["GSPS"][0]}
    assert len(gsps_uids) == 2 and not gsps_uids & set(orthanc.instances())
    gsps_uid = min(gsps_uids)
    store.mark_sending(d.id, gsps_uid)
    (d,) = store.due_deliveries()
    assert d.in_doubt == {gsps_uid}
    assert DeliveryAgent(cfg, store).attempt(d) == "done"
    held = orthanc.instances()
    assert gsps_uids <= set(held) and not {uid for uid, _, _ in entries} - gsps_uids & set(held)


def test_unreachable_server_is_retried_with_backoff_and_the_object_stays_in_doubt(results, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    cfg = _config(tmp_path, [{"ae_title": "WEB", "url": dead, "objects": ["SR"]}],
                  initial_delay_seconds=30, max_attempts=2)
    store, entries = _queue(cfg, results, tmp_path)
    (d,) = store.due_deliveries()
    agent = DeliveryAgent(cfg, store)
    started = time.time()
    assert agent.attempt(d) == "pending"
    assert store.due_deliveries() == []  # next attempt in 30 s
    (d,) = store.due_deliveries(now=started + 31)
    assert d.attempts == 1 and len(d.in_doubt) == 1  # no answer: the server may have it
    assert agent.attempt(d) == "failed"  # max_attempts = 2
    status = store.status()
    assert "sending failed" in status["deliveries"][0]["error"]


def test_an_error_answer_is_a_failure_and_clears_the_intent(orthanc, results, tmp_path):
    cfg = _config(tmp_path, [{"ae_title": "WEB", "url": f"http://127.0.0.1:{orthanc.http}/no-such-root",
                              "objects": ["SR"]}])
    store, entries = _queue(cfg, results, tmp_path)
    (d,) = store.due_deliveries()
    assert DeliveryAgent(cfg, store).attempt(d) == "pending"
    (d,) = store.due_deliveries(now=time.time() + 1)
    assert d.attempts == 1 and d.in_doubt == frozenset()  # the server answered: known not stored
    assert "answered HTTP 404" in store.status()["deliveries"][0]["error"]


def test_configuration_of_dicomweb_destinations_and_objects(tmp_path):
    cfg = _config(tmp_path, [{"ae_title": "WEB", "url": "https://pacs.example/dicom-web", "objects": ["SR", "GSPS"]},
                             {"ae_title": "ARCHIVE", "host": "10.0.0.6", "port": 104}])
    assert destinations_for(cfg, "MODALITY") == [("WEB", "https://pacs.example/dicom-web", 0), ("ARCHIVE", "10.0.0.6", 104)]
    web = cfg.remote("WEB")
    assert web.takes(RESULT_OBJECTS["GSPS"][0]) and not web.takes(RESULT_OBJECTS["SEG"][0])
    assert cfg.remote("ARCHIVE").takes(RESULT_OBJECTS["SC"][0])  # no objects key: everything
    assert type(cfg).from_json(cfg.to_json()).destinations == cfg.destinations
    for bad, why in [({"ae_title": "W", "url": "ftp://x"}, "url"), ({"ae_title": "W", "url": "http://x", "port": 1}, "port"),
                     ({"ae_title": "W", "host": "h", "port": 1, "objects": ["PNG"]}, "objects"),
                     ({"url": "http://x"}, "ae_title")]:
        with pytest.raises(ConfigError, match=why):
            _config(tmp_path, [bad])
    with pytest.raises(ConfigError, match="peer"):
        from_mapping({"peers": [{"ae_title": "P", "url": "http://x"}]})
    off = from_mapping({"results": {"gsps": False, "secondary_capture": True}})
    from dicom_ai.node.processing import result_options
    opts = result_options(off, revision=1)
    assert (opts.gsps, opts.secondary_capture) == (False, True)
    assert (opts.gsps_series_number, opts.sc_series_number) == (9014, 9015)
