"""The worker dies with its node at any moment, its imports included (issue 24, fault 7).

The parent-death signal used to be set in the worker's ``main()``, after the imports of
``python -m dicom_ai.node.worker`` (the node package, torch, highdicom: about two seconds on a
busy host): a node SIGKILLed in that window left its worker running until the imports were
done. The import of ``dicom_ai.node`` in the worker is made to take 30 s here (a meta path
hook installed by a ``sitecustomize`` on the worker's PYTHONPATH, active only in a process
started with ``--parent-pid``), and the node is SIGKILLed while the worker is inside it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from node_harness import free_port, node_env, start_node, start_storescp, wait_for, write_node_config

pytestmark = pytest.mark.slow

_SLOW_IMPORT = '''
import os, sys, time

class _SlowNodeImport:
    """Makes the first import of dicom_ai.node in a worker (argv has --parent-pid) take a while."""

    def find_spec(self, name, path=None, target=None):
        if name == "dicom_ai.node" and "--parent-pid" in sys.argv:
            sys.meta_path.remove(self)
            with open(os.environ["DICOM_AI_TEST_IMPORT_MARKER"], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(float(os.environ["DICOM_AI_TEST_IMPORT_SECONDS"]))
        return None

sys.meta_path.insert(0, _SlowNodeImport())
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended; only its reaping is left


def test_a_node_killed_while_its_worker_imports_takes_the_worker_with_it(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SLOW_IMPORT)
    marker = tmp_path / "worker-importing"
    env = node_env(DICOM_AI_TEST_IMPORT_MARKER=str(marker), DICOM_AI_TEST_IMPORT_SECONDS="30")
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", pacs_port)])
    node = start_node(cfg, port, tmp_path / "node.out", env=env)
    try:
        wait_for(lambda: marker.exists() and marker.read_text(), 60, "the worker to reach its imports")
        worker = int(marker.read_text())
        assert _alive(worker)
        node.kill()
        started = time.monotonic()
        gone = wait_for(lambda: not _alive(worker), 5, "the worker to die with its node", interval=0.01)
        assert gone
        seconds = time.monotonic() - started
    finally:
        node.kill()
        pacs.stop()
        if marker.exists() and _alive(int(marker.read_text())):
            os.kill(int(marker.read_text()), 9)
    assert seconds < 1.0, seconds  # the kernel's parent-death signal, not the end of the imports (30 s)
