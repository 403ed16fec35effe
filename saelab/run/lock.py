"""One stage at a time on a run folder: an exclusive `fcntl.flock` on `<run>/.saelab.lock`, held for the stage's
whole duration (its checks, its work and its manifest update).

A second saelab process that starts a stage on the same run fails at once with one line naming the run, the stage
that holds the lock and its pid. It does not wait: the stage holding the lock may be a training run of hours, and a
stage that waited would start on artifacts that changed under it (or refuse then, after the wait); a script that
means to run stages one after another runs them one after another. The kernel drops the lock when its process
exits, killed or not, so a stale lock never blocks a run; the file itself stays (removing it would let two processes
lock two different files).

    with RunLock(Path("runs/r1"), "eval") as lock:   # RunBusyError when another process holds it
        ...
        lock.announce("cache")                        # `saelab demo` names each stage as it runs it
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from saelab.run.manifest import RunError

LOCK = ".saelab.lock"
"""The lock file, in the run folder."""


class RunBusyError(RuntimeError):
    """Another saelab process runs a stage on this run folder."""


class RunLock:
    """The exclusive lock of a run folder, held from `__enter__` to `__exit__` (see the module docstring)."""

    def __init__(self, folder: Path, stage: str) -> None:
        self.folder = folder
        self.path = folder / LOCK
        self.stage = stage
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if not os.access(self.folder, os.W_OK):
            raise RunError(
                f"run folder {self.folder} is not writable; make it writable or copy the run to a writable place"
            )
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunBusyError(
                f"run {self.folder} is busy: {holder} holds its lock ({LOCK}); run {self.stage} again when it "
                "has finished, or on another --run-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.announce(self.stage)
        return self

    def announce(self, stage: str) -> None:
        """Name `stage` as the one holding the lock (what a refused second process reports)."""
        if self._fd is None:
            return
        self.stage = stage
        holder = {
            "stage": stage,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # no stale holder for the next reader
            os.close(self._fd)  # releases the lock
            self._fd = None


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it down (it may not have yet)."""
    try:
        h = json.loads(os.pread(fd, 4096, 0))
        return f"stage {h['stage']!r} (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another saelab process"
