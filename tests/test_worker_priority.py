"""Inference runs at a lower CPU priority than reception (issue 28): on shared cores a busy
worker must not slow the C-STOREs a modality waits on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_ai.node.config import ConfigError, load_config
from node_harness import free_port, log_events, start_node, wait_for, write_node_config


def _niceness(pid: int) -> int:
    # /proc/<pid>/stat: field 19 is the nice value; split after the ')' closing the command name
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def _thread_niceness(pid: int) -> set[int]:
    """The niceness of every thread of ``pid`` (Linux keeps one per thread)."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out.add(int(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[16]))
        except (OSError, IndexError):
            continue
    return out


def _worker_pid(log: Path) -> int | None:
    spawned = log_events(log, "worker_spawned")
    return int(spawned[0]["worker_pid"]) if spawned else None


@pytest.mark.parametrize("value", [-1, 20, 2.5, "10", True])
def test_a_niceness_outside_0_to_19_is_refused_naming_the_key(tmp_path, value):
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", free_port(), [])
    with pytest.raises(ConfigError, match=r"workers\.nice"):
        load_config(cfg, overrides={"workers.nice": value})


def test_the_local_worker_runs_below_the_receiving_node(tmp_path):
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", free_port())],
                           workers={"nice": 7})
    log = tmp_path / "node.log"
    node = start_node(cfg, port, log)
    try:
        wait_for(lambda: _worker_pid(log) is not None, 30, "worker_spawned in the node log")
        worker = _worker_pid(log)
        wait_for(lambda: Path(f"/proc/{worker}").exists() and _niceness(worker) == 7, 30, "the worker at nice 7")
        wait_for(lambda: log_events(log, "worker_priority"), 30, "worker_priority in the log")
        # Every thread, including those numpy's and ONNX Runtime's imports started before it lowered itself.
        threads = _thread_niceness(worker)
        assert threads == {7}, threads
        assert _niceness(node.popen.pid) == os.getpriority(os.PRIO_PROCESS, 0)  # the receiver keeps ours
    finally:
        node.stop()
