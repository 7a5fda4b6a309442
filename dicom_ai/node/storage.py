"""Where the node keeps everything on disk, and how a file is made durable there.

One :class:`StorageLayout` names every folder and file under ``node.storage``; the SCP, the
worker, the supervisor's retention purge, ``dicom-ai status`` and the demo all ask it rather
than spell paths themselves::

    <storage>/
        jobs.sqlite                      the job store (SQLite, WAL), unless [jobstore] url is PostgreSQL
        storage-id                       this storage's random identity (node and workers compare it)
        node-config.json                 the effective configuration handed to the worker
        incoming/                        C-STOREs being received (deleted at start-up)
        spool/<Study UID>/<SOP UID>.dcm  accepted instances, exactly as received
        outbox/job-<id>/<SOP UID>.dcm    result objects of a job, durable before delivery
        previews/job-<id>/<SOP UID>.png  preview PNGs for IT quality checks
        decode-scratch/<pid>-*/          decoded pixels on their way from the decode sandbox
        logs/node.log                    JSON lines (no patient data)

Durability: a file is written to a temporary name, fsynced, renamed, and its folder fsynced
(:func:`write_durably`), so after a power loss it is either complete or absent.

Privacy: everything under the storage root holds patient data or points at it, so it is
readable by the node's user only. The node and worker processes run with umask
:data:`PRIVATE_UMASK` (files 0600, folders 0700) and tighten, at start-up, whatever an older
version left readable (:func:`make_private`).

Trouble: a full disk or a job store that cannot be written is a state the node waits out, not
a crash; :func:`is_storage_error` tells those errors from bugs.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PRIVATE_UMASK", "StorageLayout", "ensure_storage_id", "fsync_dir", "fsync_file", "is_disk_full",
           "is_storage_error", "make_private", "read_storage_id", "write_durably"]

#: The umask of the node and worker processes: new files 0600, new folders 0700.
PRIVATE_UMASK = 0o077

# OSError numbers that mean "the storage cannot take this write now", not "the code is wrong".
# EIO is left out on purpose: a spool file on a bad sector would then be retried for ever
# instead of failing its job.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

# sqlite3.OperationalError messages of the same kind ("database or disk is full", "disk I/O
# error", "database is locked" after the busy timeout, "unable to open database file" when
# the -shm/-wal file cannot be created).
_SQLITE_STORAGE_MESSAGES = ("full", "disk i/o", "locked", "unable to open", "busy")


@dataclass(frozen=True)
class StorageLayout:
    """The folders and files under one node's storage root (an absolute path)."""

    root: Path

    @property
    def jobstore(self) -> Path:
        return self.root / "jobs.sqlite"

    @property
    def storage_id(self) -> Path:
        return self.root / "storage-id"

    @property
    def config_json(self) -> Path:
        return self.root / "node-config.json"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def spool_study(self, study_uid: str) -> Path:
        """Folder of one study's received instances (``study_uid`` is a checked UID)."""
        return self.spool / study_uid

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    def outbox_for(self, job_id: int | str) -> Path:
        return self.outbox / f"job-{job_id}"

    @property
    def previews(self) -> Path:
        return self.root / "previews"

    def previews_for(self, job_id: int | str) -> Path:
        return self.previews / f"job-{job_id}"

    def job_folders(self, job_id: int | str) -> tuple[Path, Path]:
        """Everything a job wrote: its outbox and its previews (removed together on purge)."""
        return self.outbox_for(job_id), self.previews_for(job_id)

    @property
    def decode_scratch(self) -> Path:
        """Private folders through which the decode sandbox hands decoded pixels to the worker."""
        return self.root / "decode-scratch"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def default_log_file(self) -> Path:
        return self.logs / "node.log"


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(target: Path, write: Callable[[Path], None]) -> Path:
    """Write ``target`` atomically: ``write(tmp)``, fsync, rename over ``target``, fsync the folder.

    ``write`` receives the temporary path (``<target name>.<random>.tmp`` beside it) and must
    create it. The name is unique per call: on shared storage a worker that lost its claim and
    the worker re-running the job may write the same result at once, and neither may rename
    the other's half-written file.
    """
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    write(tmp)
    fsync_file(tmp)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return target


def is_storage_error(exc: BaseException) -> bool:
    """True for an error of the storage rather than of the code: disk full, quota, I/O, a locked
    or unwritable job store (:class:`sqlite3.OperationalError`), which the caller should back
    off from and retry, never count against a job or a delivery."""
    if isinstance(exc, sqlite3.OperationalError):
        message = str(exc).lower()
        return any(m in message for m in _SQLITE_STORAGE_MESSAGES)
    if any(c.__name__ == "OperationalError" and c.__module__.startswith("psycopg") for c in type(exc).__mro__):
        # PostgreSQL unreachable or restarting (psycopg.OperationalError, psycopg_pool.PoolTimeout),
        # or a transaction that lost a deadlock or serialization race: all pass when retried.
        # Matched by class name so this module does not import psycopg for SQLite sites.
        return True
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left" (ENOSPC, EDQUOT, SQLite's "database or disk is full")."""
    if isinstance(exc, sqlite3.OperationalError):
        return "full" in str(exc).lower()
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def make_private(root: Path) -> int:
    """Remove group and other permissions from ``root`` and everything under it; returns how
    many entries were changed.

    Files keep their owner bits (0644 becomes 0600), folders become 0700. Symbolic links are
    neither followed nor changed. Never raises: an entry that cannot be changed (another
    owner, a read-only mount) is skipped, so a start-up is never stopped by it.

    Parameters
    ----------
    root : Path
        The storage root.
    """
    changed = 0

    def tighten(path: str, folder: bool) -> None:
        nonlocal changed
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                return
            mode = stat.S_IMODE(st.st_mode)
            wanted = 0o700 if folder else mode & 0o700
            if mode != wanted:
                os.chmod(path, wanted)
                changed += 1
        except OSError:
            pass

    if not os.path.isdir(root):
        return 0
    tighten(str(root), True)
    for folder, dirs, files in os.walk(root, onerror=lambda exc: None):
        for name in dirs:
            tighten(os.path.join(folder, name), True)
        for name in files:
            tighten(os.path.join(folder, name), False)
    return changed


def ensure_storage_id(layout: StorageLayout) -> str:
    """This storage's identity: read ``<storage>/storage-id``, or write a new random one (the node, at start).

    Workers on other hosts compare it with the one the node recorded in the job store
    (:func:`read_storage_id`), so a shared path that is not mounted, or mounted from another
    server, is found before any job runs.
    """
    existing = read_storage_id(layout)
    if existing:
        return existing
    new = uuid.uuid4().hex
    write_durably(layout.storage_id, lambda tmp: tmp.write_text(new + "\n"))
    return new


def read_storage_id(layout: StorageLayout) -> str | None:
    """The identity in ``<storage>/storage-id``, or None when there is none (yet)."""
    try:
        return layout.storage_id.read_text().strip() or None
    except FileNotFoundError:
        return None
