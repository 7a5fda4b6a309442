"""Orthanc as the PACS: it sends a study to the node and gets the results back into the same study."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from node_harness import (Orthanc, free_port, outbox_uids, start_node, store_status, wait_delivered, wait_for,
                          write_node_config, write_study)

pytestmark = pytest.mark.slow


def test_orthanc_sends_a_study_and_finds_the_results_in_it(tmp_path):
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=port)
    node = None
    try:
        # Results JPEG 2000 compressed, with a Mammography CAD SR: what a site may configure.
        cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("ORTHANC", orthanc.dicom)],
                                results={"compression": "jpeg2000", "cad_sr": True},
                                node={"retention_days": 3.0 / 86400})  # forget it 3 s after delivery
        node = start_node(cfg, port, tmp_path / "node.log")
        assert orthanc.post("/modalities/ainode/echo", {}) == {}

        files = write_study(tmp_path / "study", seed=3)
        study_ids = set()
        for path in files:  # JPEG 2000, as many archives keep mammograms
            ds = pydicom.dcmread(path)
            ds.compress(JPEG2000Lossless)
            ds.save_as(path, enforce_file_format=True)
            study_ids.add(orthanc.post("/instances", path.read_bytes())["ParentStudy"])
        assert len(study_ids) == 1
        study = study_ids.pop()

        job = orthanc.post("/modalities/ainode/store", {"Resources": [study], "Synchronous": True})
        assert job["InstancesCount"] == 4 and job["FailedInstancesCount"] == 0, job

        status = wait_delivered(tmp_path / "storage", jobs=1)
        results = outbox_uids(status, status["jobs"][0]["id"])
        series = orthanc.get(f"/studies/{study}/series?expand")
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
        assert "MG" in modalities and "SEG" in modalities and modalities.count("SR") == 2, modalities
        instances = orthanc.get(f"/studies/{study}/instances?expand")
        uids = sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in instances
                      if i["MainDicomTags"]["SOPInstanceUID"] in set(results))
        assert uids == results  # every result object, in the study it belongs to
        assert len(instances) == 4 + len(results)
        seg_series = next(s for s in series if s["MainDicomTags"]["Modality"] == "SEG")
        meta = orthanc.get(f"/instances/{seg_series['Instances'][0]}/metadata?expand")
        assert meta["RemoteAET"] == "AINODE"
        assert meta["TransferSyntax"] == "1.2.840.10008.1.2.4.90"  # sent as written, JPEG 2000 lossless

        # Retention: once delivered and quiet for retention_days, the node forgets the study.
        storage = tmp_path / "storage"
        wait_for(lambda: not store_status(storage)["studies"] and not list((storage / "spool").rglob("*.dcm"))
                 and not list((storage / "outbox").rglob("*.dcm")), 30, "the finished study to be purged")
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
