"""Decoding untrusted pixel data in a process of its own, so a bad image cannot kill the worker.

A received image's compressed Pixel Data goes to codecs written in C and Rust (OpenJPEG,
CharLS, libjpeg, pylibjpeg-rle). A corrupt stream can make one of them panic (a pyo3
``PanicException``, which is a ``BaseException``), crash the process, allocate without bound
or never return. :class:`DecodeSandbox` runs the decoding in a child process that

* is a fresh interpreter (``subprocess``, never a fork of the worker with torch loaded) that
  imports only pydicom, numpy and the codecs;
* limits its own address space (``RLIMIT_AS``, ``[limits] decode_memory_mb``), so a stream
  that declares a huge image fails with ``MemoryError`` in the child;
* is given ``[limits] decode_timeout_seconds`` per image and is killed when it takes longer;
* reads one spooled file per request, decompresses it with pydicom
  (:meth:`pydicom.dataset.Dataset.decompress`) and writes the native Pixel Data into a
  private folder under the storage directory (folder 0700, file 0600), which the worker reads
  back and deletes;
* is started again for the next image when it died.

One child serves all images of a job; its start (about 0.3 s) is paid once per job, and each
image then costs one file read and one write of its decoded pixels (see the report in
``tests/test_worker_isolation.py``). The worker gives the pipeline the data set it read, with
the decoded native Pixel Data in place of the compressed one and the Image Pixel attributes
:meth:`~pydicom.dataset.Dataset.decompress` changes, so the models see exactly what
``ds.pixel_array`` would have given.

The child writes nothing to stdout or stderr: its replies travel on a private pipe, its
warnings and pydicom's log records are handed back in the reply (the worker logs them
scrubbed), and its stderr is discarded (a Rust panic prints there).

Run as ``python -P dicom_ai/node/sandbox.py`` (by :class:`DecodeSandbox`); ``-P`` keeps this
folder off ``sys.path`` so no module of the node is imported into the child.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import VR

from dicom_ai.core.errors import ImagingError

__all__ = ["DecodeFailed", "DecodeSandbox", "WarningSink", "needs_sandbox"]


class DecodeFailed(ImagingError):
    """The pixel data of one image cannot be decoded.

    ``reason`` says how (``codec_error``: the codec raised or panicked on the bytes;
    ``decode_memory``: over ``[limits] decode_memory_mb``; ``decoder_crashed``: the child
    died of a signal or exit status; ``decode_timeout``: over ``[limits]
    decode_timeout_seconds``). ``repeatable`` is True when the same bytes under the same limits
    fail the same way (a codec error, a panic, the memory limit, a crash by a signal other than
    SIGKILL): retrying the job cannot change it. A timeout depends on the machine's load and a
    SIGKILL may come from outside (the kernel's OOM killer), so those are not.
    """

    def __init__(self, message: str, reason: str, repeatable: bool):
        super().__init__(message)
        self.reason = reason
        self.repeatable = repeatable

#: ``sink(message, category_name, filename, lineno)`` receives each warning or pydicom log
#: record of the child; its text may hold data set values and must be scrubbed by the sink.
WarningSink = Callable[[str, str, str, int], None]

def needs_sandbox(ds: pydicom.Dataset) -> bool:
    """Whether ``ds`` has encapsulated (compressed) Pixel Data, which only the sandbox decodes.

    Native Pixel Data is turned into an array by numpy alone (no codec), so it is read in
    the worker as before.
    """
    tsyntax = ds.get("file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    return "PixelData" in ds and tsyntax is not None and pydicom.uid.UID(tsyntax).is_compressed


class DecodeSandbox:
    """A child process that decodes compressed Pixel Data under memory and time limits.

    Parameters
    ----------
    scratch : Path
        Where the decoded pixels pass through a private folder ``<scratch>/<pid>-*`` (mode
        0700) that :meth:`close` removes; the node's is ``StorageLayout.decode_scratch``, on
        the storage file system (patient data stays where the node keeps it).
    memory_mb : int
        Address-space limit of the child, in MiB (``[limits] decode_memory_mb``).
    timeout_seconds : float
        Wall-clock limit of one image's decoding, in seconds (``[limits] decode_timeout_seconds``).
    on_warning : WarningSink or None
        Receives the child's warnings and pydicom log records (unscrubbed text).

    Use as a context manager, one per job::

        with DecodeSandbox(config.layout.decode_scratch, 4096, 120) as sandbox:
            ds = sandbox.decode(pydicom.dcmread(path), path)
    """

    def __init__(self, scratch: Path, memory_mb: int, timeout_seconds: float,
                 on_warning: WarningSink | None = None):
        self.memory_mb = int(memory_mb)
        self.timeout_seconds = float(timeout_seconds)
        self.on_warning = on_warning
        scratch = Path(scratch)
        scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            _remove_stale(scratch)
        except OSError:
            pass  # a folder another worker removes at the same moment
        self.folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=scratch))  # mode 0700
        self._proc: subprocess.Popen | None = None
        self._count = 0
        #: Child processes started so far (1 unless a decode killed one).
        self.starts = 0

    def __enter__(self) -> DecodeSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child and remove the scratch folder."""
        self._stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def decode(self, ds: pydicom.Dataset, path: str | Path) -> pydicom.Dataset:
        """``ds`` (read from ``path``) with its compressed Pixel Data replaced by the decoded native data.

        Parameters
        ----------
        ds : pydicom.Dataset
            The data set as read from ``path``; changed in place (Pixel Data, Transfer Syntax
            UID, and the Image Pixel attributes decompression changes) and returned.
        path : str or Path
            The spooled file the child reads.

        Raises
        ------
        DecodeFailed
            The pixel data cannot be decoded: the codec raised (its type and message, which
            may quote values and must be scrubbed before it is stored), panicked, crashed,
            ran out of memory or time. The child is restarted for the next image.
        """
        if not needs_sandbox(ds):
            return ds
        self._count += 1
        out = self.folder / f"{self._count}.raw"
        reply = self._request({"path": str(path), "out": str(out)})
        try:
            for w in reply.get("warnings", []):
                if self.on_warning is not None:
                    self.on_warning(str(w[0]), str(w[1]), str(w[2]), int(w[3]))
            if not reply.get("ok"):
                reason, repeatable = _classify(reply)
                raise DecodeFailed(f"pixel data cannot be decoded: {reply.get('error')}: {reply.get('message', '')}",
                                   reason, repeatable)
            data = out.read_bytes()
        finally:
            out.unlink(missing_ok=True)
        if len(data) != reply["bytes"]:  # the scratch disk, not the image
            raise DecodeFailed("pixel data cannot be decoded: the decoder's output is incomplete", "decoder_output",
                               False)
        _apply(ds, data, reply)
        return ds

    # -- the child process ----------------------------------------------------------------

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        # One thread per math library: the address-space limit counts every thread's arena.
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.starts += 1
        return subprocess.Popen(
            [sys.executable, "-P", str(Path(__file__).resolve()), "--memory-mb", str(self.memory_mb),
             "--timeout-seconds", str(self.timeout_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def _request(self, request: dict) -> dict:
        """Send one request and wait for its reply; a child that fails to answer is replaced."""
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            self._proc = self._start()
        proc = self._proc
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
        except OSError:
            return self._died(proc)
        deadline = time.monotonic() + self.timeout_seconds
        line = b""
        fd = proc.stdout.fileno()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._stop()
                return {"ok": False, "error": "DecodeTimeout",
                        "message": f"decoding took longer than {self.timeout_seconds:g} s "
                                   "([limits] decode_timeout_seconds); the decoder was stopped"}
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return self._died(proc)
            line += chunk
        reply = json.loads(line)
        if reply.get("restart"):  # the child caught a panic: do not trust it with the next image
            self._stop()
        return reply

    def _died(self, proc: subprocess.Popen) -> dict:
        proc.kill()
        code = proc.wait()
        self._stop()
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return {"ok": False, "error": "DecoderCrashed", "message": f"the decoder process ended ({how})",
                "killed": code == -signal.SIGKILL}


def _classify(reply: dict) -> tuple[str, bool]:
    """(reason, repeatable) of a failed decode reply (see :class:`DecodeFailed`)."""
    error = reply.get("error")
    if error == "DecodeTimeout":
        return "decode_timeout", False
    if error == "DecoderCrashed":
        return "decoder_crashed", not reply.get("killed")
    if error == "MemoryError":
        return "decode_memory", True
    return "codec_error", True


def _apply(ds: pydicom.Dataset, data: bytes, reply: dict) -> None:
    # What Dataset.decompress() changes, with the values the child's decompress() set.
    elem = ds["PixelData"]
    elem.value = data
    elem.is_undefined_length = False
    elem.VR = VR.OB if ds.BitsAllocated <= 8 else VR.OW
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation = reply["photometric_interpretation"]
    if reply.get("planar_configuration") is not None:
        ds.PlanarConfiguration = reply["planar_configuration"]
    if reply.get("number_of_frames") is not None:
        ds.NumberOfFrames = reply["number_of_frames"]


def _remove_stale(scratch: Path) -> None:
    """Remove scratch folders of sandboxes whose worker is gone (after a SIGKILL)."""
    for folder in scratch.iterdir():
        pid = folder.name.partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # another user's process: not ours to clean


class _Records(logging.Handler):
    # pydicom's logger, collected into the reply instead of printed.
    def __init__(self, sink: list):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = ""
        self.sink.append([text, f"log.{record.levelname}", record.pathname, record.lineno])


def _decode_one(request: dict, collected: list) -> dict:
    ds = pydicom.dcmread(request["path"])
    ds.decompress()
    data = ds.PixelData
    fd = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return {"ok": True, "bytes": len(data), "photometric_interpretation": str(ds.PhotometricInterpretation),
            "planar_configuration": int(ds.PlanarConfiguration) if "PlanarConfiguration" in ds else None,
            "number_of_frames": int(ds.NumberOfFrames) if "NumberOfFrames" in ds else None}


def _child_main(argv: list[str]) -> int:
    memory = int(argv[argv.index("--memory-mb") + 1]) * 1024 * 1024
    timeout = float(argv[argv.index("--timeout-seconds") + 1])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # The worker kills a child that overruns; these end it when the worker cannot (it was
    # SIGKILLed mid-decode): SIGKILL when the parent dies, and SIGALRM's default action (end
    # the process) shortly after the worker's own timeout, even inside a codec's C loop.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    # Replies go on a private copy of stdout; anything a library prints goes to stderr (discarded).
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    collected: list = []
    logger = logging.getLogger("pydicom")
    logger.handlers[:] = [_Records(collected)]
    logger.propagate = False
    for line in sys.stdin:
        collected.clear()
        restart = False
        signal.alarm(math.ceil(timeout) + 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                reply = _decode_one(json.loads(line), collected)
            except Exception as exc:
                reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)[:1000]}
            except BaseException as exc:  # a Rust panic (pyo3 PanicException) is not an Exception
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)[:1000]}
                restart = True
        signal.alarm(0)
        reply["warnings"] = [[str(w.message), w.category.__name__, w.filename, w.lineno] for w in caught] + collected
        reply["restart"] = restart
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
        if restart:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv))
