"""Ingest throughput over DICOM TLS versus plain TCP, node and dcmtk ``storescp +tls``, same run.

Four receivers on loopback: the node's plain port and its TLS port (one node, ``[tls] port``),
and dcmtk's storescp plain and with ``+tls`` (BCP 195 non-downgrading profile, dcmtk's
default). dcmtk's ``storescu`` (``+tls`` with a client certificate for the TLS receivers) sends
the same four uncompressed 3328 x 2560 x 16-bit MG images (17 MB each) over one association
to each receiver in turn, every round, fresh SOP Instance UIDs each time (the node answers a
known UID without storing it). Wall time around storescu. Reported: median seconds and MB/s
per receiver, and the per-round ratios TLS/plain (throughput) for the node and for storescp,
and node-TLS / storescp-TLS. Certificates (RSA 2048) are made with ``openssl`` for the run.

As in bench_ingest.py: both offer a 128 KiB maximum PDU; the node fsyncs each file and its
directory and commits a job-store row before Success, storescp writes without fsync.

Writes benchmarks/results/tls_ingest.json and prints a table.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from node_harness import Proc, free_port, node_env, start_node, storescu, wait_port  # noqa: E402
from bench_ingest import write_rounds  # noqa: E402
from tls_certs import make_all  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SHAPE = (3328, 2560)
PDU = 131072
TARGETS = ("storescp", "storescp_tls", "node", "node_tls")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-tls-", dir=REPO / "benchmarks"))
    procs: list[Proc] = []
    try:
        certs = make_all(work / "certs")
        client = ["+tls", str(certs["pacs"][1]), str(certs["pacs"][0]), "+cf", str(certs["ca"][0])]
        rounds = write_rounds(work, ROUNDS, TARGETS, shape=SHAPE)
        nbytes = sum(p.stat().st_size for p in rounds[0]["node"])

        ports = {}
        for target, extra in (("storescp", []), ("storescp_tls", ["+tls", str(certs["node"][1]),
                                                                   str(certs["node"][0]), "+cf",
                                                                   str(certs["ca"][0])])):
            ports[target] = free_port()
            (work / f"{target}-in").mkdir()
            procs.append(Proc(["storescp", "--aetitle", "STORESCP", "--output-directory", str(work / f"{target}-in"),
                               "--max-pdu", str(PDU), *extra, str(ports[target])], work / f"{target}.log"))
            wait_port(ports[target])
        ports["node"], ports["node_tls"] = free_port(), free_port()
        cfg = work / "node.toml"
        cfg.write_text("\n".join([
            "[node]", 'ae_title = "AINODE"', 'bind_address = "127.0.0.1"', f"port = {ports['node']}",
            f"storage = {json.dumps(str(work / 'node-storage'))}", "reserve_free_mb = 1", f"max_pdu_size = {PDU}",
            "[study]", "grace_seconds = 3600.0", "idle_seconds = 7200.0",
            "[pipeline]", 'factory = "node_harness:stand_in_pipeline"', 'device = "cpu"', "previews = false",
            "[tls]", f"port = {ports['node_tls']}", f"certificate = {json.dumps(str(certs['node'][0]))}",
            f"private_key = {json.dumps(str(certs['node'][1]))}", f"ca_bundle = {json.dumps(str(certs['ca'][0]))}",
            "[audit]", 'sink = "off"',
            "[[peers]]", 'ae_title = "BENCH"', 'host = "127.0.0.1"', "port = 1", ""]))
        procs.append(start_node(cfg, ports["node"], work / "node.log", env=node_env()))
        wait_port(ports["node_tls"])

        times = {t: [] for t in TARGETS}
        for r, paths in enumerate(rounds):
            for target in TARGETS:
                called = "AINODE" if target.startswith("node") else "STORESCP"
                extra = client if target.endswith("_tls") else []
                t0 = time.perf_counter()
                res = storescu(ports[target], paths[target], calling="BENCH", called=called, extra=extra)
                dt = time.perf_counter() - t0
                if res.returncode != 0 or res.stderr.count("Received Store Response (Success)") != 4:
                    raise SystemExit(f"{target} round {r}: storescu failed:\n{res.stderr[-2000:]}")
                times[target].append(dt)
        stored = len(list((work / "node-storage" / "spool").rglob("*.dcm")))
        if stored != 8 * ROUNDS:
            raise SystemExit(f"node stored {stored} files, expected {8 * ROUNDS}")
        tls_lines = [json.loads(l) for l in (work / "node.log").read_text().splitlines()
                     if '"association_accepted"' in l]
        versions = sorted({str(e.get("tls")) for e in tls_lines})

        def ratio(a: str, b: str) -> float:  # throughput of a / throughput of b, median over rounds
            return round(statistics.median(tb / ta for ta, tb in zip(times[a], times[b])), 3)

        mb = nbytes / 1e6
        result = {
            "benchmark": "tls_ingest",
            "what": "C-STORE receive of 4 uncompressed full-size MG images over one association, plain vs DICOM TLS",
            "image_shape": list(SHAPE), "bytes_per_study": nbytes, "rounds": ROUNDS, "max_pdu": PDU,
            "seconds": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
            "median_seconds": {k: round(statistics.median(vs), 4) for k, vs in times.items()},
            "median_mb_per_s": {k: round(mb / statistics.median(vs), 1) for k, vs in times.items()},
            "ratio_node_tls_over_node_plain": ratio("node_tls", "node"),
            "ratio_storescp_tls_over_storescp_plain": ratio("storescp_tls", "storescp"),
            "ratio_node_tls_over_storescp_tls": ratio("node_tls", "storescp_tls"),
            "node_tls_versions_seen": versions,
            "tls": "node: Python ssl (OpenSSL), TLS >= 1.2, ECDHE/DHE + AES-GCM/ChaCha20; "
                   "storescp/storescu: dcmtk +tls, BCP 195 non-downgrading profile; RSA 2048 certificates",
            "cpu_cores": os.cpu_count(), "load_average_1min_after": round(os.getloadavg()[0], 2),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        out = REPO / "benchmarks" / "results" / "tls_ingest.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{'receiver':<14} {'median s':>9} {'MB/s':>8}")
        for k in TARGETS:
            print(f"{k:<14} {result['median_seconds'][k]:>9.3f} {result['median_mb_per_s'][k]:>8.1f}")
        print(f"throughput ratio TLS/plain (median of {ROUNDS} rounds): node {result['ratio_node_tls_over_node_plain']}, "
              f"storescp {result['ratio_storescp_tls_over_storescp_plain']}; node TLS / storescp TLS "
              f"{result['ratio_node_tls_over_storescp_tls']}; node TLS versions: {', '.join(versions)}")
        print(f"wrote {out}")
        return 0
    finally:
        for p in procs:
            p.stop()
        if "--keep" not in sys.argv:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
