"""One writer per output folder: an exclusive ``flock`` on ``<folder>/.twinflow.lock``.

Two training runs on one folder would delete each other's temporary checkpoint folders and
interleave ``metrics.jsonl``. The kernel drops an ``flock`` when its process ends, however
it ends (SIGKILL included), so a lock file left behind by a dead run is stale by
construction: the next run takes it. The file holds the owner's PID for the message.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
from typing import Optional

LOCK_NAME = ".twinflow.lock"


class OutputDirLocked(ValueError):
    """Another live process holds the folder."""


class OutputDirLock:
    """``with OutputDirLock(folder):`` or ``acquire()``/``release()``; OutputDirLocked (a
    ValueError) naming the other run's PID when the folder is taken."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputDirLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputDirLocked(f"output folder {self.folder} is in use by another twinflow run (PID {owner}); "
                                  "wait for it to finish or choose another --output-dir") from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing drops the flock

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
