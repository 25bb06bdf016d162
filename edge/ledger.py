"""The ledger: a SQLite database (WAL) of every slide edge-classify has seen, in ``OUT/ledger.sqlite``.

One row per slide, keyed by its path below the *resolved* watched folder, as the exact
bytes of its name (so ``scans``, ``/abs/scans`` and a link to it are one folder, a slide
named by ``run`` and found by ``watch`` is one slide, and a name that is not UTF-8 is a
key like any other). Each row holds the
slide's identity (size, mtime, and a digest of every file's size, mtime, inode and
ctime), its content hash, its state (``queued``, ``processing``, ``done``, ``failed``, or
``skipped`` for an entry that is no slide), attempts, last error, and the result. The
state changes are single transactions, so after a crash or a power cut the ledger is as
it was at the last committed change:

- a slide left ``processing`` by a dead process goes back to ``queued`` when the next
  instance starts (its attempt is kept; one that keeps killing the process ends ``failed``);
- ``done`` is committed only after the result files are in place, so a result that exists
  for a ``queued`` slide is replaced, never trusted;
- a slide whose size or mtime changed (a new file under the same name) gets a new
  ``version`` and is queued again; one whose size and mtime are the same but whose inode or
  ctime changed (a copy that kept the mtime, a ``chmod``) is queued for a *recheck*: its
  content hash decides whether it is classified again or keeps its outcome.

The watcher's lock (``lock.py``) ensures one writer; ``status`` reads concurrently.
Version 1 ledgers (keyed by the path as typed) are migrated in place on first open.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from lowmag.errors import LowmagError
from lowmag.names import from_raw, printable, raw, shown

if TYPE_CHECKING:
    from lowmag.edge.scan import Signature, SlideUnit

logger = logging.getLogger("lowmag.edge")

LEDGER_NAME = "ledger.sqlite"
SCHEMA_VERSION = 2
STATES = ("queued", "processing", "done", "failed", "skipped")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS slides (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    root BLOB NOT NULL,
    relative BLOB NOT NULL,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    identity TEXT,
    sha256 TEXT,
    state TEXT NOT NULL CHECK (state IN ('queued', 'processing', 'done', 'failed', 'skipped')),
    recheck TEXT,
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
    distribution TEXT,
    ms REAL,
    result TEXT,
    quarantined_to TEXT
)""",
    "CREATE INDEX IF NOT EXISTS slides_state ON slides (state, retry_after, queued_at)",
)

#: Resets a row to a fresh queued version (its file was replaced).
_REQUEUE_AS_NEW = (
    "state = 'queued', version = version + 1, attempts = 0, error = NULL, error_kind = NULL, retry_after = NULL, "
    "started_at = NULL, finished_at = NULL, label = NULL, confidence = NULL, needs_review = NULL, ms = NULL, "
    "result = NULL, quarantined_to = NULL, recheck = NULL, sha256 = NULL, distribution = NULL"
)


class LedgerVersionError(LowmagError):
    """The ledger was written by a newer lowmag."""


@dataclass(frozen=True)
class Job:
    """A claimed slide: enough to process it and to record the outcome."""

    id: int
    path: Path
    root: Path
    relative: str
    kind: str
    version: int
    attempts: int
    #: The content hash recorded before (for a recheck, what the file must still hash to).
    sha256: str | None
    #: The outcome to restore when a recheck finds the same content ('done' or 'failed').
    recheck: str | None = None
    #: Why its previous attempt ended ('output', 'interrupted', 'transient'...), if it did.
    last_error_kind: str | None = None
    #: The identity the slide was queued with (None for a row migrated from schema 1), and
    #: its size and mtime: a file that no longer has them changed after it settled.
    identity: str | None = None
    size: int = 0
    mtime_ns: int = 0

    def describes(self, signature: "Signature | None") -> bool:
        """The files are still those this job was queued for."""
        from lowmag.edge.scan import mtime_of, size_of

        if not signature:
            return False
        if self.identity is None:
            return (size_of(signature), mtime_of(signature)) == (self.size, self.mtime_ns)
        return identity_of(signature) == self.identity

    @property
    def shown(self) -> str:
        return shown(self.path)


def identity_of(signature: "Signature") -> str:
    """A digest of every file's name, size, mtime, inode and ctime."""
    return hashlib.sha256(repr(signature).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def key_of(unit: "SlideUnit") -> bytes:
    """The ledger's key of a unit: its path below the resolved folder, as bytes."""
    return raw(unit.root / unit.relative)


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
            self._create_or_migrate()
        self.db.row_factory = sqlite3.Row

    def _create_or_migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerVersionError(f"{shown(self.path)}: written by a newer lowmag (ledger schema {version}, this "
                                     f"one reads up to {SCHEMA_VERSION}). Fix: upgrade lowmag, or use a new --out.")
        has_table = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'slides'").fetchone() is not None
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if has_table and version < 2:
                _migrate_v1(self.db, self.path)
            else:
                for statement in _SCHEMA:
                    self.db.execute(statement)
                _add_missing_columns(self.db)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

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
    def enqueue(self, unit: "SlideUnit", signature: "Signature", delay: float = 0.0) -> str:
        """Record a complete slide; returns 'new', 'known' (nothing to do), 'replaced' (a new
        file: classify again) or 'recheck' (same size and mtime, other inode or ctime: the
        content hash decides). ``delay``: seconds before a changed slide may be claimed."""
        from lowmag.edge.scan import mtime_of, size_of

        size, mtime, identity = size_of(signature), mtime_of(signature), identity_of(signature)
        now = time.time()
        due = now + delay if delay > 0 else None
        key, root, relative = key_of(unit), raw(unit.root), raw(unit.relative)
        with self._lock:
            row = self.db.execute("SELECT * FROM slides WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.db.execute(
                    "INSERT INTO slides (key, root, relative, path, kind, size, mtime_ns, identity, state, "
                    "first_seen, queued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
                    (key, root, relative, shown(unit.path), unit.kind, size, mtime, identity, now, now))
                return "new"
            same_stat = row["size"] == size and row["mtime_ns"] == mtime and row["kind"] == unit.kind
            if same_stat and not row["quarantined_to"] and row["identity"] in (identity, None):
                if row["identity"] is None:  # a migrated row: it learns its full identity now
                    self.db.execute("UPDATE slides SET identity = ? WHERE id = ?", (identity, row["id"]))
                return "known"
            outcome = row["recheck"] or (row["state"] if row["state"] in ("done", "failed") else None)
            if same_stat and outcome and row["sha256"] and not row["quarantined_to"]:
                # (a second chmod while a recheck is pending keeps it a recheck of the same outcome)
                self.db.execute(
                    "UPDATE slides SET identity = ?, state = 'queued', recheck = ?, version = version + 1, "
                    "attempts = 0, retry_after = ?, queued_at = ?, started_at = NULL WHERE id = ?",
                    (identity, outcome, due, now, row["id"]))
                return "recheck"
            self.db.execute(
                f"UPDATE slides SET {_REQUEUE_AS_NEW}, root = ?, relative = ?, path = ?, kind = ?, size = ?, "
                "mtime_ns = ?, identity = ?, queued_at = ?, retry_after = ? WHERE id = ?",
                (root, relative, shown(unit.path), unit.kind, size, mtime, identity, now, due, row["id"]))
            return "replaced"

    def record_skipped(self, unit: "SlideUnit", signature: "Signature", reason: str) -> str:
        """Record an entry that is no slide, once; returns 'new', 'known' or 'replaced' (it was
        something else before: its outputs, if any, are stale)."""
        from lowmag.edge.scan import mtime_of, size_of

        size, mtime, identity = size_of(signature), mtime_of(signature), identity_of(signature)
        now = time.time()
        key, root, relative = key_of(unit), raw(unit.root), raw(unit.relative)
        reason = printable(reason)
        with self._lock:
            row = self.db.execute("SELECT id, identity, state FROM slides WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.db.execute(
                    "INSERT INTO slides (key, root, relative, path, kind, size, mtime_ns, identity, state, error, "
                    "error_kind, first_seen, finished_at) VALUES (?, ?, ?, ?, 'skipped', ?, ?, ?, 'skipped', ?, "
                    "'skipped', ?, ?)",
                    (key, root, relative, shown(unit.path), size, mtime, identity, reason, now, now))
                return "new"
            if row["identity"] == identity and row["state"] == "skipped":
                return "known"
            self.db.execute(
                f"UPDATE slides SET {_REQUEUE_AS_NEW}, state = 'skipped', kind = 'skipped', root = ?, relative = ?, "
                "size = ?, mtime_ns = ?, identity = ?, error = ?, error_kind = 'skipped', finished_at = ? WHERE id = ?",
                (root, relative, size, mtime, identity, reason, now, row["id"]))
            return "replaced"

    def unchanged(self, unit: "SlideUnit", signature: "Signature") -> bool:
        """True when the ledger has this slide with this identity (nothing new to do)."""
        from lowmag.edge.scan import mtime_of, size_of

        rows = self._query("SELECT size, mtime_ns, identity, quarantined_to, kind FROM slides WHERE key = ?",
                           (key_of(unit),))
        if not rows or rows[0]["quarantined_to"] or rows[0]["kind"] != unit.kind:
            return False
        row = rows[0]
        if row["identity"] is None:
            return row["size"] == size_of(signature) and row["mtime_ns"] == mtime_of(signature)
        return row["identity"] == identity_of(signature)

    def requeue(self, unit: "SlideUnit", states: tuple[str, ...] = ("failed",)) -> bool:
        """Queue a slide again (``edge-classify run`` retries failures; ``--reprocess`` redoes all)."""
        marks = ",".join("?" * len(states))
        changed = self._write(
            f"UPDATE slides SET state = 'queued', attempts = 0, error = NULL, error_kind = NULL, retry_after = NULL, "
            f"recheck = NULL, queued_at = ? WHERE key = ? AND state IN ({marks})", (time.time(), key_of(unit), *states))
        return changed > 0

    # -- processing -----------------------------------------------------------------
    def recover(self, max_attempts: int) -> tuple[int, list[Job]]:
        """After a crash: 'processing' rows go back to the queue, or fail after too many tries.

        Returns (how many were requeued, the jobs that failed now: they need a CSV row).
        """
        now = time.time()
        with self._lock:
            stuck = self.db.execute("SELECT * FROM slides WHERE state = 'processing' AND attempts >= ?",
                                    (max_attempts,)).fetchall()
            self.db.execute(
                "UPDATE slides SET state = 'failed', error_kind = 'interrupted', finished_at = ?, recheck = NULL, "
                "error = 'the process stopped while classifying this slide ' || attempts || ' times "
                "(crash, kill, power loss, or a stop that outlasted --shutdown-timeout); it is not retried "
                "automatically (edge-classify run retries it)' "
                "WHERE state = 'processing' AND attempts >= ?", (now, max_attempts))
            requeued = self.db.execute(
                "UPDATE slides SET state = 'queued', queued_at = ?, started_at = NULL WHERE state = 'processing'",
                (now,)).rowcount
        return requeued, [_job(row) for row in stuck]

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
        return _job(row, attempts=row["attempts"] + 1)

    def is_current(self, job: Job) -> bool:
        """False once the slide was replaced by a new file (its result would be stale)."""
        rows = self._query("SELECT version FROM slides WHERE id = ?", (job.id,))
        return bool(rows) and rows[0]["version"] == job.version

    def release(self, job: Job, kind: str = "output") -> None:
        """Give a slide back to the queue without counting the attempt (its outputs could not
        be written: a problem of the output folder, not of the slide)."""
        self._write("UPDATE slides SET state = 'queued', attempts = MAX(0, attempts - 1), started_at = NULL, "
                    "error_kind = ?, error = 'waiting: the output folder could not be written' "
                    "WHERE id = ? AND version = ? AND state = 'processing'", (kind, job.id, job.version))

    def interrupted(self, job: Job, max_attempts: int) -> str:
        """A stop interrupted the slide: it counts as an attempt, so a slide that outlasts every
        stop ends 'failed' instead of looping. Returns the new state."""
        now = time.time()
        if job.attempts >= max_attempts:
            self._write("UPDATE slides SET state = 'failed', error_kind = 'interrupted', finished_at = ?, "
                        "recheck = NULL, error = ? WHERE id = ? AND version = ? AND state = 'processing'",
                        (now, f"a stop interrupted the classification of this slide {job.attempts} times; it "
                         "is not retried automatically (edge-classify run retries it)", job.id, job.version))
            return "failed"
        self._write("UPDATE slides SET state = 'queued', started_at = NULL, queued_at = ?, error_kind = 'interrupted', "
                    "error = 'interrupted by a stop' WHERE id = ? AND version = ? AND state = 'processing'",
                    (now, job.id, job.version))
        return "queued"

    def forget_outcome(self, job: Job) -> None:
        """A recheck found other content: the earlier outcome no longer describes the file, and
        must never be restored (not after a retry, nor after a crash)."""
        self._write("UPDATE slides SET recheck = NULL, sha256 = NULL, label = NULL, confidence = NULL, "
                    "needs_review = NULL, ms = NULL, result = NULL, distribution = NULL WHERE id = ? AND version = ?",
                    (job.id, job.version))

    def restore(self, job: Job) -> bool:
        """A recheck found the same content: the slide keeps its earlier outcome."""
        return self._write("UPDATE slides SET state = recheck, recheck = NULL, attempts = 0 "
                           "WHERE id = ? AND version = ? AND recheck IS NOT NULL", (job.id, job.version)) > 0

    def done(self, job: Job, sha256: str, label: str, confidence: float, needs_review: bool, ms: float,
             result: str, distribution: str | None = None) -> bool:
        """Record a result; False when the slide was replaced meanwhile (the result is stale).

        ``distribution``: the slide's verdict against the training data's fingerprint."""
        changed = self._write(
            "UPDATE slides SET state = 'done', sha256 = ?, label = ?, confidence = ?, needs_review = ?, ms = ?, "
            "result = ?, distribution = ?, finished_at = ?, error = NULL, error_kind = NULL, recheck = NULL "
            "WHERE id = ? AND version = ?",
            (sha256, label, confidence, int(needs_review), ms, printable(result), distribution, time.time(), job.id,
             job.version))
        return changed > 0

    def failed(self, job: Job, error: str, kind: str, retry_in: float | None, sha256: str | None = None) -> bool:
        """Record a failure; with ``retry_in`` seconds the slide is queued again after that delay.

        Returns False when the slide was replaced meanwhile (the failure is stale).
        """
        now = time.time()
        error = printable(error)
        if retry_in is not None:
            return self._write("UPDATE slides SET state = 'queued', error = ?, error_kind = ?, retry_after = ?, "
                               "queued_at = ?, recheck = NULL, sha256 = COALESCE(?, sha256) "
                               "WHERE id = ? AND version = ?",
                               (error, kind, now + retry_in, now, sha256, job.id, job.version)) > 0
        return self._write("UPDATE slides SET state = 'failed', error = ?, error_kind = ?, finished_at = ?, "
                           "recheck = NULL, label = NULL, confidence = NULL, needs_review = NULL, result = NULL, "
                           "distribution = NULL, "
                           "sha256 = COALESCE(?, sha256) WHERE id = ? AND version = ?",
                           (error, kind, now, sha256, job.id, job.version)) > 0

    def quarantined(self, job: Job, destination: Path) -> None:
        self._write("UPDATE slides SET quarantined_to = ? WHERE id = ?", (shown(destination), job.id))

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


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Columns added to schema 2 after it first shipped (all may be NULL) join older tables."""
    have = {row[1] for row in db.execute("PRAGMA table_info(slides)")}
    for name, kind in (("distribution", "TEXT"),):
        if name not in have:
            db.execute(f"ALTER TABLE slides ADD COLUMN {name} {kind}")


def _job(row: sqlite3.Row, attempts: int | None = None) -> Job:
    root, relative = from_raw(row["root"]), os.fsdecode(bytes(row["relative"]))
    return Job(row["id"], root / relative, root, relative, row["kind"], row["version"],
               row["attempts"] if attempts is None else attempts, row["sha256"], row["recheck"], row["error_kind"],
               row["identity"], row["size"], row["mtime_ns"])


#: Failures of version 1 that were the output folder's fault (a full disk), not the slide's.
_OUTPUT_SIDE_ERRORS = re.compile(r"\[Errno (28|122)\]|No space left on device|Disk quota exceeded")
_RANK = {"done": 3, "failed": 2, "processing": 1, "queued": 1}


def _migrate_v1(db: sqlite3.Connection, path: Path) -> None:
    """Version 1 keyed rows by the path as typed: the same slide under ``scans`` and
    ``/abs/scans`` had two rows. Re-key by the resolved folder, keep the most final row of
    each slide, and queue again slides that failed only because the output disk was full."""
    db.row_factory = sqlite3.Row
    rows = db.execute("SELECT * FROM slides ORDER BY id").fetchall()
    db.execute("ALTER TABLE slides RENAME TO slides_v1")
    db.execute("DROP INDEX IF EXISTS slides_state")
    for statement in _SCHEMA:
        db.execute(statement)
    best: dict[bytes, tuple[bytes, bytes, sqlite3.Row]] = {}
    unplaced = 0
    for row in rows:
        relative = row["relative"]
        typed = row["path"]
        typed_root = typed[: -len(relative) - 1] if typed.endswith("/" + relative) else os.path.dirname(typed)
        if not os.path.isabs(typed_root) and not os.path.isdir(typed_root):
            unplaced += 1  # typed relative to a folder this process does not start in
        root = Path(os.path.realpath(typed_root))
        key = raw(root / relative)
        kept = best.get(key, (b"", b"", None))[2]
        if kept is None or (_RANK[row["state"]], row["finished_at"] or 0) >= (_RANK[kept["state"]],
                                                                              kept["finished_at"] or 0):
            best[key] = (raw(root), raw(relative), row)
    requeued = 0
    for key, (root, relative, row) in best.items():
        state, attempts, error = row["state"], row["attempts"], row["error"]
        if state == "failed" and error and _OUTPUT_SIDE_ERRORS.search(error):
            state, attempts, error, requeued = "queued", 0, None, requeued + 1
        db.execute(
            "INSERT INTO slides (key, root, relative, path, kind, size, mtime_ns, identity, sha256, state, version, "
            "attempts, error, error_kind, retry_after, first_seen, queued_at, started_at, finished_at, label, "
            "confidence, needs_review, ms, result, quarantined_to) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, root, relative, shown(from_raw(key)), row["kind"], row["size"],
             row["mtime_ns"], row["sha256"], state, row["version"], attempts, error,
             row["error_kind"] if error else None, row["first_seen"], row["queued_at"], row["started_at"],
             row["finished_at"], row["label"], row["confidence"], row["needs_review"], row["ms"], row["result"],
             row["quarantined_to"]))
    db.execute("DROP TABLE slides_v1")
    if unplaced:
        logger.warning("%s: %d row(s) of the old ledger name their slide by a relative path that does not exist "
                       "from %s; they were placed below it, and those slides will be classified again if they "
                       "live elsewhere. Fix: start the first new run from the folder the old one ran in.",
                       shown(path), unplaced, shown(os.getcwd()))
    logger.info("%s: ledger migrated to schema %d (%d rows of %d kept: one per slide; %d failed on a full disk "
                "queued again)", shown(path), SCHEMA_VERSION, len(best), len(rows), requeued)
