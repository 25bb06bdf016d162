"""The ledger's promises: each slide once, replaced files again, crashes recovered, state on disk."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Iterator

import pytest

from lowmag.edge.ledger import Job, Ledger, LedgerVersionError
from lowmag.edge.scan import SlideUnit

SCANS = Path("/scans")


def unit(name: str) -> SlideUnit:
    return SlideUnit(SCANS / name, "file", SCANS)


def signature(name: str, size: int = 100, mtime_ns: int = 1, inode: int = 7, ctime_ns: int = 1):
    return ((name, size, mtime_ns, inode, ctime_ns),)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "out")
    yield opened
    opened.close()


def add(ledger: Ledger, name: str, size: int = 100, mtime_ns: int = 1, inode: int = 7, ctime_ns: int = 1) -> str:
    return ledger.enqueue(unit(name), signature(name, size, mtime_ns, inode, ctime_ns))


def row(ledger: Ledger, name: str) -> sqlite3.Row:
    [found] = [r for r in ledger.rows() if bytes(r["relative"]) == name.encode()]
    return found


def finish(ledger: Ledger, job: Job) -> bool:
    return ledger.done(job, "0" * 64, "tumour", 0.9, False, 12.0, f"{job.relative}.json")


@pytest.mark.parametrize("size, mtime_ns", [(200, 1), (100, 2)], ids=["size", "mtime"])
def test_a_slide_is_new_then_known_then_replaced_when_its_file_changes(ledger: Ledger, size: int,
                                                                        mtime_ns: int) -> None:
    assert add(ledger, "a.svs") == "new"
    assert add(ledger, "a.svs") == "known"
    assert ledger.unchanged(unit("a.svs"), signature("a.svs"))
    job = ledger.claim()
    ledger.failed(job, "unreadable", "slide", retry_in=None)

    assert add(ledger, "a.svs", size, mtime_ns) == "replaced"

    replaced = row(ledger, "a.svs")
    assert (replaced["state"], replaced["version"], replaced["attempts"], replaced["error"]) == ("queued", 2, 0, None)
    assert not ledger.unchanged(unit("a.svs"), signature("a.svs"))
    assert ledger.counts() == {"queued": 1, "processing": 0, "done": 0, "failed": 0, "skipped": 0}


def test_claim_takes_the_oldest_queued_slide_and_counts_attempts(ledger: Ledger) -> None:
    for name in ("a.svs", "b.svs", "c.svs"):
        add(ledger, name)

    first = ledger.claim()
    assert (first.relative, first.attempts) == ("a.svs", 1)
    ledger.failed(first, "GPU busy", "transient", retry_in=0)  # back of the queue

    assert [ledger.claim().relative for _ in range(2)] == ["b.svs", "c.svs"]
    again = ledger.claim()
    assert (again.relative, again.attempts) == ("a.svs", 2)
    assert ledger.claim() is None
    assert ledger.counts()["processing"] == 3 and ledger.pending() == 3


def test_recover_requeues_interrupted_slides_and_fails_one_that_keeps_killing_the_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ledger = Ledger(out)
    add(ledger, "poison.svs")
    for _ in range(2):  # two crashes while classifying it
        ledger.claim()
        ledger.close()
        ledger = Ledger(out)
        assert ledger.recover(max_attempts=3) == (1, [])
    ledger.claim()  # third attempt
    add(ledger, "fine.svs")
    ledger.claim()
    ledger.close()

    ledger = Ledger(out)
    requeued, failed = ledger.recover(max_attempts=3)
    assert requeued == 1 and [job.relative for job in failed] == ["poison.svs"]

    poison, fine = row(ledger, "poison.svs"), row(ledger, "fine.svs")
    assert poison["state"] == "failed" and "process stopped" in poison["error"] and "3 times" in poison["error"]
    assert (fine["state"], fine["attempts"]) == ("queued", 1)  # its attempt is kept
    assert ledger.claim().relative == "fine.svs"
    assert ledger.claim() is None
    ledger.close()


def test_release_for_an_output_problem_gives_the_slide_back_without_counting_the_attempt(ledger: Ledger) -> None:
    add(ledger, "a.svs")
    ledger.release(ledger.claim(), "output")

    assert ledger.counts()["queued"] == 1
    again = ledger.claim()
    assert (again.attempts, again.last_error_kind) == (1, "output")


def test_a_slide_interrupted_by_every_stop_ends_failed(ledger: Ledger) -> None:
    add(ledger, "slow.svs")
    assert [ledger.interrupted(ledger.claim(), max_attempts=3) for _ in range(3)] == ["queued", "queued", "failed"]

    failed = row(ledger, "slow.svs")
    assert (failed["state"], failed["error_kind"]) == ("failed", "interrupted")
    assert "interrupted" in failed["error"] and "3 times" in failed["error"]


def test_a_failure_with_retry_waits_in_the_queue_until_due(ledger: Ledger) -> None:
    add(ledger, "a.svs")
    ledger.failed(ledger.claim(), "out of memory", "transient", retry_in=0.3)

    assert ledger.counts()["queued"] == 1 and ledger.pending() == 1
    assert ledger.claim() is None
    time.sleep(0.35)
    job = ledger.claim()
    assert (job.relative, job.attempts) == ("a.svs", 2)


def test_a_failure_without_retry_stays_failed_until_requeued(ledger: Ledger) -> None:
    add(ledger, "a.svs")
    ledger.failed(ledger.claim(), "not a slide", "slide", retry_in=None)

    assert ledger.claim() is None and ledger.pending() == 0
    assert row(ledger, "a.svs")["error"] == "not a slide"
    assert ledger.requeue(unit("a.svs"))
    assert ledger.claim().attempts == 1


def test_a_result_for_a_slide_replaced_meanwhile_is_stale(ledger: Ledger) -> None:
    add(ledger, "a.svs")
    old = ledger.claim()
    add(ledger, "a.svs", size=999)  # the scanner rewrote it while we classified

    assert finish(ledger, old) is False
    ledger.failed(old, "late failure", "slide", retry_in=None)  # nor does a stale failure count
    assert ledger.counts() == {"queued": 1, "processing": 0, "done": 0, "failed": 0, "skipped": 0}

    new = ledger.claim()
    assert (new.version, new.attempts) == (2, 1)
    assert finish(ledger, new) is True
    assert row(ledger, "a.svs")["label"] == "tumour"


def test_the_ledger_is_on_disk_in_wal_mode_and_survives_a_restart(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ledger = Ledger(out)
    add(ledger, "a.svs")
    add(ledger, "b.svs")
    assert finish(ledger, ledger.claim())
    ledger.close()

    ledger = Ledger(out)
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.counts() == {"queued": 1, "processing": 0, "done": 1, "failed": 0, "skipped": 0}
    assert add(ledger, "a.svs") == "known"
    assert row(ledger, "a.svs")["result"] == "a.svs.json"
    ledger.close()


def test_a_read_only_ledger_reads_while_the_writer_works(ledger: Ledger, tmp_path: Path) -> None:
    add(ledger, "a.svs")
    reader = Ledger(tmp_path / "out", readonly=True)
    try:
        assert reader.counts()["queued"] == 1
        ledger.claim()
        assert reader.counts()["processing"] == 1  # sees the writer's commits
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.enqueue(unit("b.svs"), signature("b.svs"))
    finally:
        reader.close()
    assert ledger.pending() == 1


def test_a_job_knows_when_its_slide_was_replaced(ledger):
    add(ledger, "a.svs", 10, 1)
    job = ledger.claim()
    assert ledger.is_current(job)
    add(ledger, "a.svs", 20, 2)  # the scanner wrote a new file under the name
    assert not ledger.is_current(job)


def test_same_size_and_mtime_but_another_inode_or_ctime_is_rechecked_by_content(ledger: Ledger) -> None:
    add(ledger, "a.svs")
    assert finish(ledger, ledger.claim())

    # rsync -t / cp -p / touch -r: new content, the old size and mtime; only the ctime tells.
    assert add(ledger, "a.svs", ctime_ns=2) == "recheck"
    job = ledger.claim()
    assert (job.recheck, job.sha256) == ("done", "0" * 64)
    assert ledger.restore(job)  # the runner found the same sha256: it keeps its result
    kept = row(ledger, "a.svs")
    assert (kept["state"], kept["label"], kept["recheck"]) == ("done", "tumour", None)
    assert add(ledger, "a.svs", ctime_ns=2) == "known"

    assert add(ledger, "a.svs", inode=8, ctime_ns=3) == "recheck"  # replaced by rename: new inode
    changed = ledger.claim()
    assert finish(ledger, changed)  # other content: classified again, same row
    assert row(ledger, "a.svs")["version"] == 3


def test_entries_that_are_no_slides_are_recorded_once_with_their_reason(ledger: Ledger) -> None:
    notes = SlideUnit(SCANS / "notes.txt", "skipped", SCANS)
    assert ledger.record_skipped(notes, signature("notes.txt"), "not a slide format (.txt).") == "new"
    assert ledger.record_skipped(notes, signature("notes.txt"), "not a slide format (.txt).") == "known"
    assert ledger.unchanged(notes, signature("notes.txt"))
    assert ledger.claim() is None and ledger.pending() == 0
    assert ledger.counts()["skipped"] == 1 and row(ledger, "notes.txt")["error"] == "not a slide format (.txt)."


def test_names_that_are_not_utf8_are_keys_like_any_other(ledger: Ledger) -> None:
    latin1 = os.fsdecode(b"caf\xe9.svs")
    assert ledger.enqueue(unit(latin1), signature(latin1)) == "new"
    assert ledger.enqueue(unit("café.svs"), signature("café.svs")) == "new"  # the UTF-8 spelling is another file
    job = ledger.claim()
    assert os.fsencode(job.path) == b"/scans/caf\xe9.svs" and job.relative == latin1
    ledger.failed(job, f"{job.path}: not a slide\nsecond line", "permanent", retry_in=None)
    [shown_row] = [r for r in ledger.rows() if r["state"] == "failed"]
    assert shown_row["path"] == "/scans/caf\\xe9.svs"
    assert shown_row["error"] == "/scans/caf\\xe9.svs: not a slide\\nsecond line"


V1_SCHEMA = """
CREATE TABLE slides (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, relative TEXT NOT NULL, kind TEXT NOT NULL,
  size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT, state TEXT NOT NULL, version INTEGER NOT NULL
  DEFAULT 1, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, error_kind TEXT, retry_after REAL, first_seen REAL
  NOT NULL, queued_at REAL, started_at REAL, finished_at REAL, label TEXT, confidence REAL, needs_review INTEGER,
  ms REAL, result TEXT, quarantined_to TEXT);
PRAGMA user_version=1;
"""


def test_a_version_1_ledger_is_migrated_one_row_per_slide(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    (tmp_path / "alias").symlink_to(scans)
    out = tmp_path / "out"
    out.mkdir()
    db = sqlite3.connect(out / "ledger.sqlite")
    db.executescript(V1_SCHEMA)
    rows = [  # the same slide watched as scans, /abs/scans and through a link; and a full-disk failure
        (str(scans / "a.svs"), "a.svs", "done", None, 10.0),
        (str(tmp_path / "alias" / "a.svs"), "a.svs", "failed", "not a slide", 20.0),
        (str(tmp_path / "x" / ".." / "scans" / "a.svs"), "a.svs", "queued", None, None),
        (str(scans / "b.svs"), "b.svs", "failed", "OSError: [Errno 28] No space left on device", 5.0),
    ]
    for path, relative, state, error, finished in rows:
        db.execute("INSERT INTO slides (path, relative, kind, size, mtime_ns, state, error, first_seen, queued_at, "
                   "finished_at, label) VALUES (?, ?, 'file', 1, 1, ?, ?, 0, 0, ?, ?)",
                   (path, relative, state, error, finished, "tumour" if state == "done" else None))
    db.commit()
    db.close()

    ledger = Ledger(out)
    try:
        states = {r["path"]: (r["state"], r["label"]) for r in ledger.rows()}
        assert states == {str(scans / "a.svs"): ("done", "tumour"), str(scans / "b.svs"): ("queued", None)}
        assert ledger.db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert add_unit(ledger, SlideUnit(scans / "a.svs", "file", scans)) == "known"  # learns its identity
    finally:
        ledger.close()


def add_unit(ledger: Ledger, slide: SlideUnit) -> str:
    return ledger.enqueue(slide, ((slide.relative, 1, 1, 9, 9),))


def test_a_ledger_from_a_newer_lowmag_is_refused_with_the_fix(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    db = sqlite3.connect(out / "ledger.sqlite")
    db.execute("PRAGMA user_version=9")
    db.close()
    with pytest.raises(LedgerVersionError, match="newer lowmag.*upgrade lowmag"):
        Ledger(out)


def test_a_recheck_that_found_other_content_never_restores_the_old_outcome(ledger: Ledger) -> None:
    add(ledger, "a.svs")
    assert finish(ledger, ledger.claim())
    assert add(ledger, "a.svs", ctime_ns=2) == "recheck"
    job = ledger.claim()
    ledger.forget_outcome(job)  # the runner hashed other content
    ledger.failed(job, "read error", "transient", retry_in=0, sha256="1" * 64)  # and its read then failed

    again = ledger.claim()
    assert again.recheck is None and not ledger.restore(again)
    assert row(ledger, "a.svs")["label"] is None


def test_a_second_metadata_change_while_a_recheck_waits_keeps_it_a_recheck(ledger: Ledger) -> None:
    add(ledger, "a.svs")
    assert finish(ledger, ledger.claim())
    assert add(ledger, "a.svs", ctime_ns=2) == "recheck"  # chmod
    assert add(ledger, "a.svs", ctime_ns=3) == "recheck"  # chmod again before it was claimed

    job = ledger.claim()
    assert (job.recheck, job.sha256) == ("done", "0" * 64)
    assert ledger.restore(job) and row(ledger, "a.svs")["label"] == "tumour"


def test_a_schema_2_ledger_from_before_the_distribution_column_gets_it(tmp_path: Path) -> None:
    from lowmag.edge import ledger as module

    out = tmp_path / "out"
    out.mkdir()
    db = sqlite3.connect(out / "ledger.sqlite")
    db.execute(module._SCHEMA[0].replace("    distribution TEXT,\n", ""))
    db.execute("PRAGMA user_version=2")
    db.close()
    ledger = Ledger(out)
    try:
        add(ledger, "a.svs")
        job = ledger.claim()
        assert ledger.done(job, "0" * 64, "tumour", 0.9, False, 12.0, "a.svs.json", "in_distribution")
        assert row(ledger, "a.svs")["distribution"] == "in_distribution"
    finally:
        ledger.close()
