"""The Conformance Statement is true of the code: SOP classes and transfer syntaxes as negotiated."""

import re
import tempfile
from pathlib import Path

import pytest
from pynetdicom import AE, _config, build_context, transport

from dicom_ai.node.config import load_config
from dicom_ai.node.jobstore import JobStore
from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.results import build_results
from dicom_ai.node.scp import SUPPORTED_SOP_CLASSES, SUPPORTED_TRANSFER_SYNTAXES, VERIFICATION_TRANSFER_SYNTAXES, StorageSCP

from _results_sources import built_small
from node_harness import free_port

STATEMENT = Path(__file__).resolve().parents[1] / "conformance" / "conformance-statement.md"
VERIFICATION = "1.2.840.10008.1.1"
UID = re.compile(r"\b1\.2\.840\.10008(?:\.\d+)+\b")


def table(name: str) -> list[list[str]]:
    """Rows (cells) of the statement's table marked ``<!-- table: name -->``."""
    text = STATEMENT.read_text()
    m = re.search(rf"<!-- table: {name} -->\n(.*?)<!-- end table -->", text, re.S)
    assert m, f"table {name} missing from {STATEMENT.name}"
    lines = [l for l in m.group(1).splitlines() if l.startswith("|")][2:]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def uids(name: str) -> set[str]:
    return {u for row in table(name) for cell in row for u in UID.findall(cell)}


def test_scp_tables_equal_the_node_constants():
    assert uids("scp-sop-classes") == {VERIFICATION} | set(SUPPORTED_SOP_CLASSES)
    assert uids("scp-transfer-syntaxes") == set(SUPPORTED_TRANSFER_SYNTAXES)
    assert uids("verification-transfer-syntaxes") == set(VERIFICATION_TRANSFER_SYNTAXES)
    # Names in the statement are the ones in the code.
    names = {row[1]: row[0] for row in table("scp-transfer-syntaxes")}
    assert names == SUPPORTED_TRANSFER_SYNTAXES


@pytest.fixture
def node(tmp_path):
    saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv)
    cfg = load_config(None, {"node.ae_title": "AINODE", "node.port": free_port(), "node.storage": str(tmp_path / "st"),
                             "node.reserve_free_mb": 1, "peers": ["PACS@127.0.0.1:1"]})
    server = StorageSCP(cfg, JobStore(cfg.storage_dir / "jobs.sqlite"))
    port = server.start()
    yield port
    server.stop()
    tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv = saved


def test_real_association_accepts_exactly_what_the_statement_lists(node):
    """Propose every listed and a few unlisted abstract/transfer syntax pairs, one per context."""
    storage = uids("scp-sop-classes") - {VERIFICATION}
    syntaxes = uids("scp-transfer-syntaxes")
    unlisted_sop = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.1.1"}  # CT, DX for presentation
    unlisted_ts = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50"}  # big endian, JPEG baseline
    ae = AE(ae_title="PACS")
    proposed = []
    for sop in sorted(storage | unlisted_sop):
        for ts in sorted(syntaxes | unlisted_ts):
            proposed.append((sop, ts))
    for ts in sorted(uids("verification-transfer-syntaxes") | {"1.2.840.10008.1.2.2"}):
        proposed.append((VERIFICATION, ts))
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in proposed]
    assoc = ae.associate("127.0.0.1", node, ae_title="AINODE")
    assert assoc.is_established
    try:
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    finally:
        assoc.release()
    expected = {(s, t) for s in storage for t in syntaxes} | {(VERIFICATION, t) for t in uids("verification-transfer-syntaxes")}
    assert accepted == expected


def test_scu_tables_equal_what_the_writers_produce():
    """Every SOP class / transfer syntax the node sends (the delivery proposes each object's own)."""
    sources, findings, uids_, _ = built_small()
    produced = set()
    for seg_type, compression in [("BINARY", "none"), ("BINARY", "jpeg2000"), ("FRACTIONAL", "rle"),
                                  ("FRACTIONAL", "jpegls")]:
        out = build_results(sources, findings, uids_, ResultOptions(segmentation_type=seg_type, compression=compression,
                                                                    cad_sr=True, secondary_capture=True)).datasets
        produced |= {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in out}
    assert {sop for sop, _ in produced} == uids("scu-sop-classes")
    listed = set()
    names = {"Segmentation": ["1.2.840.10008.5.1.4.1.1.66.4"],
             "Comprehensive 3D SR, Mammography CAD SR": ["1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.50"],
             "Grayscale Softcopy Presentation State, Secondary Capture Image": ["1.2.840.10008.5.1.4.1.1.11.1",
                                                                               "1.2.840.10008.5.1.4.1.1.7"]}
    for row in table("scu-transfer-syntaxes"):
        for sop in names[row[0]]:
            listed.add((sop, row[2]))
    assert produced == listed


def test_statement_names_the_iods_and_options_the_code_has():
    text = STATEMENT.read_text()
    defaults = ResultOptions()
    assert f"Series Number {defaults.seg_series_number}" in text and f"Series Number {defaults.sr_series_number}" in text
    assert f"Series Number {defaults.cad_series_number}" in text
    assert f"Series Number {defaults.gsps_series_number}" in text and f"Series Number {defaults.sc_series_number}" in text
    assert f"`gsps` (default {str(defaults.gsps).lower()})" in text
    assert f"`secondary_capture` (default {str(defaults.secondary_capture).lower()})" in text
    for kw in ("Patient Orientation copied from the source", "Laterality not present", "empty segments written"):
        assert kw in text
    cfg = load_config(None, {})
    assert f"default `{cfg.node.ae_title}`" in text and f"default {cfg.node.port})" in text
    assert f"default {cfg.node.max_associations};" in text
    assert ResultUIDs.generate(["1.2.3"]).seg_series_for("1.2.3")  # one series per SEG, as stated


def test_query_table_is_what_the_delivery_proposes_for_objects_in_doubt():
    from dicom_ai.node import delivery
    assert uids("scu-query-sop-classes") == {str(delivery._FIND)}


def test_statement_states_the_limits_the_configuration_has():
    text = STATEMENT.read_text()
    cfg = load_config(None, {})
    lim, retry, pipe = cfg.limits, cfg.retry, cfg.pipeline
    for needle in (f"`limits.association_request_seconds`, default {lim.association_request_seconds:g} s",
                   f"`limits.max_connections_per_address`, default {lim.max_connections_per_address} ",
                   f"`limits.reserved_peer_associations`, default {lim.reserved_peer_associations} ",
                   f"`limits.idle_seconds` ({lim.idle_seconds:g} s)",
                   f"`retry.timeout_seconds` ({retry.timeout_seconds:g} s)",
                   f"`limits.max_columns` ({lim.max_columns})",
                   f"`max_pixels` ({lim.max_pixels:,})".replace(",", " "),
                   f"`limits.max_dataset_mb` ({lim.max_dataset_mb} MiB)",
                   f"`limits.decode_memory_mb` ({lim.decode_memory_mb} MiB)",
                   f"`limits.decode_timeout_seconds` ({lim.decode_timeout_seconds:g} s)",
                   f"`pipeline.max_job_interruptions`, {pipe.max_job_interruptions}",
                   f"`pipeline.max_job_attempts`, {pipe.max_job_attempts}"):
        assert needle in text, needle
