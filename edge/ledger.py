"""The ledger: a SQLite database (WAL) of every slide edge-classify has seen, in ``OUT/ledger.sqlite``.

One row per slide path: its size, mtime and content hash, its state (``queued``,
``processing``, ``done``, ``failed``), attempts, last error, and the result. The state
changes are single transactions, so after a crash or a power cut the ledger is as it was
at the last committed change:

- a slide left ``processing`` by a dead process goes back to ``queued`` when the next
  instance starts (its attempt is kept; one that keeps killing the process ends ``failed``);
- ``done`` is committed only after the result files are in place, so a result that exists
  for a ``queued`` slide is replaced, never trusted;
- a slide whose size or mtime changed (a new file under the same name) gets a new
  ``version`` and is queued again.

The watcher's lock (``lock.py``) ensures one writer; ``status`` reads concurrently.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

LEDGER_NAME = "ledger.sqlite"
SCHEMA_VERSION = 1
STATES = ("queued", "processing", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS slides (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    relative TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    state TEXT NOT NULL CHECK (state IN ('queued', 'processing', 'done', 'failed')),
    version INTEGER NOT NULL DEFAULT 1,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_kind TEXT,
    retry_after REAL,
    first_seen REAL NOT NULL,
    queued_at REAL,
    started_at REAL,
    finished_at REAL,
    label TEXT,
    confidence REAL,
    needs_review INTEGER,
    ms REAL,
    result TEXT,
    quarantined_to TEXT
);
CREATE INDEX IF NOT EXISTS slides_state ON slides (state, retry_after, queued_at);
"""


@dataclass(frozen=True)
class Job:
    """A claimed slide: enough to process it and to record the outcome."""

    id: int
    path: Path
    relative: str
    kind: str
    version: int
    attempts: int
    sha256: str | None


class Ledger:
    """Thread-safe access to the ledger (one connection, serialised by a lock)."""

    def __init__(self, out: Path, readonly: bool = False) -> None:
        self.path = Path(out) / LEDGER_NAME
        self._lock = threading.Lock()
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                      isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed 'done' survives power loss
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """Rows of a SELECT, fetched while the connection is held (threads share it)."""
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple = ()) -> int:
        """Run one change (its own transaction); returns the number of rows changed."""
        with self._lock:
            return self.db.execute(sql, args).rowcount

    # -- discovery ----------------------------------------------------------------
    def enqueue(self, path: Path, relative: str, kind: str, size: int, mtime_ns: int) -> str:
        """Record a complete slide; returns 'new', 'replaced' or 'known' (nothing to do)."""
        now = time.time()
        with self._lock:
            row = self.db.execute("SELECT id, size, mtime_ns, quarantined_to FROM slides WHERE path = ?",
                                  (str(path),)).fetchone()
            if row is None:
                self.db.execute(
                    "INSERT INTO slides (path, relative, kind, size, mtime_ns, state, first_seen, queued_at) "
                    "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)", (str(path), relative, kind, size, mtime_ns, now, now))
                return "new"
            if _same_file(row, size, mtime_ns):
                return "known"
            self.db.execute(
                "UPDATE slides SET relative = ?, kind = ?, size = ?, mtime_ns = ?, sha256 = NULL, state = 'queued', "
                "version = version + 1, attempts = 0, error = NULL, error_kind = NULL, retry_after = NULL, "
                "queued_at = ?, started_at = NULL, finished_at = NULL, label = NULL, confidence = NULL, "
                "needs_review = NULL, ms = NULL, result = NULL, quarantined_to = NULL WHERE id = ?",
                (relative, kind, size, mtime_ns, now, row["id"]))
            return "replaced"

    def unchanged(self, path: Path, size: int, mtime_ns: int) -> bool:
        """True when the ledger has this path with this size and mtime (nothing new to do)."""
        rows = self._query("SELECT size, mtime_ns, quarantined_to FROM slides WHERE path = ?", (str(path),))
        row = rows[0] if rows else None
        return row is not None and _same_file(row, size, mtime_ns)

    def requeue(self, path: Path, states: tuple[str, ...] = ("failed",)) -> bool:
        """Queue a slide again (``edge-classify run`` retries failures; ``--reprocess`` redoes all)."""
        marks = ",".join("?" * len(states))
        changed = self._write(
            f"UPDATE slides SET state = 'queued', attempts = 0, error = NULL, error_kind = NULL, retry_after = NULL, "
            f"queued_at = ? WHERE path = ? AND state IN ({marks})", (time.time(), str(path), *states))
        return changed > 0

    # -- processing -----------------------------------------------------------------
    def recover(self, max_attempts: int) -> tuple[int, int]:
        """After a crash: 'processing' rows go back to the queue, or fail after too many tries.

        Returns (requeued, failed).
        """
        now = time.time()
        with self._lock:
            failed = self.db.execute(
                "UPDATE slides SET state = 'failed', error_kind = 'interrupted', finished_at = ?, "
                "error = 'the process stopped while classifying this slide ' || attempts || ' times "
                "(crash, kill or power loss); it is not retried automatically' "
                "WHERE state = 'processing' AND attempts >= ?", (now, max_attempts)).rowcount
            requeued = self.db.execute(
                "UPDATE slides SET state = 'queued', queued_at = ?, started_at = NULL WHERE state = 'processing'",
                (now,)).rowcount
        return requeued, failed

    def claim(self) -> Job | None:
        """The oldest queued slide that is due, now marked 'processing' (attempts + 1)."""
        now = time.time()
        with self._lock:
            row = self.db.execute(
                "SELECT * FROM slides WHERE state = 'queued' AND (retry_after IS NULL OR retry_after <= ?) "
                "ORDER BY queued_at, id LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            self.db.execute(
                "UPDATE slides SET state = 'processing', attempts = attempts + 1, started_at = ? WHERE id = ?",
                (now, row["id"]))
        return Job(row["id"], Path(row["path"]), row["relative"], row["kind"], row["version"],
                   row["attempts"] + 1, row["sha256"])

    def is_current(self, job: Job) -> bool:
        """False once the slide was replaced by a new file (its result would be stale)."""
        rows = self._query("SELECT version FROM slides WHERE id = ?", (job.id,))
        return bool(rows) and rows[0]["version"] == job.version

    def release(self, job: Job) -> None:
        """Give a slide back to the queue without counting the attempt (clean shutdown)."""
        self._write("UPDATE slides SET state = 'queued', attempts = MAX(0, attempts - 1), started_at = NULL "
                      "WHERE id = ? AND version = ? AND state = 'processing'", (job.id, job.version))

    def done(self, job: Job, sha256: str, label: str, confidence: float, needs_review: bool, ms: float,
             result: str) -> bool:
        """Record a result; False when the slide was replaced meanwhile (the result is stale)."""
        changed = self._write(
            "UPDATE slides SET state = 'done', sha256 = ?, label = ?, confidence = ?, needs_review = ?, ms = ?, "
            "result = ?, finished_at = ?, error = NULL, error_kind = NULL WHERE id = ? AND version = ?",
            (sha256, label, confidence, int(needs_review), ms, result, time.time(), job.id, job.version))
        return changed > 0

    def failed(self, job: Job, error: str, kind: str, retry_in: float | None, sha256: str | None = None) -> None:
        """Record a failure; with ``retry_in`` seconds the slide is queued again after that delay."""
        now = time.time()
        if retry_in is not None:
            self._write("UPDATE slides SET state = 'queued', error = ?, error_kind = ?, retry_after = ?, "
                          "queued_at = ?, sha256 = COALESCE(?, sha256) WHERE id = ? AND version = ?",
                          (error, kind, now + retry_in, now, sha256, job.id, job.version))
        else:
            self._write("UPDATE slides SET state = 'failed', error = ?, error_kind = ?, finished_at = ?, "
                          "sha256 = COALESCE(?, sha256) WHERE id = ? AND version = ?",
                          (error, kind, now, sha256, job.id, job.version))

    def quarantined(self, job: Job, destination: Path) -> None:
        self._write("UPDATE slides SET quarantined_to = ? WHERE id = ?", (str(destination), job.id))

    # -- reporting ------------------------------------------------------------------
    def rows(self, state: str | None = None) -> Iterator[sqlite3.Row]:
        if state is None:
            yield from self._query("SELECT * FROM slides ORDER BY id")
        else:
            yield from self._query("SELECT * FROM slides WHERE state = ? ORDER BY id", (state,))

    def counts(self) -> dict[str, int]:
        found = {row[0]: row[1] for row in self._query("SELECT state, COUNT(*) FROM slides GROUP BY state")}
        return {state: int(found.get(state, 0)) for state in STATES}

    def pending(self) -> int:
        """Slides queued or in hand."""
        return int(self._query("SELECT COUNT(*) FROM slides WHERE state IN ('queued', 'processing')")[0][0])


def _same_file(row: sqlite3.Row, size: int, mtime_ns: int) -> bool:
    """The ledger's row still describes the file: same size and mtime, and not moved to quarantine."""
    return row["size"] == size and row["mtime_ns"] == mtime_ns and not row["quarantined_to"]
