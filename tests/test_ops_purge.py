"""Purge (``node.retention_days``) on a running node, as docs/operations.md describes it: a study
whose delivery is still pending keeps everything however long it waits; once nothing is pending
(delivered, or failed for good) and the study has been quiet for the retention time, its spool
files, results and rows go."""

from __future__ import annotations

import json
import os
import sqlite3
import time

import pytest

from node_harness import (free_port, start_node, start_storescp, store_status, storescu, wait_delivered, wait_for,
                          write_node_config, write_study)

pytestmark = pytest.mark.slow

RETENTION_SECONDS = 6.0


def test_finished_quiet_studies_are_purged_and_pending_ones_kept(tmp_path):
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    port, dead = free_port(), free_port()
    storage = tmp_path / "storage"
    cfg = write_node_config(tmp_path / "node.toml", storage, port, [("PACS", pacs_port)],
                            node={"retention_days": RETENTION_SECONDS / 86400},
                            retry={"max_attempts": 1000, "initial_delay_seconds": 1, "max_delay_seconds": 1},
                            destinations=[("ARCHIVE", dead)])
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        assert storescu(port, write_study(tmp_path / "study", seed=51)).returncode == 0
        status = wait_for(lambda: (lambda s: s if any(d["state"] == "done" for d in s["deliveries"]) else None)(
            store_status(storage)), 60, "the PACS delivery done")
        spool = [i["path"] for i in status["instances"]]
        outbox = [o["path"] for o in status["outbox"]]
        assert spool and outbox
        # ARCHIVE is down: its delivery stays pending, so the study is not finished and is kept
        # however long it waits.
        time.sleep(RETENTION_SECONDS * 2.5)
        kept = store_status(storage)
        assert len(kept["studies"]) == 1 and all(os.path.exists(p) for p in spool + outbox)
        assert not [line for line in (tmp_path / "node.log").read_text().splitlines() if '"study_purged"' in line]
    finally:
        node.stop()
    # ARCHIVE's delivery fails for good (as after retry.max_attempts) and ARCHIVE leaves the
    # configuration: nothing is pending now, and the retention clock runs from that failure.
    with sqlite3.connect(storage / "jobs.sqlite") as conn:
        conn.execute("UPDATE deliveries SET state = 'failed', updated = ? WHERE state = 'pending'", (time.time(),))
    cfg = write_node_config(tmp_path / "node2.toml", storage, port, [("PACS", pacs_port)],
                            node={"retention_days": RETENTION_SECONDS / 86400})
    node = start_node(cfg, port, tmp_path / "node2.log")
    try:
        purged = wait_for(lambda: [json.loads(line) for line in (tmp_path / "node2.log").read_text().splitlines()
                                   if '"study_purged"' in line], RETENTION_SECONDS * 4, "the study purged")
        assert purged[0]["files"] == len(spool) + len(outbox)
        empty = store_status(storage)
        assert all(not empty[t] for t in ("studies", "instances", "jobs", "deliveries", "outbox", "sent"))
        assert not any(os.path.exists(p) for p in spool + outbox)
        # A new study after the purge is processed as usual.
        assert storescu(port, write_study(tmp_path / "study2", seed=52)).returncode == 0
        wait_delivered(storage, jobs=1, timeout=60)
    finally:
        node.stop()
        pacs.stop()
