"""Which job store a process opens: ``[jobstore] url`` (SQLite in the storage folder, or PostgreSQL)."""

from __future__ import annotations

from dicom_ai.core.errors import JobStoreError
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.jobstore import JobStore, SqlJobStore
from dicom_ai.node.jobstore_postgres import PostgresJobStore

__all__ = ["open_jobstore", "is_postgres_url"]


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_jobstore(config: NodeConfig) -> SqlJobStore:
    """The job store of this configuration: ``jobstore.url`` empty is the embedded SQLite file
    ``<storage>/jobs.sqlite``; ``postgresql://...`` is the shared PostgreSQL database.

    Raises
    ------
    JobStoreError
        An unknown URL scheme or a schema newer than this version.
    """
    j = config.jobstore
    if not j.url:
        return JobStore(config.layout.jobstore)
    if is_postgres_url(j.url):
        return PostgresJobStore(j.url, pool_size=j.pool_size, connect_timeout=j.connect_timeout_seconds)
    raise JobStoreError(f"jobstore.url must be empty (SQLite in the storage folder) or postgresql://..., got "
                        f"{j.url.split(':', 1)[0]}://...")
