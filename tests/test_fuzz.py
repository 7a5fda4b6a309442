"""A representative sample of the fuzz run (tests/fuzz_node.py); ``make fuzz`` runs 1,200 cases.

``DICOM_AI_FUZZ_CASES`` sets the sample size (default 96: six of each mutation family, every
corrupt codec and the deflate bomb included).
"""

from __future__ import annotations

import os

from fuzz_node import run_fuzz


def test_mutated_c_stores_neither_crash_nor_lose_nor_leak(tmp_path):
    count = int(os.environ.get("DICOM_AI_FUZZ_CASES", "96"))
    report = run_fuzz(tmp_path, count, seed=int(os.environ.get("DICOM_AI_FUZZ_SEED", "13")))
    summary = {k: report.get(k) for k in ("cases", "crashes", "hangs", "worker_restarts", "accepted",
                                          "accepted_unrecorded", "accepted_unprocessed", "unprocessed_cases",
                                          "patient_data_leaks", "outcomes")}
    assert report["cases"] >= count, summary
    assert report["crashes"] == 0 and report["hangs"] == 0, summary
    assert report["worker_restarts"] == 0, summary
    assert report["settled"], summary
    assert report["accepted_unrecorded"] == 0 and report["accepted_unprocessed"] == 0, summary
    assert report["patient_data_leaks"] == 0, summary
    assert "valid-refused" not in report["outcomes"], summary
    # Bad input was refused, not waved through: every family but the controls saw failures.
    refused = {f for f, c in report["outcomes"].items() if any(k != "success" for k in c)}
    assert {"truncation", "uid", "geometry", "deflate"} <= refused, summary
    before, after = report["turnaround_before_s"], report["turnaround_after_s"]
    assert before is not None and after is not None, summary
    assert after <= max(3 * before, before + 10), summary
