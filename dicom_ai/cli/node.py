"""`dicom-ai serve | worker | check-config | status | retry | infer | echo`: running and operating the node."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the node's subcommands."""
    p = subparsers.add_parser("serve", help="run the DICOM node (SCP, worker, delivery)")
    p.add_argument("--config", type=Path, help="node.toml (every key has a default)")
    p.add_argument("--ae-title", help="the node's AE title (node.ae_title)")
    p.add_argument("--port", type=int, help="TCP port to listen on (node.port)")
    p.add_argument("--bind", help="address to listen on (node.bind_address)")
    p.add_argument("--storage", help="storage directory (node.storage)")
    p.add_argument("--peer", action="append", metavar="AE@HOST:PORT",
                   help="a peer that may send studies and gets their results (repeatable)")
    p.add_argument("--allow-any-caller", action="store_true", default=None,
                   help="accept associations from any calling AE title")
    p.add_argument("--device", help="auto, cpu or cuda:N (pipeline.device)")
    p.set_defaults(handler=_serve)

    p = subparsers.add_parser("worker", help="run inference workers on this host (Celery; [workers] broker_url)")
    p.add_argument("--config", type=Path, required=True,
                   help="the site's node.toml: shared node.storage, [jobstore] url, [workers] broker_url")
    p.add_argument("--name", default="worker", help="this worker's name, shown as NAME@HOST (default: worker)")
    p.add_argument("--concurrency", type=int, default=1, help="pool processes, each with its own models (1 per GPU)")
    p.add_argument("--device", help="auto, cpu or cuda:N (pipeline.device)")
    p.set_defaults(handler=_worker)

    p = subparsers.add_parser("check-config", help="validate node.toml and print the effective configuration")
    p.add_argument("--config", type=Path, required=True, help="node.toml to check")
    p.add_argument("--quiet", action="store_true", help="print nothing when the file is valid (systemd ExecStartPre)")
    p.set_defaults(handler=_check_config)

    p = subparsers.add_parser("status", help="studies, jobs and deliveries with their states (no patient data)")
    _storage_args(p)
    p.add_argument("--json", action="store_true", help="print the job store's state as JSON")
    p.set_defaults(handler=_status)

    p = subparsers.add_parser("retry", help="re-queue failed deliveries and failed jobs")
    _storage_args(p)
    p.set_defaults(handler=_retry)

    p = subparsers.add_parser("infer", help="run the pipeline offline on DICOM files and write the results")
    p.add_argument("files", nargs="+", type=Path, help="MG DICOM files of one study")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the SEG/SR objects and (pipeline.previews) PNG previews")
    p.add_argument("--config", type=Path, help="node.toml whose [pipeline] to use")
    p.add_argument("--device", help="auto, cpu or cuda:N")
    p.set_defaults(handler=_infer)

    p = subparsers.add_parser("echo", help="C-ECHO a peer (AE@HOST:PORT, or a configured peer's AE title), "
                                           "optionally over DICOM TLS as a delivery would")
    p.add_argument("peer", metavar="AE@HOST:PORT|AE", help="a remote AE, or the AE title of a [[peers]] or "
                   "[[destinations]] entry of --config (its host, port and tls setting)")
    p.add_argument("--config", type=Path, help="node.toml: calling AE title (node.ae_title), [tls] files, peers")
    p.add_argument("--ae-title", help="calling AE title (default: node.ae_title, DICOM_AI without --config)")
    p.add_argument("--tls", action="store_true", help="DICOM TLS as for a tls = true destination: the [tls] "
                   "certificate and key are presented, the peer's certificate must chain to the CA bundle and "
                   "name HOST")
    p.add_argument("--certificate", help="PEM certificate to present (default tls.certificate)")
    p.add_argument("--private-key", help="its PEM private key (default tls.private_key)")
    p.add_argument("--ca-bundle", help="PEM CA certificates the peer's certificate must chain to (default tls.ca_bundle)")
    p.add_argument("--min-version", choices=("1.2", "1.3"), help="lowest TLS version (default tls.min_version)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for connect, handshake and each reply")
    p.set_defaults(handler=_echo)


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="node.toml (to find the storage directory)")
    p.add_argument("--storage", help="storage directory (overrides the file)")


def _load(args: argparse.Namespace, **overrides):
    from dicom_ai.node.config import ConfigError, load_config

    try:
        return load_config(getattr(args, "config", None), overrides)
    except ConfigError as exc:
        print(f"dicom-ai: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    from dicom_ai.node.supervisor import serve

    config = _load(args, **{"node.ae_title": args.ae_title, "node.port": args.port, "node.bind_address": args.bind,
                            "node.storage": args.storage, "peers": args.peer,
                            "node.allow_any_caller": args.allow_any_caller, "pipeline.device": args.device})
    if not config.peers and not config.node.allow_any_caller:
        print("dicom-ai: configuration error: no [[peers]] are configured and node.allow_any_caller is false, "
              "so every association would be refused; add a peer (--peer AE@HOST:PORT) or --allow-any-caller",
              file=sys.stderr)
        return 2
    return serve(config)


def _worker(args: argparse.Namespace) -> int:
    from dicom_ai.core.errors import JobStoreError, StorageIdentityError
    from dicom_ai.node import logs
    from dicom_ai.node.celery_worker import run

    config = _load(args, **{"pipeline.device": args.device})
    if not config.workers.distributed:
        print("dicom-ai: configuration error: [workers] broker_url is not set: this node.toml runs its worker "
              "inside `dicom-ai serve`; a separate worker needs broker_url and a PostgreSQL [jobstore] url",
              file=sys.stderr)
        return 2
    if args.concurrency < 1:
        print("dicom-ai: --concurrency must be at least 1", file=sys.stderr)
        return 2
    log_file = config.log_file if config.logging.file else \
        config.layout.logs / f"worker-{_hostname()}-{args.name}.log"
    logs.configure("worker", config.logging.level, log_file)
    try:
        return run(config, name=args.name, concurrency=args.concurrency)
    except (StorageIdentityError, JobStoreError) as exc:
        logs.event("worker_start_refused", level="ERROR", error=str(exc))
        print(f"dicom-ai worker: {exc}", file=sys.stderr)
        return 2


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _open_store(args: argparse.Namespace, config=None):
    from dicom_ai.node.engines import open_jobstore

    config = config or _load(args, **{"node.storage": args.storage})
    if not config.jobstore.url:
        db = config.layout.jobstore
        if not db.exists():
            print(f"dicom-ai: no job store at {db}; is --storage/--config right?", file=sys.stderr)
            raise SystemExit(2)
    return open_jobstore(config)


def _disk(config) -> dict:
    """Free space of the storage against ``node.reserve_free_mb``: read here, not from the job
    store, so a disk too full for the node to record a notice still shows."""
    import shutil

    free = shutil.disk_usage(config.layout.root).free
    return {"free_mb": free // 2**20, "reserve_mb": config.node.reserve_free_mb,
            "low": free < config.node.reserve_free_mb * 2**20}


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts)) if ts else "-"


def _status(args: argparse.Namespace) -> int:
    config = _load(args, **{"node.storage": args.storage})
    from dicom_ai.node.liveness import describe_workers

    status = _open_store(args, config).status()
    status["disk"] = disk = _disk(config)
    status["workers"] = describe_workers(status.get("workers", []), config.workers.lease_seconds)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    if disk["low"] and not any(n["key"] == "disk" for n in status["notices"]):
        print(f"PROBLEM (disk): storage below node.reserve_free_mb ({disk['free_mb']} MiB free, "
              f"{disk['reserve_mb']} MiB reserved): C-STOREs are refused with Out of Resources (0xA700) and "
              "results wait until space is freed")
    for n in status["notices"]:
        print(f"PROBLEM ({n['key']}, {_when(n['updated'])}): {n['message']}")
    from dicom_ai.core.research import research_notices

    for note in research_notices(config.pipeline.models):  # a warning, not a problem: no exit status
        print(f"NOTE (research): {note}")
    print(f"STUDIES ({len(status['studies'])})")
    for s in status["studies"]:
        print(f"  {s['id']:>4}  {s['state']:<7} {s['instances']:>3} img  from {s['calling_ae']:<16} "
              f"{s['study_uid']}  last {_when(s['last_received'])}")
    print(f"JOBS ({len(status['jobs'])})")
    for j in status["jobs"]:
        note = f"  ! {j['error']}" if j["error"] else ""
        ran = f"  by {j['worker']}" if j.get("worker") else ""
        if j.get("models"):
            ran += "  models " + ", ".join(f"{k} {v}" for k, v in sorted(json.loads(j["models"]).items()))
        print(f"  {j['id']:>4}  {j['state']:<10} attempts {j['attempts']} (failed {j['failures']}, "
              f"interrupted {j['interruptions']})  results {j['results']:>2}  {j['study_uid']}{ran}{note}")
    print(f"DELIVERIES ({len(status['deliveries'])})")
    for d in status["deliveries"]:
        nxt = f"  next {_when(d['next_attempt'])}" if d["state"] == "pending" else ""
        err = f"  ! {d['error']}" if d["error"] else ""
        doubt = f" ({d['in_doubt']} in doubt)" if d["in_doubt"] else ""
        print(f"  {d['id']:>4}  job {d['job_id']:>4}  {d['state']:<10} {d['sent']}/{d['total']} sent{doubt}  "
              f"to {d['ae_title']}@{d['host']}:{d['port']}  attempts {d['attempts']}{nxt}{err}")
    if status.get("workers"):
        print(f"WORKERS ({len(status['workers'])}, job store {status['engine']}, lost after "
              f"workers.lease_seconds = {config.workers.lease_seconds:g} s without a heartbeat)")
        for w in status["workers"]:
            job = ", ".join(f"job {j}" for j in w["jobs"]) or "idle"
            print(f"  {w['name']:<32} {w['state'].upper():<5}  last heartbeat {_when(w['seen'])} "
                  f"({w['age']:.0f} s ago)  {job}  pid {w['pid']}  started {_when(w['started'])}  "
                  f"storage {w['storage_id'][:8]}")
    failed = sum(d["state"] == "failed" for d in status["deliveries"]) + sum(j["state"] == "failed"
                                                                             for j in status["jobs"])
    return 1 if failed or status["notices"] or disk["low"] else 0


def _check_config(args: argparse.Namespace) -> int:
    import dataclasses

    from dicom_ai.node.config import ConfigError
    from dicom_ai.node.tls import client_context, server_context

    config = _load(args)
    try:  # the certificate and key must load as the node will load them, not only exist
        if config.tls.port:
            server_context(config.tls)
        if any(r.tls for r in (*config.peers, *config.destinations)):
            client_context(config.tls)
    except ConfigError as exc:
        print(f"dicom-ai: configuration error: {exc}", file=sys.stderr)
        return 2
    if config.tls_in_use:
        from dicom_ai.node.certificates import check_certificates

        report = check_certificates(config.tls)
        for text in report.warnings:  # printed even with --quiet: systemd's journal keeps them
            print(f"dicom-ai: warning: {text}", file=sys.stderr)
        if report.errors:
            for text in report.errors:
                print(f"dicom-ai: configuration error: {text}", file=sys.stderr)
            return 2
    if not config.peers and not config.node.allow_any_caller:
        print("dicom-ai: configuration error: no [[peers]] are configured and node.allow_any_caller is false, "
              "so every association would be refused", file=sys.stderr)
        return 2
    if not args.quiet:
        effective = dataclasses.asdict(config)
        for section, key in (("jobstore", "url"), ("workers", "broker_url")):  # never print a password
            effective[section][key] = _without_password(effective[section][key])
        effective["derived"] = {"storage": str(config.storage_dir), "log_file": str(config.log_file),
                                "audit_file": str(config.audit_file) if config.audit.sink == "file" else None}
        print(f"# {args.config}: valid. Effective configuration (defaults filled in):")
        print(json.dumps(effective, indent=2))
        from dicom_ai.core.research import research_notices

        for note in research_notices(config.pipeline.models):
            print(f"dicom-ai: warning: {note}", file=sys.stderr)
    return 0


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _retry(args: argparse.Namespace) -> int:
    from dicom_ai.node import audit

    config = _load(args, **{"node.storage": args.storage})
    counts = _open_store(args, config).retry_failed()
    audit.configure(config)
    audit.security_alert(("110131", "Software Configuration"),
                         f"dicom-ai retry: re-queued {counts['deliveries']} failed deliveries and {counts['jobs']} "
                         "failed jobs", audit.Participant(audit.operator(), requestor=True), outcome=audit.SUCCESS)
    print(f"re-queued {counts['deliveries']} failed deliveries and {counts['jobs']} failed jobs")
    return 0


def _infer(args: argparse.Namespace) -> int:
    import tempfile

    import pydicom

    from dicom_ai.core.uids import ResultUIDs
    from dicom_ai.node.processing import error_text, load_pipeline, result_options, run_into_builder
    from dicom_ai.node.sandbox import DecodeSandbox
    from dicom_ai.results import ResultsBuilder

    config = _load(args, **{"pipeline.device": args.device})
    sources, notes = [], []
    # The files are decoded as the node decodes received images: in the sandbox, so a codec
    # that crashes or runs out of memory costs that file, not the command.
    with tempfile.TemporaryDirectory(prefix="dicom-ai-infer-") as scratch, \
            DecodeSandbox(Path(scratch), config.limits.decode_memory_mb,
                          config.limits.decode_timeout_seconds) as sandbox:
        for f in args.files:
            try:
                ds = pydicom.dcmread(f)
            except Exception as exc:
                print(f"dicom-ai: cannot read {f}: {error_text(exc)}", file=sys.stderr)
                return 2
            try:
                sources.append(sandbox.decode(ds, f))
            except Exception as exc:
                notes.append(f"{f}: {error_text(exc)}")
    if not sources:
        print("dicom-ai: no file could be decoded: " + "; ".join(notes), file=sys.stderr)
        return 2
    pipeline = load_pipeline(config)
    uids = ResultUIDs.generate([str(ds.SOPInstanceUID) for ds in sources])
    # As the worker: each image's results are built as soon as its models have run.
    builder = ResultsBuilder(sources, uids, options=result_options(config))
    skipped = run_into_builder(pipeline, sources, builder, {})
    for note in notes + skipped:
        print(f"skipped {note}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    results = builder.finish()
    for note in results.notes:
        print(f"note: {note}", file=sys.stderr)
    for ds in results.datasets:
        path = args.out / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        print(f"wrote {path}")
    if config.pipeline.previews:
        for path in results.write_previews(args.out / "previews"):
            print(f"wrote {path}")
    return 0


def _echo(args: argparse.Namespace) -> int:
    import dataclasses

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from dicom_ai.node.config import ConfigError, parse_remote
    from dicom_ai.node.tls import client_context, probe_handshake

    config = _load(args)
    if "@" in args.peer:
        try:
            peer = parse_remote(args.peer, "peer")
        except ConfigError as exc:
            print(f"dicom-ai: {exc}", file=sys.stderr)
            return 2
        use_tls = args.tls
    else:
        peer = config.remote(args.peer)
        if peer is None:
            print(f"dicom-ai: {args.peer!r} is neither AE@HOST:PORT nor the AE title of a [[peers]] or "
                  f"[[destinations]] entry{' of ' + str(args.config) if args.config else ' (give --config)'}",
                  file=sys.stderr)
            return 2
        use_tls = args.tls or peer.tls
    context = None
    if use_tls:
        tls = dataclasses.replace(config.tls, certificate=args.certificate or config.tls.certificate,
                                  private_key=args.private_key or config.tls.private_key,
                                  ca_bundle=args.ca_bundle or config.tls.ca_bundle,
                                  min_version=args.min_version or config.tls.min_version)
        for key, option in (("certificate", "--certificate"), ("private_key", "--private-key"),
                            ("ca_bundle", "--ca-bundle")):
            if not getattr(tls, key):
                print(f"dicom-ai: --tls needs tls.{key} in --config or {option}", file=sys.stderr)
                return 2
        try:
            context = client_context(tls)
        except ConfigError as exc:
            print(f"dicom-ai: configuration error: {exc}", file=sys.stderr)
            return 2
    ae = AE(ae_title=args.ae_title or config.node.ae_title)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                         tls_args=(context, peer.host) if context is not None else None)
    shown = f"{peer.ae_title}@{peer.host}:{peer.port}{' (TLS)' if context is not None else ''}"
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "could not be reached or aborted"
        if not assoc.is_rejected and context is not None:
            found = probe_handshake(context, peer.host, peer.port, args.timeout)
            if found is not None:
                why = f"TLS handshake failed ({found[0]}): {found[1]}"
        print(f"echo {shown}: FAILED ({peer.ae_title} {why})" if not why.startswith("TLS") else
              f"echo {shown}: FAILED ({why})")
        return 1
    version = assoc.dul.socket.socket.version() if context is not None else None
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if "Status" in status else None
    if code == 0:
        print(f"echo {shown}: success{f' over {version}' if version else ''}")
        return 0
    print(f"echo {shown}: FAILED (status {code if code is None else hex(code)})")
    return 1
