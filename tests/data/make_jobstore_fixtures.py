"""Job stores as a previous release wrote them, for tests/test_ops_upgrade.py.

Run with the release whose schema they capture (these were made at commit ff0aa16, schema
version 4, the last before ``jobs.models``)::

    PYTHONPATH=. python tests/data/make_jobstore_fixtures.py tests/data [postgresql://...]

Writes ``jobstore_v<N>.sql`` (SQLite ``iterdump``) and, given a PostgreSQL URL of an empty
database, ``jobstore_v<N>_postgres.sql`` (``pg_dump --inserts``). Paths inside start with
``/STORAGE``, which the test replaces with its storage folder. What they hold, through the
job store's own API: study 1 complete with its job queued; study 2's job claimed by a worker
that died (running, lease long expired); study 3's job done with two result objects and a
delivery to PACS that was cut off after its first object (in doubt) and is pending.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from dicom_ai.node.jobstore import SCHEMA_VERSION, Instance, JobStore
from dicom_ai.node.supervisor import make_result_uids

STORAGE = "/STORAGE"
MG = "1.2.840.10008.5.1.4.1.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
VIEWS = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]


def fill(store) -> None:
    t0 = 1_700_000_000.0
    for n in (1, 2, 3):
        study = f"1.2.826.0.1.3680043.8.498.{n}"
        for i, (lat, view) in enumerate(VIEWS, start=1):
            uid = f"{study}.1.{i}"
            store.record_instance(study_uid=study, calling_ae="PACS", size=20000, now=t0 + n * 100 + i,
                                  instance=Instance(uid, MG, EXPLICIT, lat, view, f"{STORAGE}/spool/{study}/{uid}.dcm"))
    jobs = store.close_ready_studies(1.0, 5.0, make_result_uids, now=t0 + 1000)
    assert len(jobs) == 3, jobs
    running = store.claim_job(jobs[1], worker="w1@gone pid 4242")
    done = store.claim_job(jobs[2], worker="w2@gone pid 4343")
    outputs = [(f"1.2.826.0.1.3680043.8.498.3.9.{k}", MG, f"{STORAGE}/outbox/{done.id}/result{k}.dcm") for k in (1, 2)]
    assert store.complete_job(done, outputs, [("PACS", "127.0.0.1", 104)]) == "done"
    (delivery,) = store.due_deliveries(now=t0 + 10**9)
    store.mark_sending(delivery.id, outputs[0][0])  # the sender died before the answer: in doubt
    assert running is not None


def main() -> None:
    out = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        store = JobStore(Path(tmp) / "jobs.sqlite")
        fill(store)
        store.close()
        conn = sqlite3.connect(Path(tmp) / "jobs.sqlite")
        lines = list(conn.iterdump())
        lines.insert(1, f"PRAGMA user_version = {SCHEMA_VERSION};")
        (out / f"jobstore_v{SCHEMA_VERSION}.sql").write_text("\n".join(lines) + "\n")
    if len(sys.argv) > 2:
        from dicom_ai.node.jobstore_postgres import PostgresJobStore
        store = PostgresJobStore(sys.argv[2])
        fill(store)
        store.close()
        dump = subprocess.run(["pg_dump", "--inserts", "--no-owner", "--no-privileges", sys.argv[2]],
                              capture_output=True, text=True, check=True).stdout
        (out / f"jobstore_v{SCHEMA_VERSION}_postgres.sql").write_text(dump)


if __name__ == "__main__":
    main()
