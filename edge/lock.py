"""One edge-classify per output folder: an exclusive ``flock`` on ``OUT/edge-classify.lock``.

The kernel drops the lock when its process dies (even by ``kill -9``), so a stale lock
never blocks a restart. The file holds the owner's pid, host and start time, so the
refusal can say who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from lowmag.errors import LowmagError

LOCK_NAME = "edge-classify.lock"


class OutputLockedError(LowmagError):
    """Another edge-classify process is writing to this output folder."""


class OutputLock:
    """Hold it for as long as the process writes to ``out`` (a context manager)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = holder(self.path.parent) or {}
            raise OutputLockedError(
                f"{self.path.parent}: another edge-classify (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}, started {owner.get('started', '?')}) is already writing here. "
                "Stop it first (systemctl stop lowmag-edge, or kill that pid), or choose another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(out: Path) -> dict | None:
    """Who holds the lock on ``out`` (pid, host, started), or None when nobody does."""
    path = Path(out) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
