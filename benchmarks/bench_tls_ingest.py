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

Also per receiver: CPU seconds of the receiving process (``/proc``, all its threads) and of
the sender (storescu) per round. ``--before REV`` runs a second node from ``git archive REV`` (e.g. the commit before the
``TlsStream`` receive path)
(targets ``node@before``, ``node_tls@before``) in the same rounds, for before/after ratios
on a shared machine. ``--profile LABEL`` samples the node(s) with py-spy (running threads only,
1000/s) during their sends and writes ``tls_ingest_profile_LABEL.md`` / ``.json`` (CPU ms per
round per thread and function) instead of the timing JSON.

Writes benchmarks/results/tls_ingest.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from node_harness import Proc, free_port, storescu, wait_port  # noqa: E402
from bench_ingest import write_rounds  # noqa: E402
from tls_certs import make_all  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
PROFILE: str | None = None  # --profile LABEL
PY_SPY = Path(sys.executable).with_name("py-spy")
SHAPE = (3328, 2560)
PDU = 131072
TARGETS = ("storescp", "storescp_tls", "node", "node_tls")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's waited-for children (the storescu runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_profile(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling the node's threads while they run (not blocked), SAMPLE_RATE/s, until :func:`stop_profile`."""
    spy = subprocess.Popen([str(PY_SPY), "record", "-p", str(pid), "--format", "raw", "--rate", str(SAMPLE_RATE),
                            "--threads", "--nonblocking", "-o", str(out)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    return spy


def stop_profile(spy: subprocess.Popen) -> None:
    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=30)


SAMPLE_RATE = 1000


def _frame(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: one row per function, not per line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rsplit(':', 1)[0]).name})" if where else name


def profile_table(files: list[Path]) -> dict:
    """Collapsed py-spy stacks of one receiver, summed over rounds: milliseconds of CPU per thread
    role and per function (self and inclusive), the first 25 functions by inclusive time."""
    threads: dict[str, float] = {}
    own: dict[str, float] = {}
    total: dict[str, float] = {}
    for f in files:
        for line in f.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            ms = int(count) * 1000.0 / SAMPLE_RATE / len(files)
            thread = frames[0].split(": ", 1)[-1].split("@")[0]
            role = ("DUL reader (run_reactor)" if "run_reactor" in thread else
                    "association (C-STORE handler)" if thread.startswith("AcceptorThread") else thread)
            threads[role] = threads.get(role, 0.0) + ms
            names = [_frame(x) for x in frames[1:]]
            if names:
                own[names[-1]] = own.get(names[-1], 0.0) + ms
            for name in dict.fromkeys(names):
                total[name] = total.get(name, 0.0) + ms
    top = sorted(total, key=total.get, reverse=True)
    skip = {"Thread._bootstrap (threading.py)", "Thread._bootstrap_inner (threading.py)", "Thread.run (threading.py)"}
    return {"ms_per_round_by_thread": {k: round(v, 1) for k, v in sorted(threads.items(), key=lambda kv: -kv[1])},
            "functions": [{"function": n, "inclusive_ms": round(total[n], 1), "self_ms": round(own.get(n, 0.0), 1)}
                          for n in top if n not in skip][:25]}


def write_profile(label: str, work: Path, times: dict, nodes: list[str]) -> None:
    result = {"benchmark": "tls_ingest_profile", "label": label, "rounds": ROUNDS, "sample_rate_hz": SAMPLE_RATE,
              "what": "py-spy samples of the node process while storescu sends 4 full-size MG images; only "
                      "samples of running (not blocked) threads, so milliseconds are CPU time per round",
              "seconds_under_profiler": {k: [round(v, 4) for v in times[k]] for k in nodes},
              "load_average_1min_after": round(os.getloadavg()[0], 2)}
    lines = [f"# Node receive path, py-spy, {label} ({ROUNDS} rounds, CPU ms per round)", ""]
    for target in nodes:
        table = profile_table(sorted(work.glob(f"{target}-*.txt")))
        result[target] = table
        lines += [f"## {target}", "", "| thread | CPU ms |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in table["ms_per_round_by_thread"].items()]
        lines += ["", "| function | inclusive ms | self ms |", "|---|---:|---:|"]
        lines += [f"| `{r['function']}` | {r['inclusive_ms']} | {r['self_ms']} |" for r in table["functions"]]
        lines.append("")
    out = REPO / "benchmarks" / "results" / f"tls_ingest_profile_{label}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out}.json and .md")


def _archive(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _start_node(code: Path, work: Path, name: str, certs: dict, ports: dict) -> Proc:
    """A node running ``code`` (this checkout or an archived revision) with a plain and a TLS port."""
    cfg = work / f"{name}.toml"
    cfg.write_text("\n".join([
        "[node]", 'ae_title = "AINODE"', 'bind_address = "127.0.0.1"', f"port = {ports[name]}",
        f"storage = {json.dumps(str(work / f'{name}-storage'))}", "reserve_free_mb = 1", f"max_pdu_size = {PDU}",
        "[study]", "grace_seconds = 3600.0", "idle_seconds = 7200.0",
        "[pipeline]", 'factory = "node_harness:stand_in_pipeline"', 'device = "cpu"', "previews = false",
        "[tls]", f"port = {ports[name.replace('node', 'node_tls')]}", f"certificate = {json.dumps(str(certs['node'][0]))}",
        f"private_key = {json.dumps(str(certs['node'][1]))}", f"ca_bundle = {json.dumps(str(certs['ca'][0]))}",
        "[audit]", 'sink = "off"',
        "[[peers]]", 'ae_title = "BENCH"', 'host = "127.0.0.1"', "port = 1", ""]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code / "tests"), str(code)]))
    proc = Proc([sys.executable, "-m", "dicom_ai", "serve", "--config", str(cfg)], work / f"{name}.log", env=env,
                cwd=code)
    wait_port(ports[name], timeout=60)
    wait_port(ports[name.replace("node", "node_tls")], timeout=60)
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="", help="git revision whose node also runs, as node@before and "
                                                     "node_tls@before, in the same rounds")
    parser.add_argument("--profile", default="", metavar="LABEL",
                        help="sample the nodes with py-spy and write tls_ingest_profile_LABEL.md/.json instead")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile or None
    targets = TARGETS + (("node@before", "node_tls@before") if args.before else ())
    work = Path(tempfile.mkdtemp(prefix="bench-tls-", dir=REPO / "benchmarks"))
    procs: list[Proc] = []
    try:
        certs = make_all(work / "certs")
        client = ["+tls", str(certs["pacs"][1]), str(certs["pacs"][0]), "+cf", str(certs["ca"][0])]
        rounds = write_rounds(work, ROUNDS, targets, shape=SHAPE)
        nbytes = sum(p.stat().st_size for p in rounds[0]["node"])

        ports = {t: free_port() for t in targets}
        pids = {}
        for target, extra in (("storescp", []), ("storescp_tls", ["+tls", str(certs["node"][1]),
                                                                   str(certs["node"][0]), "+cf",
                                                                   str(certs["ca"][0])])):
            (work / f"{target}-in").mkdir()
            procs.append(Proc(["storescp", "--aetitle", "STORESCP", "--output-directory", str(work / f"{target}-in"),
                               "--max-pdu", str(PDU), *extra, str(ports[target])], work / f"{target}.log"))
            wait_port(ports[target])
            pids[target] = procs[-1].pid
        codes = {"node": REPO}
        if args.before:
            codes["node@before"] = _archive(args.before, work / "before-code")
        for name, code in codes.items():
            procs.append(_start_node(code, work, name, certs, ports))
            pids[name] = pids[name.replace("node", "node_tls")] = procs[-1].pid

        times = {t: [] for t in targets}
        cpu = {t: {"receiver": [], "sender": []} for t in targets}
        load_before = os.getloadavg()[0]
        for r, paths in enumerate(rounds):
            for target in targets:
                called = "AINODE" if target.startswith("node") else "STORESCP"
                extra = client if "_tls" in target else []
                spy = (start_profile(pids[target], work / f"{target}-{r}.txt")
                       if PROFILE and target.startswith("node") else None)
                rx0, tx0 = cpu_seconds(pids[target]), children_cpu_seconds()
                t0 = time.perf_counter()
                res = storescu(ports[target], paths[target], calling="BENCH", called=called, extra=extra)
                dt = time.perf_counter() - t0
                cpu[target]["receiver"].append(cpu_seconds(pids[target]) - rx0)
                cpu[target]["sender"].append(children_cpu_seconds() - tx0)
                if spy is not None:
                    stop_profile(spy)
                if res.returncode != 0 or res.stderr.count("Received Store Response (Success)") != 4:
                    raise SystemExit(f"{target} round {r}: storescu failed:\n{res.stderr[-2000:]}")
                times[target].append(dt)
        for name in codes:
            stored = len(list((work / f"{name}-storage" / "spool").rglob("*.dcm")))
            if stored != 8 * ROUNDS:
                raise SystemExit(f"{name} stored {stored} files, expected {8 * ROUNDS}")
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
            "before": args.before or None,
            "seconds": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
            "median_seconds": {k: round(statistics.median(vs), 4) for k, vs in times.items()},
            "median_cpu_seconds": {k: {role: round(statistics.median(v), 3) for role, v in d.items()}
                                   for k, d in cpu.items()},
            "median_mb_per_s": {k: round(mb / statistics.median(vs), 1) for k, vs in times.items()},
            "ratio_node_tls_over_node_plain": ratio("node_tls", "node"),
            "ratios_node_tls_over_node_plain_per_round": [round(b / a, 3) for a, b in
                                                          zip(times["node_tls"], times["node"])],
            "ratio_storescp_tls_over_storescp_plain": ratio("storescp_tls", "storescp"),
            "ratio_node_tls_over_storescp_tls": ratio("node_tls", "storescp_tls"),
            "ratio_node_over_storescp": ratio("node", "storescp"),
            "node_tls_versions_seen": versions,
            "tls": "node: Python ssl (OpenSSL), TLS >= 1.2, ECDHE/DHE + AES-GCM/ChaCha20; "
                   "storescp/storescu: dcmtk +tls, BCP 195 non-downgrading profile; RSA 2048 certificates",
            "priority": f"receivers and sender at nice {os.nice(0)} (the caller's)",
            "cpu_cores": os.cpu_count(), "load_average_1min_before": round(load_before, 2),
            "load_average_1min_after": round(os.getloadavg()[0], 2),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if args.before:
            result["before_ratios"] = {
                "node_tls_over_node_plain": ratio("node_tls@before", "node@before"),
                "node_tls_over_storescp_tls": ratio("node_tls@before", "storescp_tls"),
                "node_over_storescp": ratio("node@before", "storescp"),
                "after_over_before_plain": ratio("node", "node@before"),
                "after_over_before_tls": ratio("node_tls", "node_tls@before"),
                "node_tls_over_node_plain_per_round": [round(b / a, 3) for a, b in
                                                       zip(times["node_tls@before"], times["node@before"])],
            }
        if PROFILE:
            write_profile(PROFILE, work, times, [t for t in targets if t.startswith("node")])
            return 0
        out = REPO / "benchmarks" / "results" / "tls_ingest.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{'receiver':<16} {'median s':>9} {'MB/s':>8} {'rx cpu s':>9} {'tx cpu s':>9}")
        for k in targets:
            c = result["median_cpu_seconds"][k]
            print(f"{k:<16} {result['median_seconds'][k]:>9.3f} {result['median_mb_per_s'][k]:>8.1f} "
                  f"{c['receiver']:>9.3f} {c['sender']:>9.3f}")
        print(f"throughput ratio TLS/plain (median of {ROUNDS} rounds): node {result['ratio_node_tls_over_node_plain']}, "
              f"storescp {result['ratio_storescp_tls_over_storescp_plain']}; node TLS / storescp TLS "
              f"{result['ratio_node_tls_over_storescp_tls']}; node / storescp {result['ratio_node_over_storescp']}; "
              f"node TLS versions: {', '.join(versions)}")
        print(f"node TLS/plain per round: {result['ratios_node_tls_over_node_plain_per_round']}; load average "
              f"{result['load_average_1min_before']} -> {result['load_average_1min_after']}")
        if args.before:
            print(f"before ({args.before}): " + ", ".join(f"{k} {v}" for k, v in result["before_ratios"].items()))
        print(f"wrote {out}")
        return 0
    finally:
        for p in procs:
            p.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
