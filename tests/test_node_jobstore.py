"""The job store's rules: study completion, late instances, claims, supersession, retries.

Every test taking ``store`` runs against both engines: the embedded SQLite file and a fresh
database on a throw-away PostgreSQL server (``postgres_server`` in conftest.py).
"""

from __future__ import annotations

import json
import time

import pytest

from dicom_ai.node.jobstore import Instance, JobStore

VIEWS = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = JobStore(tmp_path / "jobs.sqlite")
    else:
        from dicom_ai.node.jobstore_postgres import PostgresJobStore

        s = PostgresJobStore(request.getfixturevalue("postgres_server").new_database())
    yield s
    s.close()


def _receive(store, study, views, t, caller="PACS", prefix="1.2.3"):
    for i, (lat, view) in enumerate(views):
        uid = f"{prefix}.{study}.{lat}{view}.{i}"
        store.record_instance(study_uid=study, calling_ae=caller, size=10, now=t,
                              instance=Instance(uid, "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.1.2.1", lat, view,
                                                f"/spool/{uid}.dcm"))


def _uids(uids):
    return json.dumps({"sources": uids})


def test_four_views_wait_for_the_grace_period_others_for_the_idle_time(store):
    _receive(store, "S4", VIEWS, t=100.0)
    _receive(store, "S3", VIEWS[:3], t=100.0)
    assert store.close_ready_studies(2.0, 10.0, _uids, now=101.0) == []
    assert len(store.close_ready_studies(2.0, 10.0, _uids, now=102.5)) == 1  # four views + grace
    assert len(store.close_ready_studies(2.0, 10.0, _uids, now=110.5)) == 1  # three views after idle
    assert store.close_ready_studies(2.0, 10.0, _uids, now=500.0) == []
    jobs = store.status()["jobs"]
    assert sorted(j["study_uid"] for j in jobs) == ["S3", "S4"]


def test_same_study_from_two_callers_is_two_studies(store):
    _receive(store, "S", VIEWS[:2], t=0.0, caller="PACS_A", prefix="1.1")
    _receive(store, "S", VIEWS[:2], t=0.0, caller="PACS_B", prefix="1.2")
    assert len(store.close_ready_studies(1.0, 5.0, _uids, now=10.0)) == 2


def test_repeated_sop_instance_uid_is_not_recorded_twice(store):
    _receive(store, "S", VIEWS, t=0.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    _receive(store, "S", VIEWS, t=20.0)  # the PACS sends the same images again
    assert store.close_ready_studies(1.0, 5.0, _uids, now=100.0) == []  # no new work
    assert store.status()["studies"][0]["instances"] == 4


def test_late_instance_cancels_an_unstarted_job_and_the_new_job_covers_everything(store):
    _receive(store, "S", VIEWS[:3], t=0.0)
    first = store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    _receive(store, "S", VIEWS[3:], t=11.0)
    second = store.close_ready_studies(1.0, 5.0, _uids, now=13.0)
    states = {j["id"]: j["state"] for j in store.status()["jobs"]}
    assert states == {first[0]: "cancelled", second[0]: "queued"}
    job = store.claim_job()
    assert job.id == second[0] and len(job.instances) == 4


def test_late_instance_after_processing_supersedes_pending_results(store):
    _receive(store, "S", VIEWS[:3], t=0.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    job1 = store.claim_job()
    assert store.complete_job(job1, [("9.1", "1.2.840.10008.5.1.4.1.1.66.4", "/o/9.1.dcm")],
                              [("PACS", "h", 104)]) == "done"
    _receive(store, "S", VIEWS[3:], t=20.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=30.0)
    deliveries = store.status()["deliveries"]
    assert [d["state"] for d in deliveries] == ["superseded"]  # the old results are not sent
    job2 = store.claim_job()
    assert len(job2.instances) == 4 and job2.result_uids != "" and job2.id != job1.id


def test_a_job_finishing_after_a_newer_one_exists_is_superseded(store):
    _receive(store, "S", VIEWS[:3], t=0.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    running = store.claim_job()
    _receive(store, "S", VIEWS[3:], t=11.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=20.0)
    assert store.complete_job(running, [("9.1", "x", "/o/9.1.dcm")], [("PACS", "h", 104)]) == "superseded"
    assert store.status()["deliveries"] == []


def test_claims_recovery_and_failure_limits(store):
    _receive(store, "S", VIEWS, t=0.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    job = store.claim_job()
    assert store.claim_job() is None  # one job, already claimed
    assert store.recover()["jobs_requeued"] == 1  # the node restarted: an interruption, not a failure
    again = store.claim_job()
    assert again.id == job.id and again.attempts == 2
    assert store.complete_job(job, [], []) == "stale"  # the first claim is void
    assert store.fail_job(again, "boom", max_attempts=2) == "queued"
    third = store.claim_job()
    assert store.fail_job(third, "boom", max_attempts=2) == "failed"  # two failures of the job itself
    (row,) = store.status()["jobs"]
    assert (row["attempts"], row["failures"], row["interruptions"]) == (3, 2, 1)
    assert store.retry_failed() == {"deliveries": 0, "jobs": 1}


def test_interruptions_are_not_failures_but_have_their_own_limit(store):
    _receive(store, "S", VIEWS, t=0.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    for _ in range(4):  # more restarts than pipeline.max_job_attempts (3)
        store.claim_job()
        assert store.recover(max_interruptions=5) == {"jobs_requeued": 1, "jobs_failed": 0, "deliveries_pending": 0}
    store.claim_job()
    assert store.recover(max_interruptions=5)["jobs_failed"] == 1  # a study that kills its worker every time
    (row,) = store.status()["jobs"]
    assert row["state"] == "failed" and row["interruptions"] == 5 and row["failures"] == 0
    assert "stopped during processing 5 times" in row["error"]


def test_a_claimed_job_released_for_lack_of_space_is_not_counted(store):
    _receive(store, "S", VIEWS, t=0.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    job = store.claim_job()
    assert store.release_job(job, "disk full") == "queued"
    assert store.release_job(job, "disk full") == "stale"
    (row,) = store.status()["jobs"]
    assert (row["state"], row["failures"], row["interruptions"]) == ("queued", 0, 0)


def test_sending_rows_mark_objects_in_doubt_until_acknowledged(store):
    _receive(store, "S", VIEWS, t=0.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    store.complete_job(store.claim_job(), [("9.1", "c", "/o/1.dcm"), ("9.2", "c", "/o/2.dcm")], [("PACS", "h", 104)])
    (d,) = store.due_deliveries()
    assert d.in_doubt == frozenset()
    store.mark_sending(d.id, "9.1")
    store.mark_sending(d.id, "9.2")
    store.clear_sending(d.id, "9.2")  # the destination answered a failure status: not stored
    (d,) = store.due_deliveries()
    assert d.in_doubt == {"9.1"} and len(d.pending) == 2
    store.mark_sent(d.id, "9.1")
    (d,) = store.due_deliveries()
    assert d.in_doubt == frozenset() and [p[0] for p in d.pending] == ["9.2"]
    assert store.status()["deliveries"][0]["in_doubt"] == 0


def test_a_database_of_the_first_schema_is_migrated(tmp_path):
    import sqlite3

    from dicom_ai.node.jobstore import SCHEMA_VERSION

    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE studies (id INTEGER PRIMARY KEY, study_uid TEXT NOT NULL, calling_ae TEXT NOT NULL,
            state TEXT NOT NULL, last_received REAL NOT NULL, UNIQUE (study_uid, calling_ae));
        CREATE TABLE jobs (id INTEGER PRIMARY KEY, study_id INTEGER NOT NULL REFERENCES studies(id),
            state TEXT NOT NULL, instance_uids TEXT NOT NULL, result_uids TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, claim_token TEXT, error TEXT, created REAL NOT NULL,
            updated REAL NOT NULL);
        INSERT INTO studies VALUES (1, 'S', 'PACS', 'closed', 0);
        INSERT INTO jobs VALUES (1, 1, 'running', '[]', '{}', 3, 'x', NULL, 0, 0);
    """)
    old.close()
    store = JobStore(path)
    assert store._conn().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.recover()["jobs_requeued"] == 1  # three claims before the upgrade: not failures
    (row,) = store.status()["jobs"]
    assert (row["state"], row["failures"], row["interruptions"]) == ("queued", 0, 1)
    JobStore(path)  # a current database is opened without writing


def test_delivery_retries_back_off_then_fail_and_retry_requeues(store):
    _receive(store, "S", VIEWS, t=0.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    job = store.claim_job()
    store.complete_job(job, [("9.1", "c", "/o/1.dcm"), ("9.2", "c", "/o/2.dcm")], [("PACS", "h", 104)])
    (d,) = store.due_deliveries()
    store.mark_sent(d.id, "9.1")
    (d,) = store.due_deliveries()
    assert [p[0] for p in d.pending] == ["9.2"]  # only the unacknowledged object is resent
    assert store.delivery_attempt_failed(d.id, "down", 2, lambda n: 3600.0) == "pending"
    assert store.due_deliveries() == []  # backing off
    assert store.delivery_attempt_failed(d.id, "down", 2, lambda n: 3600.0) == "failed"
    assert store.retry_failed()["deliveries"] == 1
    (d,) = store.due_deliveries()
    store.mark_sent(d.id, "9.2")
    store.delivery_done(d.id)
    assert store.status()["deliveries"][0]["state"] == "done"


def test_only_finished_quiet_studies_are_purged(store):
    _receive(store, "DONE", VIEWS, t=0.0)
    _receive(store, "PENDING", VIEWS, t=0.0, prefix="1.9")
    _receive(store, "RECENT", VIEWS, t=time.time() + 100, prefix="1.8")
    store.close_ready_studies(1.0, 5.0, _uids, now=time.time() + 200)
    for _ in range(3):
        job = store.claim_job()
        store.complete_job(job, [(f"9.{job.id}", "c", f"/o/{job.id}.dcm")], [("PACS", "h", 104)])
    for d in store.due_deliveries():
        if d.job_id != 2:  # the PENDING study's results are not delivered yet
            store.mark_sent(d.id, d.pending[0][0])
            store.delivery_done(d.id)
    assert store.purge_finished(older_than=500.0) == []  # just processed and delivered: not quiet
    purged = store.purge_finished(older_than=time.time() + 1)
    assert len(purged) == 1
    study_id, jobs, paths = purged[0]
    assert jobs == ["1"] and "/o/1.dcm" in paths and len(paths) == 5
    assert sorted(s["study_uid"] for s in store.status()["studies"]) == ["PENDING", "RECENT"]
    assert store.find_instance("1.2.3.DONE.LCC.0") is None


def test_recovery_at_node_start_requeues_without_counting_an_interruption(store):
    _receive(store, "S", VIEWS, t=0.0)
    store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    for _ in range(3):  # node restarts during the job, more than max_interruptions
        store.claim_job()
        assert store.recover(max_interruptions=1, count_interruption=False)["jobs_failed"] == 0
    (row,) = store.status()["jobs"]
    assert (row["state"], row["interruptions"]) == ("queued", 0)


# -- scale-out: leases, broker announcements, concurrent claims, storage identity ------------

def _one_queued(store, study="S"):
    _receive(store, study, VIEWS, t=0.0, prefix="1.7")
    (job_id,) = store.close_ready_studies(1.0, 5.0, _uids, now=10.0)
    return job_id


def test_a_claim_names_its_worker_and_a_repeated_message_claims_nothing(store):
    job_id = _one_queued(store)
    job = store.claim_job(job_id, worker="w1@host pid 1")
    assert job.id == job_id
    assert store.claim_job(job_id, worker="w2@host pid 2") is None  # the same broker message again
    assert store.complete_job(job, [("9.1", "c", "/o/1.dcm")], [("PACS", "h", 104)]) == "done"
    assert store.claim_job(job_id, worker="w2@host pid 2") is None  # redelivered after the job finished
    (row,) = store.status()["jobs"]
    assert (row["state"], row["worker"], row["attempts"]) == ("done", "w1@host pid 1", 1)


def test_an_expired_lease_requeues_the_job_and_voids_the_dead_workers_claim(store):
    job_id = _one_queued(store)
    dead = store.claim_job(job_id, worker="w1")
    assert store.heartbeat(dead)
    assert store.reclaim_expired(60.0) == {"jobs_requeued": 0, "jobs_failed": 0}  # lease fresh
    assert store.reclaim_expired(60.0, now=time.time() + 61) == {"jobs_requeued": 1, "jobs_failed": 0}
    assert not store.heartbeat(dead)  # the claim is gone
    alive = store.claim_job(job_id, worker="w2")
    assert store.complete_job(dead, [("9.1", "c", "/o/1.dcm")], [("PACS", "h", 104)]) == "stale"
    assert store.complete_job(alive, [("9.1", "c", "/o/1.dcm")], [("PACS", "h", 104)]) == "done"
    (row,) = store.status()["jobs"]
    assert (row["worker"], row["attempts"], row["interruptions"], row["failures"]) == ("w2", 2, 1, 0)
    assert len(store.status()["deliveries"]) == 1


def test_a_lease_expiring_too_often_fails_the_job(store):
    job_id = _one_queued(store)
    for _ in range(2):
        store.claim_job(job_id)
        store.reclaim_expired(1.0, max_interruptions=3, now=time.time() + 5)
    store.claim_job(job_id)
    assert store.reclaim_expired(1.0, max_interruptions=3, now=time.time() + 5)["jobs_failed"] == 1


def test_queued_jobs_are_announced_again_only_while_unclaimed(store):
    job_id = _one_queued(store)
    assert store.jobs_to_enqueue(30.0) == [job_id]  # never announced
    store.mark_enqueued([job_id], now=1000.0)
    assert store.jobs_to_enqueue(30.0, now=1010.0) == []
    assert store.jobs_to_enqueue(30.0, now=1031.0) == [job_id]  # the message was lost: again
    job = store.claim_job(job_id)
    assert store.jobs_to_enqueue(30.0, now=5000.0) == []
    store.fail_job(job, "boom", max_attempts=3)  # back in the queue: announced at once
    assert store.jobs_to_enqueue(30.0, now=5000.0) == [job_id]


def test_concurrent_claims_take_each_job_once(store):
    import threading

    jobs = {_one_queued(store, f"S{i}") for i in range(12)}
    taken: list[int] = []
    lock = threading.Lock()

    def claim_all():
        while (job := store.claim_job(worker=threading.current_thread().name)) is not None:
            with lock:
                taken.append(job.id)

    threads = [threading.Thread(target=claim_all, name=f"w{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == sorted(jobs)


def test_a_delivery_is_leased_to_one_process_at_a_time(store):
    job_id = _one_queued(store)
    store.complete_job(store.claim_job(job_id), [("9.1", "c", "/o/1.dcm")], [("PACS", "h", 104)])
    (d,) = store.due_deliveries()
    assert store.claim_delivery(d.id, "node", 60.0).pending == [("9.1", "c", "/o/1.dcm")]
    assert store.claim_delivery(d.id, "worker", 60.0) is None  # held by the node
    assert store.due_deliveries() == []  # nobody else sees it while leased
    assert store.claim_delivery(d.id, "node", 60.0) is not None  # the holder may renew
    store.mark_sending(d.id, "9.1", 60.0)
    store.mark_sent(d.id, "9.1")
    store.delivery_done(d.id)
    assert store.claim_delivery(d.id, "worker", 60.0) is None  # done: nothing to lease


def test_an_expired_delivery_lease_is_taken_over_with_its_object_in_doubt(store):
    job_id = _one_queued(store)
    store.complete_job(store.claim_job(job_id), [("9.1", "c", "/o/1.dcm")], [("PACS", "h", 104)])
    (d,) = store.due_deliveries()
    store.claim_delivery(d.id, "dead", 0.2)
    store.mark_sending(d.id, "9.1", 0.2)  # then the process died
    time.sleep(0.3)
    taken = store.claim_delivery(d.id, "next", 60.0)
    assert taken is not None and taken.in_doubt == {"9.1"}


def test_the_store_is_bound_to_one_storage(store):
    from dicom_ai.core.errors import StorageIdentityError

    assert store.storage_id() is None
    store.bind_storage("aaaa")
    store.bind_storage("aaaa")  # the same node again
    assert store.storage_id() == "aaaa"
    with pytest.raises(StorageIdentityError, match="belongs to the storage with id aaaa"):
        store.bind_storage("bbbb")
    store.register_worker("w1@h", "h", 7, "aaaa")
    assert [w["name"] for w in store.status()["workers"]] == ["w1@h"]


def test_a_store_newer_than_this_version_is_refused(tmp_path, postgres_server):
    import sqlite3

    from dicom_ai.core.errors import JobStoreError
    from dicom_ai.node.jobstore import SCHEMA_VERSION
    from dicom_ai.node.jobstore_postgres import PostgresJobStore

    path = tmp_path / "new.sqlite"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(JobStoreError, match="newer than this"):
        JobStore(path)
    url = postgres_server.new_database()
    PostgresJobStore(url).close()
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(JobStoreError, match="newer than this"):
        PostgresJobStore(url)


def test_postgresql_migrates_once_when_node_and_workers_start_together(postgres_server):
    import threading

    from dicom_ai.node.jobstore import SCHEMA_VERSION
    from dicom_ai.node.jobstore_postgres import PostgresJobStore

    url = postgres_server.new_database()
    opened, errors = [], []

    def open_one():
        try:
            opened.append(PostgresJobStore(url, pool_size=1))
        except Exception as exc:  # pragma: no cover - the failure this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(opened) == 4
    assert opened[0].schema_version() == SCHEMA_VERSION
    for s in opened:
        s.close()


def test_an_idle_worker_looks_for_queued_jobs_without_the_write_lock(tmp_path):
    """job_waiting is a read: it answers while another connection holds the write lock (the
    receiving node recording an image), and says whether claim_job would find a job."""
    import sqlite3

    from dicom_ai.node.jobstore import Instance, JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    assert not store.job_waiting()
    store.record_instance(study_uid="1.2.3", calling_ae="PACS", size=1, instance=Instance(
        "1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.1.2.1", "L", "CC", str(tmp_path / "x.dcm")))
    assert store.close_ready_studies(0.0, 0.0, lambda uids: "{}", now=1e12)
    writer = sqlite3.connect(tmp_path / "jobs.sqlite", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        assert store.job_waiting()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert store.claim_job() is not None
    assert not store.job_waiting()
