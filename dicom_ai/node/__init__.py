"""node: the DICOM node itself, what radiology IT installs, configures and watches.

Owns the configuration (:mod:`~dicom_ai.node.config`, ``node.toml``), the storage layout and
durable writes (:mod:`~dicom_ai.node.storage`), the job store (:mod:`~dicom_ai.node.jobstore`:
SQLite, or :mod:`~dicom_ai.node.jobstore_postgres` chosen by :mod:`~dicom_ai.node.engines`), the
Celery dispatch to workers on other hosts (:mod:`~dicom_ai.node.dispatch`; the worker side,
:mod:`~dicom_ai.node.celery_worker`, is not imported here), the Storage SCP (:mod:`~dicom_ai.node.scp`) with its network layer
(:mod:`~dicom_ai.node.transport`) and its checks of what it accepts (:mod:`~dicom_ai.node.admission`),
result delivery with retries
(:mod:`~dicom_ai.node.delivery`), the supervisor that assembles studies into jobs and keeps the
worker alive (:mod:`~dicom_ai.node.supervisor`), the inference worker process
(:mod:`~dicom_ai.node.worker`) with what it does to one job (:mod:`~dicom_ai.node.processing`),
and the structured logs (:mod:`~dicom_ai.node.logs`).

May import: :mod:`dicom_ai.core`, and in the worker only :mod:`dicom_ai.networks` and
:mod:`dicom_ai.results`; pynetdicom, pydicom, sqlite3, psycopg, celery. The receiving process (supervisor, SCP,
job store, delivery) must not import torch, highdicom or the writers, so it stays small and
starts fast: this ``__init__`` therefore does not import :mod:`~dicom_ai.node.worker`, which
runs as its own process (``python -m dicom_ai.node.worker``).
"""

from dicom_ai.node.config import NodeConfig, RemoteNode, load_config, parse_remote
from dicom_ai.node.delivery import DeliveryAgent, DeliveryThread
from dicom_ai.node.jobstore import STANDARD_VIEWS, Delivery, Instance, Job, JobStore, SqlJobStore
from dicom_ai.node.scp import SUPPORTED_SOP_CLASSES, SUPPORTED_TRANSFER_SYNTAXES, StorageSCP
from dicom_ai.node.storage import StorageLayout, fsync_dir, write_durably
from dicom_ai.node.supervisor import Node, make_result_uids, serve

__all__ = [
    "NodeConfig", "RemoteNode", "load_config", "parse_remote",
    "StorageLayout", "fsync_dir", "write_durably",
    "JobStore", "SqlJobStore", "Instance", "Job", "Delivery", "STANDARD_VIEWS",
    "StorageSCP", "SUPPORTED_SOP_CLASSES", "SUPPORTED_TRANSFER_SYNTAXES",
    "DeliveryAgent", "DeliveryThread",
    "Node", "serve", "make_result_uids",
]
