"""Node configuration: a TOML file with a default for every key, overridden by CLI flags.

Example ``node.toml`` (every key shown with its default, except peers/destinations)::

    [node]
    ae_title = "DICOM_AI"
    bind_address = "127.0.0.1"     # "0.0.0.0" to listen on every interface
    port = 11112
    storage = "dicom-ai-storage"   # spool, job store, outbox, previews, logs; relative to this
                                    # file; unset under the shipped systemd units: $STATE_DIRECTORY
                                    # (/var/lib/dicom-ai)
    allow_any_caller = false        # true: accept associations from any calling AE title
    max_associations = 10
    max_pdu_size = 1048576          # bytes; 0 = unlimited
    reserve_free_mb = 512           # refuse C-STORE (Out of Resources) below this free space
    retention_days = 30.0           # delete finished studies' files after this; 0 = keep forever

    [[peers]]                       # may send studies; results go back to the sender
    ae_title = "PACS"
    host = "10.0.0.5"
    port = 104
    tls = false                     # true: results go to it over DICOM TLS ([tls] keys)
    require_address = false         # true: this AE title is accepted only from host's addresses
    certificate_subject = ""        # TLS: the client certificate's CN or a SAN must equal this
    objects = []                    # result objects it gets: SEG, SR, CAD_SR, GSPS, SC; [] = all

    [[destinations]]                # optional extra result destinations (tls as for peers)
    ae_title = "ARCHIVE"
    host = "10.0.0.6"
    port = 104

    [[destinations]]                # a DICOMweb destination: STOW-RS to url instead of host/port
    ae_title = "WEBPACS"            # its name in status and logs (unique like an AE title)
    url = "http://10.0.0.7:8042/dicom-web"  # the DICOMweb base URL (QIDO-RS for objects in doubt)
    objects = ["SR", "GSPS"]        # optional, as for peers

    [tls]                           # DICOM TLS (PS3.15 Annex B, BCP 195 profile)
    port = 0                        # TLS listener beside node.port; 0 = none
    plain_port = true               # false: no plain listener, TLS only (node.port unused)
    certificate = ""                # PEM certificate (chain) of the node
    private_key = ""                # PEM private key of that certificate (owner-readable only)
    ca_bundle = ""                  # PEM CA certificates trusted for peers (client and server side)
    require_client_certificate = true   # refuse TLS callers without a certificate from ca_bundle
    min_version = "1.2"             # "1.2" or "1.3"

    [audit]                         # IHE ATNA / PS3.15 A.5 audit messages as RFC 5424 syslog
    sink = "file"                   # off | file | udp | tcp | tls
    file = ""                       # sink = "file": default <storage>/logs/audit.log (append only)
    host = "127.0.0.1"              # sink = udp/tcp/tls: the audit record repository
    port = 514                      # 6514 is usual for tls
    include_patient_ids = false     # true: Patient ID in ParticipantObjectIdentification
    source_id = ""                  # AuditSourceID; default node.ae_title
    enterprise_site_id = ""

    [http]                          # /metrics (Prometheus), /healthz, /readyz, / (status page)
    bind_address = "127.0.0.1"
    port = 0                        # 0 = no HTTP server, e.g. 9110 to turn it on

    [study]
    grace_seconds = 10              # wait after the fourth standard view
    idle_seconds = 120              # otherwise: a study is complete after this quiet time

    [pipeline]
    models = ["glam", "dunet", "microcalc"]
    device = "auto"                 # auto | cpu | cuda:N
    factory = ""                    # optional "module:callable" returning an object with .run()
    max_job_attempts = 3            # failures of the job itself (an exception) before it is failed
    max_job_interruptions = 50      # worker deaths during the job (SIGKILL, OOM, crash) before it is failed
    previews = true                 # PNG overlays per image in <storage>/previews/ for IT checks
    operating_point = ""            # each bundle's named operating point ("" = its default)
    precision = "fp32"              # fp32 | bf16 (CPU with native bf16, models measured within tolerance only)

    [results]                       # what the result objects look like (dicom_ai.results)
    segmentation_type = "BINARY"    # BINARY | FRACTIONAL
    compression = "none"            # none | jpeg2000 | rle | jpegls (the last two FRACTIONAL only)
    cad_sr = false                  # also send a Mammography CAD SR
    gsps = true                     # a Grayscale Softcopy Presentation State per image (outlines, labels)
    secondary_capture = false       # an "AI overlay" Secondary Capture per image (burned in, not for diagnosis)

    [limits]                        # what the node accepts from the network (conformance/)
    max_rows = 8192                 # refuse (0xA900) images with more rows / columns than this,
    max_columns = 8192              # before decoding: larger than any mammography detector
    max_pixels = 40000000           # rows x columns x frames
    max_dataset_mb = 512            # a received data set, inflated (Deflated TS), in MiB
    association_request_seconds = 10.0  # time a new connection has to send a complete A-ASSOCIATE-RQ
    idle_seconds = 60.0             # an established association silent this long is aborted
    max_connections_per_address = 4 # concurrent TCP connections from one IP address
    reserved_peer_associations = 2  # of node.max_associations, kept for configured peers' hosts
    decode_timeout_seconds = 120.0  # one image's decode + inference in the worker's sandbox
    decode_memory_mb = 4096         # address-space cap of that sandbox process, in MiB

    [retry]
    max_attempts = 8                # delivery attempts before a delivery is marked failed
    timeout_seconds = 30.0          # per destination: connect, association and each response
    initial_delay_seconds = 10
    max_delay_seconds = 600
    backoff_factor = 2.0

    [logging]
    level = "INFO"
    file = ""                       # default: <storage>/logs/node.log; reopened when logrotate moves it

    [jobstore]                      # README "Deployment past one machine"
    url = ""                        # "" = SQLite in the storage folder; "postgresql://user@host:5432/db"
    pool_size = 4                   # PostgreSQL connections per process
    connect_timeout_seconds = 5.0   # an operation waits this long for PostgreSQL, then backs off and retries

    [workers]                       # inference workers on other hosts (Celery); "" = one local worker child
    broker_url = ""                 # "redis://host:6379/0": the node enqueues, `dicom-ai worker` runs jobs
    queue = "dicom-ai"              # the Celery queue name
    lease_seconds = 60.0            # a running job whose worker has not renewed its lease this long is re-queued
    requeue_seconds = 300.0         # a queued job not claimed this long after its message is announced again
    visibility_timeout_seconds = 3600.0  # Redis: an unacknowledged message is redelivered after this
    deliver_on_workers = false      # true: workers also send results (the node always does)
    nice = 10                       # scheduling niceness of inference (0-19): reception goes first on shared cores

Every error names the offending key (``peers[1].port``) so the file can be fixed before the
node starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dicom_ai.core.device import DEVICE_SPELLINGS, check_device_spec, check_precision
from dicom_ai.core.errors import ConfigError, DeviceError
from dicom_ai.core.options import COMPRESSIONS, RESULT_OBJECTS, SEGMENTATION_TYPES, encoding_problem, result_object_kind
from dicom_ai.node.storage import StorageLayout


@dataclass(frozen=True)
class RemoteNode:
    """A DICOM application entity the node talks to."""

    ae_title: str
    host: str
    port: int
    #: Results go to it over DICOM TLS (the ``[tls]`` certificate, key and CA bundle).
    tls: bool = False
    #: Associations with this calling AE title are accepted only from ``host``'s addresses.
    require_address: bool = False
    #: With TLS: the client certificate's subject CN or one of its SANs must equal this.
    certificate_subject: str = ""
    #: A DICOMweb destination's base URL (STOW-RS; host is "" and port 0); "" for DICOM.
    url: str = ""
    #: The result object kinds it gets (:data:`dicom_ai.core.options.RESULT_OBJECTS`); () = all.
    objects: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.url}" if self.url else f"{self.ae_title}@{self.host}:{self.port}"

    def takes(self, sop_class_uid: str) -> bool:
        """Whether it gets result objects of this SOP class (``objects``; a class of no kind: yes)."""
        kind = result_object_kind(sop_class_uid)
        return not self.objects or kind is None or kind in self.objects


@dataclass
class NodeSection:
    ae_title: str = "DICOM_AI"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    storage: str = "dicom-ai-storage"
    allow_any_caller: bool = False
    max_associations: int = 10
    max_pdu_size: int = 1048576
    reserve_free_mb: int = 512
    retention_days: float = 30.0


@dataclass
class StudySection:
    grace_seconds: float = 10.0
    idle_seconds: float = 120.0


@dataclass
class PipelineSection:
    models: list[str] = field(default_factory=lambda: ["glam", "dunet", "microcalc"])
    device: str = "auto"
    factory: str = ""
    max_job_attempts: int = 3
    max_job_interruptions: int = 50
    previews: bool = True
    operating_point: str = ""
    precision: str = "fp32"


@dataclass
class ResultsSection:
    segmentation_type: str = "BINARY"
    compression: str = "none"
    cad_sr: bool = False
    gsps: bool = True
    secondary_capture: bool = False


@dataclass
class LimitsSection:
    max_rows: int = 8192
    max_columns: int = 8192
    max_pixels: int = 40_000_000
    max_dataset_mb: int = 512
    association_request_seconds: float = 10.0
    idle_seconds: float = 60.0
    max_connections_per_address: int = 4
    reserved_peer_associations: int = 2
    decode_timeout_seconds: float = 120.0
    decode_memory_mb: int = 4096


@dataclass
class RetrySection:
    max_attempts: int = 8
    timeout_seconds: float = 30.0
    initial_delay_seconds: float = 10.0
    max_delay_seconds: float = 600.0
    backoff_factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_delay_seconds, self.initial_delay_seconds * self.backoff_factor ** (attempt - 1))


@dataclass
class TlsSection:
    port: int = 0
    plain_port: bool = True
    certificate: str = ""
    private_key: str = ""
    ca_bundle: str = ""
    require_client_certificate: bool = True
    min_version: str = "1.2"


@dataclass
class AuditSection:
    sink: str = "file"
    file: str = ""
    host: str = "127.0.0.1"
    port: int = 514
    include_patient_ids: bool = False
    source_id: str = ""
    enterprise_site_id: str = ""


@dataclass
class HttpSection:
    bind_address: str = "127.0.0.1"
    port: int = 0


@dataclass
class LoggingSection:
    level: str = "INFO"
    file: str = ""


@dataclass
class JobstoreSection:
    url: str = ""
    pool_size: int = 4
    connect_timeout_seconds: float = 5.0


@dataclass
class WorkersSection:
    broker_url: str = ""
    queue: str = "dicom-ai"
    lease_seconds: float = 60.0
    requeue_seconds: float = 300.0
    visibility_timeout_seconds: float = 3600.0
    deliver_on_workers: bool = False
    nice: int = 10

    @property
    def distributed(self) -> bool:
        """Jobs go to Celery workers (a broker is configured) instead of a local worker child."""
        return bool(self.broker_url)


@dataclass
class NodeConfig:
    """The whole configuration; ``storage_dir`` and friends are derived paths."""

    node: NodeSection = field(default_factory=NodeSection)
    peers: list[RemoteNode] = field(default_factory=list)
    destinations: list[RemoteNode] = field(default_factory=list)
    study: StudySection = field(default_factory=StudySection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    results: ResultsSection = field(default_factory=ResultsSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    retry: RetrySection = field(default_factory=RetrySection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    tls: TlsSection = field(default_factory=TlsSection)
    audit: AuditSection = field(default_factory=AuditSection)
    http: HttpSection = field(default_factory=HttpSection)
    jobstore: JobstoreSection = field(default_factory=JobstoreSection)
    workers: WorkersSection = field(default_factory=WorkersSection)

    @property
    def storage_dir(self) -> Path:
        return Path(self.node.storage).resolve()

    @property
    def layout(self) -> StorageLayout:
        """Every folder and file under ``node.storage``."""
        return StorageLayout(self.storage_dir)

    @property
    def log_file(self) -> Path:
        return Path(self.logging.file).resolve() if self.logging.file else self.layout.default_log_file

    @property
    def audit_file(self) -> Path:
        return Path(self.audit.file).resolve() if self.audit.file else self.layout.root / "logs" / "audit.log"

    @property
    def tls_in_use(self) -> bool:
        """True when ``[tls]`` files are used: a TLS port, a ``tls = true`` peer or destination, or TLS audit."""
        return bool(self.tls.port or any(r.tls for r in (*self.peers, *self.destinations)) or self.audit.sink == "tls")

    def remote(self, ae_title: str) -> RemoteNode | None:
        """The configured peer or destination with this AE title, if any."""
        for r in (*self.peers, *self.destinations):
            if r.ae_title == ae_title:
                return r
        return None

    def peer(self, ae_title: str) -> RemoteNode | None:
        """The configured peer with this AE title, if any."""
        for p in self.peers:
            if p.ae_title == ae_title:
                return p
        return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "NodeConfig":
        return from_mapping(json.loads(text))


_SECTIONS = {"node": NodeSection, "study": StudySection, "pipeline": PipelineSection,
             "results": ResultsSection, "limits": LimitsSection, "retry": RetrySection, "logging": LoggingSection,
             "tls": TlsSection, "audit": AuditSection, "http": HttpSection,
             "jobstore": JobstoreSection, "workers": WorkersSection}
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TLS_VERSIONS = ("1.2", "1.3")
_AUDIT_SINKS = ("off", "file", "udp", "tcp", "tls")
_REMOTE_KEYS = ("ae_title", "host", "port", "tls", "require_address", "certificate_subject", "url", "objects")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Read ``path`` (TOML; None = defaults only), apply ``overrides`` and validate.

    ``overrides`` maps dotted keys (``node.port``) to values; the key ``peers`` takes a list
    of ``AE@HOST:PORT`` strings that replace file peers of the same AE title and add the rest.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {p} is not valid TOML: {exc}") from None
        base = p.resolve().parent
        storage = data.get("node", {}).get("storage") if isinstance(data.get("node"), dict) else None
        if isinstance(storage, str) and not Path(storage).is_absolute():
            data["node"]["storage"] = str(base / storage)
        # Certificate and key files, like the storage, are relative to the file that names them.
        for section, name in (("tls", "certificate"), ("tls", "private_key"), ("tls", "ca_bundle"),
                              ("audit", "file")):
            value = data.get(section, {}).get(name) if isinstance(data.get(section), dict) else None
            if isinstance(value, str) and value and not Path(value).is_absolute():
                data[section][name] = str(base / value)
    node = data.get("node") if isinstance(data.get("node"), dict) else {}
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if "storage" not in node and state and Path(state).is_absolute():
        # Under systemd (the shipped units' StateDirectory=dicom-ai) the default storage is
        # /var/lib/dicom-ai, not a folder relative to the service's working directory.
        data.setdefault("node", {})["storage"] = state
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "peers":
            flag_peers = [parse_remote(v, "--peer") for v in value]
            names = {p.ae_title for p in flag_peers}
            kept = [p for p in data.get("peers", []) if not (isinstance(p, dict) and p.get("ae_title") in names)]
            data["peers"] = kept + [dataclasses.asdict(p) for p in flag_peers]
            continue
        section, _, name = key.partition(".")
        data.setdefault(section, {})[name] = value
    return from_mapping(data)


def from_mapping(data: dict[str, Any]) -> NodeConfig:
    """Validate a parsed TOML mapping into a NodeConfig (raises ConfigError naming the key)."""
    if not isinstance(data, dict):
        raise ConfigError("configuration must be a table of sections")
    cfg = NodeConfig()
    for section, value in data.items():
        if section in ("peers", "destinations"):
            if not isinstance(value, list):
                raise ConfigError(f"{section!r} must be an array of tables ([[{section}]])")
            setattr(cfg, section, [_remote(item, f"{section}[{i}]") for i, item in enumerate(value)])
        elif section in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{section!r} must be a table ([{section}])")
            setattr(cfg, section, _section(_SECTIONS[section], value, section))
        else:
            raise ConfigError(f"unknown section or key {section!r}; known: "
                              f"{', '.join(sorted([*_SECTIONS, 'peers', 'destinations']))}")
    _check(cfg)
    return cfg


def parse_remote(text: str, key: str = "peer") -> RemoteNode:
    """Parse ``AE@HOST:PORT`` (as given to ``--peer`` and ``dicom-ai echo``)."""
    m = re.fullmatch(r"(?P<ae>[^@]+)@(?P<host>[^:]+):(?P<port>[^:]+)", text.strip())
    if not m:
        raise ConfigError(f"{key} {text!r} must look like AE_TITLE@HOST:PORT, e.g. PACS@10.0.0.5:104")
    return _remote({"ae_title": m["ae"], "host": m["host"], "port": m["port"]}, f"{key} {text!r}",
                   port_from_text=True)


def _remote(item: Any, key: str, port_from_text: bool = False) -> RemoteNode:
    if not isinstance(item, dict):
        raise ConfigError(f"{key} must be a table with ae_title, host and port")
    unknown = set(item) - set(_REMOTE_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {key}.{sorted(unknown)[0]}; known: {', '.join(_REMOTE_KEYS)}")
    if item.get("url"):
        return _web_remote(item, key)
    for name in ("ae_title", "host", "port"):
        if name not in item:
            raise ConfigError(f"{key}.{name} is missing")
    port = item["port"]
    if port_from_text and isinstance(port, str) and port.isdigit():
        port = int(port)
    flags = {}
    for name in ("tls", "require_address"):
        if name in item:
            if not isinstance(item[name], bool):
                raise ConfigError(f"{key}.{name} must be true or false, got {item[name]!r}")
            flags[name] = item[name]
    subject = item.get("certificate_subject", "")
    if not isinstance(subject, str):
        raise ConfigError(f"{key}.certificate_subject must be a string, got {subject!r}")
    return RemoteNode(ae_title=_ae(item["ae_title"], f"{key}.ae_title"),
                      host=_host(item["host"], f"{key}.host"), port=_port(port, f"{key}.port"),
                      certificate_subject=subject.strip(), objects=_objects(item, key), **flags)


def _objects(item: dict[str, Any], key: str) -> tuple[str, ...]:
    value = item.get("objects", [])
    if not isinstance(value, (list, tuple)) or any(v not in RESULT_OBJECTS for v in value):
        raise ConfigError(f"{key}.objects must be a list of {', '.join(RESULT_OBJECTS)} ([] = all), got {value!r}")
    return tuple(dict.fromkeys(value))


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or any(c.isspace() for c in url):
        return "must be an http:// or https:// base URL with a host, e.g. http://10.0.0.7:8042/dicom-web"
    return None


def _web_remote(item: dict[str, Any], key: str) -> RemoteNode:
    """A ``[[destinations]]`` entry with ``url``: STOW-RS (host and port stay unset)."""
    if key.startswith("peer"):
        raise ConfigError(f"{key}.url: a peer sends by C-STORE and gets its results back by C-STORE; "
                          "put a DICOMweb server in [[destinations]]")
    extra = [n for n in ("host", "port", "tls", "require_address", "certificate_subject") if item.get(n)]
    if extra:
        raise ConfigError(f"{key}.{extra[0]} cannot be used with {key}.url (a DICOMweb destination)")
    if "ae_title" not in item:
        raise ConfigError(f"{key}.ae_title is missing (the destination's name in status and logs)")
    url = item["url"]
    problem = _url_problem(url) if isinstance(url, str) else "must be a string"
    if problem:
        raise ConfigError(f"{key}.url {url!r} {problem}")
    return RemoteNode(ae_title=_ae(item["ae_title"], f"{key}.ae_title"), host="", port=0, url=url,
                      objects=_objects(item, key))


def _section(cls: type, values: dict[str, Any], section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    obj = cls()
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(f"unknown key {section}.{name}; known keys in [{section}]: {', '.join(fields)}")
        default = getattr(obj, name)
        setattr(obj, name, _typed(value, default, f"{section}.{name}"))
    return obj


def _typed(value: Any, default: Any, key: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be a whole number, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key} must be a list of non-empty strings, got {value!r}")
        return list(value)
    raise ConfigError(f"{key}: unsupported value {value!r}")


def _ae(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise ConfigError(f"{key} must be an AE title of 1 to 16 printable ASCII characters "
                          f"without backslash, got {value!r}")
    return value.strip()


def _host(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise ConfigError(f"{key} must be a host name or IP address, got {value!r}")
    return value


def _port(value: Any, key: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (0 if allow_zero else 1) <= value <= 65535:
        raise ConfigError(f"{key} must be a TCP port number between 1 and 65535, got {value!r}")
    return value


def _check(cfg: NodeConfig) -> None:
    n = cfg.node
    n.ae_title = _ae(n.ae_title, "node.ae_title")
    # 0 lets the OS pick a free port (tests); the chosen port is logged at start-up.
    _port(n.port, "node.port", allow_zero=True)
    _host(n.bind_address, "node.bind_address")
    if not n.storage.strip():
        raise ConfigError("node.storage must name a directory")
    if n.max_associations < 1:
        raise ConfigError(f"node.max_associations must be at least 1, got {n.max_associations}")
    if n.max_pdu_size != 0 and n.max_pdu_size < 4096:
        raise ConfigError(f"node.max_pdu_size must be 0 (unlimited) or at least 4096, got {n.max_pdu_size}")
    if n.retention_days < 0:
        raise ConfigError(f"node.retention_days must not be negative (0 keeps everything), got {n.retention_days}")
    if n.reserve_free_mb < 0:
        raise ConfigError(f"node.reserve_free_mb must not be negative, got {n.reserve_free_mb}")
    seen: dict[str, str] = {n.ae_title: "node.ae_title"}
    for section in ("peers", "destinations"):
        for i, remote in enumerate(getattr(cfg, section)):
            key = f"{section}[{i}].ae_title"
            if remote.ae_title in seen:
                raise ConfigError(f"duplicate AE title {remote.ae_title!r}: {key} repeats {seen[remote.ae_title]}")
            seen[remote.ae_title] = key
    s = cfg.study
    if s.grace_seconds < 0 or s.idle_seconds <= 0:
        raise ConfigError("study.grace_seconds must be >= 0 and study.idle_seconds > 0, got "
                          f"{s.grace_seconds} and {s.idle_seconds}")
    p = cfg.pipeline
    if not p.models and not p.factory:
        raise ConfigError("pipeline.models is empty and pipeline.factory is not set: nothing to run")
    try:
        check_device_spec(p.device)
    except DeviceError:
        raise ConfigError(f"pipeline.device must be {DEVICE_SPELLINGS}, got {p.device!r}") from None
    try:
        check_precision(p.precision)
    except DeviceError:
        raise ConfigError(f"pipeline.precision must be 'fp32' or 'bf16', got {p.precision!r}") from None
    if p.factory and not re.fullmatch(r"[\w.]+:[\w.]+", p.factory):
        raise ConfigError(f"pipeline.factory must look like 'package.module:callable', got {p.factory!r}")
    if p.max_job_attempts < 1:
        raise ConfigError(f"pipeline.max_job_attempts must be at least 1, got {p.max_job_attempts}")
    if p.operating_point and not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", p.operating_point):
        raise ConfigError("pipeline.operating_point must be empty (each bundle's default) or a name of "
                          f"lower-case letters, digits, '.', '_' or '-', got {p.operating_point!r}")
    if p.max_job_interruptions < 1:
        raise ConfigError(f"pipeline.max_job_interruptions must be at least 1, got {p.max_job_interruptions}")
    res = cfg.results
    res.segmentation_type = res.segmentation_type.upper()
    if res.segmentation_type not in SEGMENTATION_TYPES:
        raise ConfigError(f"results.segmentation_type must be {' or '.join(SEGMENTATION_TYPES)}, "
                          f"got {res.segmentation_type!r}")
    if res.compression not in COMPRESSIONS:
        raise ConfigError(f"results.compression must be one of {', '.join(COMPRESSIONS)}, got {res.compression!r}")
    problem = encoding_problem(res.segmentation_type, res.compression)
    if problem is not None:
        raise ConfigError(f"results.compression = {res.compression!r} with results.segmentation_type = "
                          f"{res.segmentation_type}: {problem}")
    lim = cfg.limits
    for name in ("max_rows", "max_columns", "max_pixels", "max_dataset_mb", "max_connections_per_address",
                 "decode_memory_mb"):
        if getattr(lim, name) < 1:
            raise ConfigError(f"limits.{name} must be at least 1, got {getattr(lim, name)}")
    for name in ("association_request_seconds", "idle_seconds", "decode_timeout_seconds"):
        if getattr(lim, name) <= 0:
            raise ConfigError(f"limits.{name} must be a positive number of seconds, got {getattr(lim, name)}")
    if not 0 <= lim.reserved_peer_associations < n.max_associations:
        raise ConfigError(f"limits.reserved_peer_associations must be between 0 and node.max_associations - 1 "
                          f"({n.max_associations - 1}), got {lim.reserved_peer_associations}")
    r = cfg.retry
    if r.timeout_seconds <= 0:
        raise ConfigError(f"retry.timeout_seconds must be a positive number of seconds, got {r.timeout_seconds}")
    if r.max_attempts < 1:
        raise ConfigError(f"retry.max_attempts must be at least 1, got {r.max_attempts}")
    if r.initial_delay_seconds < 0 or r.max_delay_seconds < r.initial_delay_seconds or r.backoff_factor < 1:
        raise ConfigError("retry: need 0 <= initial_delay_seconds <= max_delay_seconds and backoff_factor >= 1")
    _check_tls(cfg)
    a = cfg.audit
    a.sink = a.sink.lower()
    if a.sink not in _AUDIT_SINKS:
        raise ConfigError(f"audit.sink must be one of {', '.join(_AUDIT_SINKS)}, got {a.sink!r}")
    if a.sink in ("udp", "tcp", "tls"):
        _host(a.host, "audit.host")
        _port(a.port, "audit.port")
    if a.sink == "tls" and not cfg.tls.ca_bundle:
        raise ConfigError("audit.sink = \"tls\" needs tls.ca_bundle (the CA that signed the collector's certificate)")
    h = cfg.http
    _host(h.bind_address, "http.bind_address")
    _port(h.port, "http.port", allow_zero=True)
    if h.port and h.port in (n.port, cfg.tls.port):
        # Caught here, not as "Address already in use" from serve without a key named.
        key = "node.port" if h.port == n.port else "tls.port"
        raise ConfigError(f"http.port {h.port} is {key} too: give the metrics/status server a port of its own")
    cfg.logging.level = cfg.logging.level.upper()
    if cfg.logging.level not in _LEVELS:
        raise ConfigError(f"logging.level must be one of {', '.join(_LEVELS)}, got {cfg.logging.level!r}")
    _check_scale_out(cfg)


def _check_scale_out(cfg: NodeConfig) -> None:
    j, w = cfg.jobstore, cfg.workers
    if j.url and not j.url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("jobstore.url must be empty (SQLite in the storage folder) or a PostgreSQL URL "
                          "(postgresql://user@host:5432/dbname)")
    if j.pool_size < 1 or j.connect_timeout_seconds <= 0:
        raise ConfigError("jobstore.pool_size must be at least 1 and jobstore.connect_timeout_seconds positive")
    if w.broker_url:
        if not w.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
            raise ConfigError("workers.broker_url must be a Redis URL (redis://host:6379/0 or rediss://...)")
        if not j.url:
            raise ConfigError("workers.broker_url needs jobstore.url = \"postgresql://...\": workers on other hosts "
                              "cannot share the embedded SQLite job store")
    if not re.fullmatch(r"[\w.-]{1,64}", w.queue):
        raise ConfigError(f"workers.queue must be 1-64 letters, digits, '.', '_' or '-', got {w.queue!r}")
    for name in ("lease_seconds", "requeue_seconds", "visibility_timeout_seconds"):
        if getattr(w, name) <= 0:
            raise ConfigError(f"workers.{name} must be a positive number of seconds, got {getattr(w, name)}")
    if isinstance(w.nice, bool) or not isinstance(w.nice, int) or not 0 <= w.nice <= 19:
        raise ConfigError(f"workers.nice must be a whole number from 0 (the receiver's priority) to 19 (lowest), "
                          f"got {w.nice!r}")
    if w.visibility_timeout_seconds < w.lease_seconds:
        raise ConfigError("workers.visibility_timeout_seconds must not be shorter than workers.lease_seconds: "
                          "Redis would hand a running job's message to a second worker while the first still "
                          "holds its lease")


def _check_tls(cfg: NodeConfig) -> None:
    t = cfg.tls
    _port(t.port, "tls.port", allow_zero=True)
    if t.min_version not in _TLS_VERSIONS:
        raise ConfigError(f"tls.min_version must be \"1.2\" or \"1.3\" (BCP 195: never below 1.2), "
                          f"got {t.min_version!r}")
    if not t.plain_port and not t.port:
        raise ConfigError("tls.plain_port = false needs tls.port: the node would not listen at all")
    if t.port and t.plain_port and t.port == cfg.node.port:
        raise ConfigError(f"tls.port {t.port} is node.port too: give the TLS listener a port of its own")
    users = [f"{s}[{i}].tls" for s in ("peers", "destinations") for i, r in enumerate(getattr(cfg, s)) if r.tls]
    if not t.port and not users and cfg.audit.sink != "tls":
        return
    why = "tls.port" if t.port else (users[0] if users else "audit.sink = \"tls\"")
    for name in ("certificate", "private_key", "ca_bundle"):
        value = getattr(t, name)
        if not value:
            raise ConfigError(f"tls.{name} is not set, and {why} needs it (a PEM file)")
        if not Path(value).is_file():
            raise ConfigError(f"tls.{name} = {value!r}: no such file")
