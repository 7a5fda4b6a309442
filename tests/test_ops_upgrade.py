"""Upgrades, backups and restores of the job store, both engines, as docs/operations.md describes them.

Upgrade: a job store written by the previous release (schema 4, ``tests/data/jobstore_v4*.sql``,
made by ``tests/data/make_jobstore_fixtures.py`` at that release) holds a queued job, a job whose
worker died while it ran, and a done job whose delivery was cut off with one object in doubt.
This release opens it, migrates it (schema 5: ``jobs.models``) and finishes all of it: every
job done, every result at the PACS, the in-doubt object once.

Backup and restore: the documented commands (``sqlite3 jobs.sqlite ".backup ..."`` while the
node runs; ``pg_dump -Fc`` / ``pg_restore``) copy a store with data; the copy opens, says the
same, and a node on it finishes its work.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest

from node_harness import (MG_PRESENTATION, make_mg, node_env, start_node, start_storescp, store_status, storescu,
                          wait_delivered, wait_for, write_node_config, write_study, free_port)

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"


def _materialise(storage: Path, rows: list[dict]) -> None:
    """Write an MG file at each recorded path with the recorded UIDs (the fixture holds only rows)."""
    for r in rows:
        study = r.get("study_uid") or r["sop_instance_uid"].rsplit(".", 3)[0]
        ds = make_mg(r.get("laterality", "L"), r.get("view", "CC"), study, study + ".1", 1, seed=5)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = r["sop_instance_uid"]
        path = Path(r["path"])
        assert str(path).startswith(str(storage)), path
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)


def _previous_sqlite(storage: Path) -> None:
    storage.mkdir(parents=True)
    sql = (DATA / "jobstore_v4.sql").read_text().replace("/STORAGE", str(storage))
    conn = sqlite3.connect(storage / "jobs.sqlite")
    conn.executescript(sql)
    conn.close()


def _rows(query, sql: str) -> list[dict]:
    return [dict(r) for r in query(sql)]


def _fixture_files(storage: Path, query) -> None:
    _materialise(storage, _rows(query, "SELECT i.sop_instance_uid, i.path, i.laterality, i.view, s.study_uid "
                                       "FROM instances i JOIN studies s ON s.id = i.study_id"))
    _materialise(storage, _rows(query, "SELECT sop_instance_uid, path FROM outbox"))


def _run_upgraded_node(tmp_path: Path, storage: Path, set_pacs_port, jobstore: dict | None = None) -> tuple[dict, Path]:
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    # The fixture's delivery names PACS at 127.0.0.1:104; this test's PACS listens where the OS put it.
    set_pacs_port(pacs_port)
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", storage, port, [("PACS", pacs_port)],
                            **({"jobstore": jobstore} if jobstore else {}))
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        status = wait_delivered(storage, jobs=3, timeout=120, url=(jobstore or {}).get("url"))
    finally:
        node.stop()
        pacs.stop()
    return status, tmp_path / "pacs"


def _check_finished(status: dict, pacs: Path) -> None:
    assert [j["state"] for j in status["jobs"]] == ["done", "done", "done"], status["jobs"]
    assert [d["state"] for d in status["deliveries"]] == ["done", "done", "done"], status["deliveries"]
    job1, job2, job3 = status["jobs"]
    assert job2["attempts"] == 2 and job2["failures"] == 0  # its worker died under the previous release: re-run
    assert job3["models"] is None  # made by the previous release: not known, not invented
    assert json.loads(job1["models"]) == {"stand-in": "0.0"} == json.loads(job2["models"])
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.rglob("*") if p.is_file()
                and not p.name.endswith(".log")]
    uids = [str(ds.SOPInstanceUID) for ds in received]
    assert len(uids) == len(set(uids))  # nothing twice, the object in doubt included
    assert {"1.2.826.0.1.3680043.8.498.3.9.1", "1.2.826.0.1.3680043.8.498.3.9.2"} <= set(uids)
    assert len(uids) >= 2 + 2 * 2  # job 3's two objects, and at least SEG + SR for jobs 1 and 2


def test_sqlite_store_of_the_previous_release_is_migrated_and_finished(tmp_path):
    from dicom_ai.node.jobstore import SCHEMA_VERSION

    storage = tmp_path / "storage"
    _previous_sqlite(storage)
    conn = sqlite3.connect(storage / "jobs.sqlite")
    conn.row_factory = sqlite3.Row
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 4 < SCHEMA_VERSION
    _fixture_files(storage, conn.execute)
    conn.close()

    def set_port(pacs_port):
        with sqlite3.connect(storage / "jobs.sqlite") as c:
            c.execute("UPDATE deliveries SET port = ?", (pacs_port,))
    status, pacs = _run_upgraded_node(tmp_path, storage, set_port)
    _check_finished(status, pacs)
    assert sqlite3.connect(storage / "jobs.sqlite").execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_postgresql_store_of_the_previous_release_is_migrated_and_finished(tmp_path, postgres_server):
    import psycopg
    from psycopg.rows import dict_row

    from dicom_ai.node.jobstore import SCHEMA_VERSION
    from dicom_ai.node.jobstore_postgres import PostgresJobStore

    storage = tmp_path / "storage"
    storage.mkdir()
    url = postgres_server.new_database()
    sql = (DATA / "jobstore_v4_postgres.sql").read_text().replace("/STORAGE", str(storage))
    r = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-q", url], input=sql, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    with psycopg.connect(url, row_factory=dict_row) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()["value"] == "4"
        _fixture_files(storage, lambda q: conn.execute(q).fetchall())
    def set_port(pacs_port):
        with psycopg.connect(url) as c:
            c.execute("UPDATE deliveries SET port = %s", (pacs_port,))
    status, pacs = _run_upgraded_node(tmp_path, storage, set_port, {"url": url})
    _check_finished(status, pacs)
    store = PostgresJobStore(url)
    try:
        assert store.schema_version() == SCHEMA_VERSION
    finally:
        store.close()


def test_sqlite_online_backup_restores_to_a_working_node(tmp_path):
    """``sqlite3 jobs.sqlite ".backup ..."`` while the node runs (WAL), the storage folder copied
    beside it; the restored copy holds the same rows and a node on it delivers what was pending."""
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    port = free_port()
    storage = tmp_path / "storage"
    # The PACS is down while the study arrives: its delivery stays pending in the backup.
    dead = free_port()
    cfg = write_node_config(tmp_path / "node.toml", storage, port, [("PACS", dead)],
                            retry={"max_attempts": 100, "initial_delay_seconds": 30, "max_delay_seconds": 60})
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        assert storescu(port, write_study(tmp_path / "study", seed=41)).returncode == 0
        wait_for(lambda: store_status(storage)["deliveries"], 60, "a pending delivery")
        backup = tmp_path / "backup"
        backup.mkdir()
        # What docs/operations.md says, run while the node runs:
        r = subprocess.run(["sqlite3", str(storage / "jobs.sqlite"), f".backup {backup / 'jobs.sqlite'}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["tar", "-C", str(storage), "--exclude=./jobs.sqlite*", "-cf", str(backup / "files.tar"),
                            "."], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        before = store_status(storage)
    finally:
        node.stop()
    restored = tmp_path / "restored"
    restored.mkdir()
    subprocess.run(["tar", "-C", str(restored), "-xf", str(backup / "files.tar")], check=True, timeout=60)
    (backup / "jobs.sqlite").rename(restored / "jobs.sqlite")
    again = store_status(restored)
    assert [(j["id"], j["state"]) for j in again["jobs"]] == [(j["id"], j["state"]) for j in before["jobs"]]
    assert [d["state"] for d in again["deliveries"]] == ["pending"]
    # The restored node has the PACS back at its address (the delivery row names host and port).
    conn = sqlite3.connect(restored / "jobs.sqlite")
    conn.execute("UPDATE deliveries SET port = ?, next_attempt = 0", (pacs_port,))
    conn.commit()
    conn.close()
    # Paths in the store are absolute: a restore goes to the same path (here: moved back).
    os.rename(storage, tmp_path / "old-storage")
    os.rename(restored, storage)
    cfg = write_node_config(tmp_path / "node2.toml", storage, port, [("PACS", pacs_port)])
    node = start_node(cfg, port, tmp_path / "node2.log")
    try:
        status = wait_delivered(storage, jobs=1, timeout=90)
        assert [d["state"] for d in status["deliveries"]] == ["done"]
    finally:
        node.stop()
        pacs.stop()


def test_postgresql_dump_and_restore(tmp_path, postgres_server):
    """``pg_dump -Fc`` of a store with data and ``pg_restore`` into a new database: same rows, same
    schema version, and the restored store takes writes."""
    from dicom_ai.node.jobstore import Instance
    from dicom_ai.node.jobstore_postgres import PostgresJobStore
    from dicom_ai.node.supervisor import make_result_uids

    url = postgres_server.new_database()
    store = PostgresJobStore(url)
    try:
        for i, (lat, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")], start=1):
            store.record_instance(study_uid="1.2.3", calling_ae="PACS", size=10, now=1000.0 + i,
                                  instance=Instance(f"1.2.3.{i}", MG_PRESENTATION, "1.2.840.10008.1.2.1", lat, view,
                                                    f"/s/{i}.dcm"))
        (job,) = store.close_ready_studies(1.0, 5.0, make_result_uids, now=2000.0)
        before = store.status()
    finally:
        store.close()
    dump = tmp_path / "jobs.dump"
    r = subprocess.run(["pg_dump", "-Fc", "-f", str(dump), url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    target = postgres_server.new_database()
    r = subprocess.run(["pg_restore", "--no-owner", "-d", target, str(dump)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    restored = PostgresJobStore(target)
    try:
        after = restored.status()
        assert after["studies"] == before["studies"] and after["jobs"] == before["jobs"]
        claimed = restored.claim_job(job, worker="w@h pid 1")  # identity columns continue, writes work
        assert claimed is not None and claimed.id == job
    finally:
        restored.close()


def test_model_versions_name_the_models_that_ran():
    from dicom_ai.core.findings import ModelIdentity
    from dicom_ai.node.worker import model_versions

    class Bundles:  # the shape of networks.pipeline.Pipeline: identities is a property
        @property
        def identities(self):
            return [ModelIdentity(name="glam", version="0.2.0"), ModelIdentity(name="dunet", version="1.1")]

    class StandIn:
        identity = ModelIdentity(name="stand-in", version="0.0")

    assert model_versions(Bundles(), {"glam": [0.1]}) == {"glam": "0.2.0"}  # dunet was off: it made nothing
    assert model_versions(Bundles(), {}) == {"glam": "0.2.0", "dunet": "1.1"}
    assert model_versions(StandIn()) == {"stand-in": "0.0"}
