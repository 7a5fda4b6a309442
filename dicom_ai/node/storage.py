"""Where the node keeps everything on disk, and how a file is made durable there.

One :class:`StorageLayout` names every folder and file under ``node.storage``; the SCP, the
worker, the supervisor's retention purge, ``dicom-ai status`` and the demo all ask it rather
than spell paths themselves::

    <storage>/
        jobs.sqlite                      the job store (SQLite, WAL)
        node-config.json                 the effective configuration handed to the worker
        incoming/                        C-STOREs being received (deleted at start-up)
        spool/<Study UID>/<SOP UID>.dcm  accepted instances, exactly as received
        outbox/job-<id>/<SOP UID>.dcm    result objects of a job, durable before delivery
        previews/job-<id>/<SOP UID>.png  preview PNGs for IT quality checks
        logs/node.log                    JSON lines (no patient data)

Durability: a file is written to a temporary name, fsynced, renamed, and its folder fsynced
(:func:`write_durably`), so after a power loss it is either complete or absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StorageLayout", "fsync_dir", "fsync_file", "write_durably"]


@dataclass(frozen=True)
class StorageLayout:
    """The folders and files under one node's storage root (an absolute path)."""

    root: Path

    @property
    def jobstore(self) -> Path:
        return self.root / "jobs.sqlite"

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

    ``write`` receives the temporary path (``target`` with suffix ``.tmp``) and must create it.
    """
    tmp = target.with_suffix(".tmp")
    write(tmp)
    fsync_file(tmp)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return target
