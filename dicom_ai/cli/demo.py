"""`make demo`: a PACS (dcmtk storescp), the node with the shipped models, one phantom study.

Runs everything on loopback ports the OS picks, sends a four-view phantom study to the node
with dcmtk's storescu as the PACS would, waits for the SEG and SR objects to come back to the
PACS and prints what arrived (with the dciodvfy verdict of each). All files stay in ``--out``:
the study sent, what the PACS received, the node's storage (job store, outbox, previews, logs).

    python -m dicom_ai.cli.demo --out demo-out
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from dicom_ai.networks.bundle import MODELS_DIR
from dicom_ai.networks.pipeline import DEFAULT_MODELS
from dicom_ai.node.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: {what} exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"demo: {what} did not listen on port {port} within {timeout:.0f} s")


def _missing_models(names: list[str]) -> list[str]:
    return [n for n in names if not (MODELS_DIR / n / "manifest.json").is_file()]


def _states(db: Path) -> tuple[list[str], list[str]]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            jobs = [f"{s}" for (s,) in conn.execute("SELECT state FROM jobs")]
            deliveries = [f"{s}" for (s,) in conn.execute("SELECT state FROM deliveries")]
        finally:
            conn.close()
    except sqlite3.Error:
        return [], []
    return jobs, deliveries


def _describe(path: Path) -> str:
    import pydicom

    from conformance.validators import dciodvfy

    ds = pydicom.dcmread(path)
    what = f"{ds.Modality:<4} {str(ds.get('SeriesDescription', '')):<34}"
    if ds.Modality == "SEG":
        labels = [str(s.SegmentLabel) for s in ds.get("SegmentSequence", [])]
        ref = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID \
            if "ReferencedSeriesSequence" in ds else "?"
        what += f" segments: {', '.join(labels) or 'none'}; source ...{str(ref)[-12:]}"
    elif ds.Modality == "SR":
        groups = 0

        def walk(items):
            nonlocal groups
            for item in items:
                name = item.get("ConceptNameCodeSequence")
                if name and str(name[0].CodeMeaning).lower() == "measurement group":
                    groups += 1
                walk(item.get("ContentSequence", []))

        walk(ds.get("ContentSequence", []))
        what += f" {ds.SOPClassUID.name}, {groups} measurement group(s)"
    try:
        report = dciodvfy(path)
        verdict = "dciodvfy: no errors" if not report.errors else f"dciodvfy: {len(report.errors)} error(s)"
    except Exception as exc:  # dicom3tools missing: say so, do not hide the results
        verdict = f"dciodvfy not run ({exc})"
    return f"{what}  [{verdict}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="working folder (replaced)")
    parser.add_argument("--seed", type=int, default=7, help="phantom study seed")
    parser.add_argument("--rows", type=int, default=1664, help="image rows (columns = rows * 10 / 13)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the results")
    parser.add_argument("--pipeline-factory", default="",
                        help="module:callable to run instead of the shipped models (pipeline.factory)")
    args = parser.parse_args(argv)

    missing = [] if args.pipeline_factory else _missing_models(list(DEFAULT_MODELS))
    if missing:
        print(f"demo: the shipped model bundles {', '.join(missing)} are not in {MODELS_DIR} yet "
              f"(each needs manifest.json and weights.safetensors). Train them with "
              f"`dicom-ai train <model>` or check out a revision that ships them, then run `make demo` again.",
              file=sys.stderr)
        return 2
    for program in ("storescp", "storescu"):
        if shutil.which(program) is None:
            print(f"demo: {program} (dcmtk) is not installed; run `make debs` first", file=sys.stderr)
            return 2

    from dicom_ai.data.phantom import generate_study
    from dicom_ai.data.phantom_folder import write_study

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "pacs").mkdir(parents=True)
    shape = (args.rows, int(round(args.rows * 10 / 13)))
    print(f"demo: generating phantom study (seed {args.seed}, {shape[0]} x {shape[1]}) ...")
    study = generate_study(args.seed, shape=shape)
    write_study(study, out / "study")
    sent = sorted((out / "study").glob("*.dcm"))

    pacs_port, node_port = _free_port(), _free_port()
    (out / "node.toml").write_text(
        "[node]\n"
        f'ae_title = "DICOM_AI"\nbind_address = "127.0.0.1"\nport = {node_port}\nstorage = "storage"\n'
        "reserve_free_mb = 64\n"
        "[study]\ngrace_seconds = 1.0\nidle_seconds = 30.0\n"
        f'[pipeline]\ndevice = "{args.device}"\nfactory = "{args.pipeline_factory}"\n'
        "[retry]\nmax_attempts = 5\ninitial_delay_seconds = 2.0\n"
        f'[[peers]]\nae_title = "DEMOPACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n')
    config = load_config(out / "node.toml")  # where the node will keep its files, as the node reads it
    procs: list[subprocess.Popen] = []
    try:
        pacs = subprocess.Popen(["storescp", "--aetitle", "DEMOPACS", "--output-directory", str(out / "pacs"),
                                 "+xa", "-fe", ".dcm", str(pacs_port)],
                                stdout=open(out / "pacs.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(pacs)
        _wait_port(pacs_port, 20, pacs, "storescp (the PACS)")
        node = subprocess.Popen([sys.executable, "-m", "dicom_ai", "serve", "--config", str(out / "node.toml")],
                                stdout=open(out / "node.stdout.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(node)
        _wait_port(node_port, 120, node, "the node")
        print(f"demo: PACS DEMOPACS on port {pacs_port}, node DICOM_AI on port {node_port}; sending "
              f"{len(sent)} images with storescu ...")
        sendlog = subprocess.run(["storescu", "-aet", "DEMOPACS", "-aec", "DICOM_AI", "127.0.0.1", str(node_port),
                                  *map(str, sent)], capture_output=True, text=True, timeout=120)
        if sendlog.returncode != 0:
            print(sendlog.stderr, file=sys.stderr)
            raise SystemExit("demo: sending the study failed")
        db = config.layout.jobstore
        started = time.monotonic()
        last = None
        while True:
            jobs, deliveries = _states(db)
            now = (tuple(jobs), tuple(deliveries))
            if now != last:
                print(f"demo: {time.monotonic() - started:6.1f} s  jobs {jobs or '-'}  deliveries {deliveries or '-'}")
                last = now
            if deliveries and all(d == "done" for d in deliveries):
                break
            if "failed" in jobs or "failed" in deliveries:
                print("demo: something failed; `dicom-ai status --config demo-out/node.toml` shows why",
                      file=sys.stderr)
                return 1
            if node.poll() is not None:
                raise SystemExit(f"demo: the node stopped (code {node.returncode}); see {out}/node.stdout.log")
            if time.monotonic() - started > args.timeout:
                raise SystemExit(f"demo: no results after {args.timeout:.0f} s; see {config.log_file}")
            time.sleep(1.0)
        received = sorted((out / "pacs").glob("*.dcm"))
        print(f"\ndemo: the PACS received {len(received)} result objects in {time.monotonic() - started:.1f} s:")
        for path in received:
            print(f"  {_describe(path)}")
        previews = sorted(config.layout.previews.rglob("*.png"))
        print(f"\ndemo: previews for IT checks: {len(previews)} PNG in {config.layout.previews}")
        print(f"demo: everything is in {out} (node.toml, study/, pacs/, storage/)")
        summary = {"sent": [p.name for p in sent], "received": [p.name for p in received]}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    sys.exit(main())
