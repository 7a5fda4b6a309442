"""Past one machine: a receiving node, PostgreSQL, Redis and several Celery workers (issue 19).

Every server is real and started here on loopback: a throw-away PostgreSQL cluster
(``postgres_server``), redis-server without persistence, dcmtk's storescp as the PACS, the node
(``dicom-ai serve``) and two or more ``dicom-ai worker`` processes. The checks: every study is
processed once; a worker SIGKILLed mid-job has its job finished by another worker, with the
results at the PACS exactly once; PostgreSQL and Redis restarted mid-run lose nothing and the
system resumes by itself; a worker that does not see the node's storage refuses to start.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pydicom
import pytest

from node_harness import (PYTHON, REPO, Proc, Redis, delivered_uids, free_port, node_env, outbox_uids, start_node,
                          start_storescp, store_status, storescu, wait_delivered, wait_for, write_node_config,
                          write_study)

pytestmark = pytest.mark.slow


class Site:
    """One receiving node + PostgreSQL database + Redis + storescp PACS; workers started on demand."""

    def __init__(self, tmp_path, postgres_server, infer_seconds: float = 1.0, pipeline: dict | None = None,
                 workers: dict | None = None, pacs_extra: list[str] | None = None, http_port: int = 0):
        self.tmp = tmp_path
        self.pg = postgres_server
        self.url = postgres_server.new_database()
        self.redis = Redis(tmp_path / "redis")
        self.pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS", extra=pacs_extra)
        self.port = free_port()
        self.storage = tmp_path / "shared"
        self.cfg = write_node_config(
            tmp_path / "node.toml", self.storage, self.port, [("PACS", pacs_port)],
            jobstore={"url": self.url, "connect_timeout_seconds": 2.0},
            workers={"broker_url": self.redis.url, "lease_seconds": 2.0, "requeue_seconds": 3.0,
                     "visibility_timeout_seconds": 60.0, **(workers or {})},
            **({"pipeline": pipeline} if pipeline else {}))
        if http_port:
            self.cfg.write_text(self.cfg.read_text() + f"[http]\nport = {http_port}\n")
        self.env = node_env(DICOM_AI_TEST_INFER_SECONDS=str(infer_seconds))
        self.workers: dict[str, Proc] = {}
        self.node = start_node(self.cfg, self.port, tmp_path / "node.log", env=self.env)

    def start_worker(self, name: str, timeout: float = 120) -> Proc:
        log = self.tmp / f"worker-{name}.log"
        before = log.read_text().count('"worker_started"') if log.exists() else 0
        proc = Proc([PYTHON, "-m", "dicom_ai", "worker", "--config", str(self.cfg), "--name", name], log,
                    env=self.env, cwd=REPO)
        self.workers[name] = proc
        # Ready once a pool process has loaded the pipeline (and so Celery consumes).
        wait_for(lambda: log.read_text().count('"worker_started"') > before or not proc.alive(), timeout,
                 f"worker {name}")
        assert proc.alive(), log.read_text()[-3000:]
        return proc

    def kill_worker(self, name: str) -> None:
        """SIGKILL the whole worker (Celery's main process and its pool): a host that died."""
        proc = self.workers[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(10)

    def send(self, n: int, folder: str = "studies") -> list[str]:
        uids = []
        for i in range(n):
            files = write_study(self.tmp / folder / str(i), seed=i)
            sent = storescu(self.port, files)
            assert sent.returncode == 0 and sent.stderr.count("(Success)") == 4, sent.stderr
            uids.append(str(pydicom.dcmread(files[0]).StudyInstanceUID))
        return uids

    def status(self) -> dict:
        return store_status(self.storage, self.url)

    def wait_done(self, jobs: int, timeout: float = 120) -> dict:
        return wait_delivered(self.storage, jobs, timeout=timeout, url=self.url)

    def assert_exactly_once(self, study_uids: list[str], status: dict) -> None:
        """One done job per study; the PACS holds each job's outbox, each object received once."""
        done = [j for j in status["jobs"] if j["state"] == "done"]
        assert len(done) == len(study_uids), status["jobs"]
        by_study = {s["id"]: s["study_uid"] for s in status["studies"]}
        assert sorted(by_study[j["study_id"]] for j in done) == sorted(study_uids)
        total = 0
        for job in done:
            expected = outbox_uids(status, job["id"])
            assert len(expected) >= 2
            assert delivered_uids(self.tmp / "pacs", by_study[job["study_id"]]) == expected
            total += len(expected)
        log = "".join(p.read_text() for p in self.tmp.glob("storescp-PACS-*.log"))
        assert log.count("storing DICOM file") == total, "a result object reached the PACS twice"
        assert all(d["state"] == "done" for d in status["deliveries"])

    def close(self) -> None:
        for proc in self.workers.values():
            if proc.alive():
                proc.stop(timeout=20)
        self.node.stop()
        self.pacs.stop()
        self.redis.stop()


@pytest.fixture
def site_factory(tmp_path, postgres_server):
    sites = []

    def make(**kw) -> Site:
        sites.append(Site(tmp_path, postgres_server, **kw))
        return sites[-1]

    yield make
    for site in sites:
        site.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "dicom_ai", *args], capture_output=True, text=True, timeout=60,
                          env=node_env(), cwd=REPO)


def test_two_workers_share_the_studies_and_a_killed_workers_job_finishes_on_the_other(site_factory):
    # Workers deliver too: three delivery processes on one job store, still exactly once.
    site = site_factory(infer_seconds=3.0, workers={"deliver_on_workers": True})
    site.start_worker("w1")
    site.start_worker("w2")
    studies = site.send(4)
    running = wait_for(lambda: [j for j in site.status()["jobs"] if j["state"] == "running" and j["worker"]],
                       60, "a running job")
    victim_job = running[0]
    victim = victim_job["worker"].split("@")[0]
    survivor = "w2" if victim == "w1" else "w1"
    site.kill_worker(victim)
    status = site.wait_done(jobs=4, timeout=120)
    site.assert_exactly_once(studies, status)
    job = next(j for j in status["jobs"] if j["id"] == victim_job["id"])
    assert job["worker"].startswith(f"{survivor}@"), job  # finished on the other worker
    assert (job["attempts"], job["interruptions"], job["failures"]) == (2, 1, 0)
    started = [json.loads(line) for line in (site.tmp / f"worker-{victim}.log").read_text().splitlines()
               if '"job_started"' in line]
    assert victim_job["id"] in {e["job_id"] for e in started}  # it was running there when killed
    node_log = (site.storage / "logs" / "node.log").read_text()
    assert '"jobs_reclaimed"' in node_log
    shown = _cli("status", "--config", str(site.cfg))
    assert f"by {survivor}@" in shown.stdout and "WORKERS" in shown.stdout, shown.stdout
    assert "Secret" not in shown.stdout

    # Now only the pool process running a job dies (the OOM killer's way): Celery's main process
    # stays, requeues the message (task_reject_on_worker_lost) and starts a new pool process.
    site.start_worker(victim)
    more = site.send(2, "more")
    running = wait_for(lambda: [j for j in site.status()["jobs"] if j["state"] == "running" and j["worker"]],
                       60, "a running job")
    pool_pid = int(running[0]["worker"].rsplit(" ", 1)[-1])
    os.kill(pool_pid, signal.SIGKILL)
    status = site.wait_done(jobs=6, timeout=120)
    site.assert_exactly_once(studies + more, status)
    job = next(j for j in status["jobs"] if j["id"] == running[0]["id"])
    assert job["interruptions"] == 1 and job["state"] == "done"
    assert all(p.alive() for name, p in site.workers.items())  # the Celery main processes lived on


def test_restarting_postgresql_and_redis_mid_run_loses_nothing(site_factory):
    site = site_factory(infer_seconds=2.0)
    site.start_worker("w1")
    site.start_worker("w2")
    first = site.send(3, "before")
    wait_for(lambda: any(j["state"] == "running" for j in site.status()["jobs"]), 60, "a running job")
    site.pg.stop("immediate")  # every connection of node and workers breaks mid-job
    during = write_study(site.tmp / "during", seed=99)
    refused = storescu(site.port, during)  # nothing can be recorded: no Success for any image
    assert "(Success)" not in refused.stderr and "OutOfResources" in refused.stderr, refused.stderr
    site.pg.start()
    site.redis.restart(down_seconds=1.0)  # and every queued message is gone (no persistence)
    resent = storescu(site.port, during)  # what the modality does after a refusal
    assert resent.returncode == 0 and resent.stderr.count("(Success)") == 4, resent.stderr
    second = site.send(2, "after")
    status = site.wait_done(jobs=6, timeout=150)
    site.assert_exactly_once(first + [str(pydicom.dcmread(during[0]).StudyInstanceUID)] + second, status)
    assert all(p.alive() for p in site.workers.values()) and site.node.alive()
    logs = (site.storage / "logs" / "node.log").read_text()
    announced = [json.loads(line)["job_id"] for line in logs.splitlines() if '"job_announced"' in line]
    assert len(announced) >= len(set(announced)) >= 5


def test_the_shipped_models_run_on_a_celery_worker(site_factory, tmp_path):
    from dicom_ai.data.phantom import generate_study
    from dicom_ai.data.phantom_folder import write_study as write_phantom

    # Operating point "phantom" switches every finding on, so every model runs (at the default
    # point microcalc's maps are off and the pipeline does not run it).
    site = site_factory(infer_seconds=0.0, pipeline={"factory": "", "models": ["glam", "dunet", "microcalc"],
                                                     "device": "cpu", "operating_point": "phantom"})
    site.start_worker("gpu0", timeout=180)
    write_phantom(generate_study(5, shape=(208, 160)), tmp_path / "phantom", transfer_syntax="explicit")
    files = sorted((tmp_path / "phantom").glob("*.dcm"))
    sent = storescu(site.port, files)
    assert sent.returncode == 0, sent.stderr
    status = site.wait_done(jobs=1, timeout=300)
    site.assert_exactly_once([str(pydicom.dcmread(files[0]).StudyInstanceUID)], status)
    models = json.loads(status["jobs"][0]["model_seconds"])
    assert set(models) == {"glam", "dunet", "microcalc"}
    assert status["jobs"][0]["worker"].startswith("gpu0@")
    versions = json.loads(status["jobs"][0]["models"])  # which model versions made the results
    assert set(versions) == {"glam", "dunet", "microcalc"} and all(v.endswith("@phantom") for v in versions.values())


def test_a_worker_that_does_not_see_the_nodes_storage_refuses_to_start(tmp_path, postgres_server):
    from dicom_ai.node.jobstore_postgres import PostgresJobStore

    url = postgres_server.new_database()
    store = PostgresJobStore(url)
    store.bind_storage("0123456789abcdef")  # what the node recorded for its storage
    store.close()
    redis = f"redis://127.0.0.1:{free_port()}/0"  # never reached: the check comes first

    def worker(storage) -> subprocess.CompletedProcess:
        cfg = write_node_config(tmp_path / "w.toml", storage, free_port(), [], jobstore={"url": url},
                                workers={"broker_url": redis})
        return _cli("worker", "--config", str(cfg))

    empty = worker(tmp_path / "not-mounted")
    assert empty.returncode == 2 and "storage-id does not exist" in empty.stderr, empty.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "storage-id").write_text("fedcba9876543210\n")
    wrong = worker(other)
    assert wrong.returncode == 2 and "holds storage id fedcba9876543210" in wrong.stderr, wrong.stderr


def test_a_node_refuses_a_job_store_bound_to_another_storage(tmp_path, postgres_server):
    from dicom_ai.node.jobstore_postgres import PostgresJobStore

    url = postgres_server.new_database()
    store = PostgresJobStore(url)
    store.bind_storage("0123456789abcdef")
    store.close()
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", 104)],
                            jobstore={"url": url})
    serve = subprocess.run([PYTHON, "-m", "dicom_ai", "serve", "--config", str(cfg)], capture_output=True,
                           text=True, timeout=60, env=node_env(), cwd=REPO)
    assert serve.returncode == 2 and "belongs to the storage with id 0123456789abcdef" in serve.stderr, serve.stderr


def test_a_worker_whose_models_cannot_load_says_so_and_its_jobs_wait(site_factory):
    site = site_factory(pipeline={"factory": "node_harness:no_such_pipeline"})
    log = site.tmp / "worker-broken.log"
    site.workers["broken"] = Proc([PYTHON, "-m", "dicom_ai", "worker", "--config", str(site.cfg), "--name", "broken"],
                                  log, env=site.env, cwd=REPO)
    (study,) = site.send(1)

    def notice():
        return [n for n in site.status()["notices"] if n["key"].startswith("worker broken@")]

    (shown,) = wait_for(notice, 60, "the worker's notice")
    assert "cannot be loaded" in shown["message"] and "no_such_pipeline" in shown["message"]
    assert [j["state"] for j in site.status()["jobs"]] == ["queued"]  # not failed: a fixed worker runs it
    status = _cli("status", "--config", str(site.cfg))
    assert status.returncode == 1 and "PROBLEM (worker broken@" in status.stdout, status.stdout


def _get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(text: str, name: str, worker: str) -> float | None:
    import re
    m = re.search(rf'^{name}\{{worker="{re.escape(worker)}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_a_killed_worker_shows_as_lost_and_readyz_fails_while_jobs_wait(site_factory):
    """Heartbeats: each worker's last heartbeat, current job and alive/lost in status, the status
    page and /metrics; a SIGKILLed worker is lost within workers.lease_seconds (2 s here); /readyz
    turns 503 with its reason only once no worker is alive and a job waits."""
    import socket
    http = free_port()
    site = site_factory(infer_seconds=4.0, http_port=http)
    host = socket.gethostname()
    site.start_worker("w1")
    site.start_worker("w2")
    site.send(1)
    (running,) = wait_for(lambda: [j for j in site.status()["jobs"] if j["state"] == "running" and j["worker"]],
                          60, "a running job")
    victim = running["worker"].split(" pid ")[0]  # name@host
    survivor = f"w2@{host}" if victim.startswith("w1@") else f"w1@{host}"
    metrics = _get(http, "/metrics")[1]
    assert _metric(metrics, "dicom_ai_worker_current_job", victim) == running["id"]
    assert _metric(metrics, "dicom_ai_worker_alive", victim) == 1 and _metric(metrics, "dicom_ai_worker_alive",
                                                                             survivor) == 1
    shown = _cli("status", "--config", str(site.cfg)).stdout
    assert any(victim in line and "ALIVE" in line and f"job {running['id']}" in line for line in shown.splitlines())

    site.kill_worker(victim.split("@")[0])
    killed = time.monotonic()
    wait_for(lambda: _metric(_get(http, "/metrics")[1], "dicom_ai_worker_alive", victim) == 0, 10,
             "the killed worker lost in /metrics")
    lost_after = time.monotonic() - killed
    print(f"\nworker lost in /metrics {lost_after:.2f} s after SIGKILL (workers.lease_seconds = 2)")
    assert lost_after <= 2.0 + 1.5, lost_after  # the lease, plus one scrape's slack
    shown = _cli("status", "--config", str(site.cfg)).stdout
    assert any(victim in line and "LOST" in line for line in shown.splitlines()), shown
    assert any(survivor in line and "ALIVE" in line for line in shown.splitlines()), shown
    page = _get(http, "/")[1]
    assert "Workers (lost after 2 s" in page and victim in page and ">lost<" in page and ">alive<" in page
    assert re.search(r"\d\d:\d\d:\d\d [+-]\d{4}", page)  # times carry their UTC offset
    assert "<th>worker</th>" in page  # the jobs table names each job's worker
    # The survivor is alive: nothing waits for long, so /readyz stays ready.
    site.wait_done(jobs=1, timeout=60)
    assert _get(http, "/readyz")[0] == 200

    # Now every worker is dead and a study arrives: not ready, and it says why.
    site.kill_worker(survivor.split("@")[0])
    wait_for(lambda: _metric(_get(http, "/metrics")[1], "dicom_ai_worker_alive", survivor) == 0, 10,
             "the second worker lost")
    assert _get(http, "/readyz")[0] == 200  # no job waits yet
    site.send(1, "later")
    code, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(_get(http, "/readyz")), 30,
                          "/readyz 503 with a job waiting")
    checks = json.loads(body)
    assert checks["worker_alive"] is False and checks["scp_accepting"] is True
    assert "no live worker" in checks["reasons"]["worker_alive"] and "1 job(s) waiting" in checks["reasons"]["worker_alive"]
    assert "NOT READY (worker_alive)" in _get(http, "/")[1]
    # A worker back: ready again, the job runs.
    site.start_worker("w3")
    wait_for(lambda: _get(http, "/readyz")[0] == 200, 30, "/readyz 200 with a live worker")
    site.wait_done(jobs=2, timeout=60)
    site.workers["w3"].stop(timeout=20)
    # The worker's output (stdout and stderr together here) is JSON lines only: no Celery banner, no
    # shutdown message outside JSON, and Celery's warnings keep their text.
    for name in ("w1", "w2", "w3"):
        lines = [line for line in (site.tmp / f"worker-{name}.log").read_text().splitlines() if line.strip()]
        assert lines and all(line.startswith("{") for line in lines), [l for l in lines if not l.startswith("{")][:5]
        for e in map(json.loads, lines):
            if e["event"] == "warning" and e["module"].startswith("celery"):
                assert e.get("message"), e


def test_a_missing_database_password_is_one_line_naming_the_setting(tmp_path, postgres_server):
    """A worker (and the node) whose PostgreSQL login needs a password it does not have: exit 2,
    one line naming jobstore.url and where the password goes, no traceback, no pool retry noise."""
    import psycopg
    role = f"needpw{os.getpid()}"
    with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'secret-pw'")
        conn.execute(f"CREATE DATABASE {role} OWNER {role}")
    hba = postgres_server.data / "pg_hba.conf"
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    postgres_server._run("pg_ctl", "-D", str(postgres_server.data), "reload")
    time.sleep(1)
    storage = tmp_path / "shared"
    cfg = write_node_config(tmp_path / "node.toml", storage, free_port(), [("PACS", 104)],
                            jobstore={"url": f"postgresql://{role}@127.0.0.1:{postgres_server.port}/{role}",
                                      "connect_timeout_seconds": 2.0},
                            workers={"broker_url": "redis://127.0.0.1:1/0"})
    env = node_env(PGPASSFILE=str(tmp_path / "no-such-pgpass"))
    for command in (["worker", "--config", str(cfg), "--name", "w1"], ["serve", "--config", str(cfg)]):
        r = subprocess.run([PYTHON, "-m", "dicom_ai", *command], capture_output=True, text=True, timeout=120,
                           env=env, cwd=REPO)
        out = r.stdout + r.stderr
        assert r.returncode == 2, out
        assert "Traceback" not in out and "error connecting in" not in out, out
        plain = [line for line in out.splitlines() if line.strip() and not line.startswith("{")]
        assert len(plain) == 1 and "jobstore.url" in plain[0] and "password" in plain[0], out
        assert "PGPASSFILE" in plain[0] and "secret-pw" not in out
        errors = [json.loads(line) for line in out.splitlines() if line.startswith("{")
                  and json.loads(line)["level"] == "ERROR"]
        assert len(errors) == 1 and "jobstore.url" in errors[0]["error"], out
