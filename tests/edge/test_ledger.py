"""The ledger's promises: each slide once, replaced files again, crashes recovered, state on disk."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Iterator

import pytest

from lowmag.edge.ledger import Job, Ledger

SCANS = Path("/scans")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "out")
    yield opened
    opened.close()


def add(ledger: Ledger, name: str, size: int = 100, mtime_ns: int = 1) -> str:
    return ledger.enqueue(SCANS / name, name, "file", size, mtime_ns)


def row(ledger: Ledger, name: str) -> sqlite3.Row:
    [found] = [r for r in ledger.rows() if r["relative"] == name]
    return found


def finish(ledger: Ledger, job: Job) -> bool:
    return ledger.done(job, "0" * 64, "tumour", 0.9, False, 12.0, f"{job.relative}.json")


@pytest.mark.parametrize("size, mtime_ns", [(200, 1), (100, 2)], ids=["size", "mtime"])
def test_a_slide_is_new_then_known_then_replaced_when_its_file_changes(ledger: Ledger, size: int,
                                                                        mtime_ns: int) -> None:
    assert add(ledger, "a.svs") == "new"
    assert add(ledger, "a.svs") == "known"
    assert ledger.unchanged(SCANS / "a.svs", 100, 1)
    job = ledger.claim()
    ledger.failed(job, "unreadable", "slide", retry_in=None)

    assert add(ledger, "a.svs", size, mtime_ns) == "replaced"

    replaced = row(ledger, "a.svs")
    assert (replaced["state"], replaced["version"], replaced["attempts"], replaced["error"]) == ("queued", 2, 0, None)
    assert not ledger.unchanged(SCANS / "a.svs", 100, 1)
    assert ledger.counts() == {"queued": 1, "processing": 0, "done": 0, "failed": 0}


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
        assert ledger.recover(max_attempts=3) == (1, 0)
    ledger.claim()  # third attempt
    add(ledger, "fine.svs")
    ledger.claim()
    ledger.close()

    ledger = Ledger(out)
    assert ledger.recover(max_attempts=3) == (1, 1)

    poison, fine = row(ledger, "poison.svs"), row(ledger, "fine.svs")
    assert poison["state"] == "failed" and "process stopped" in poison["error"] and "3 times" in poison["error"]
    assert (fine["state"], fine["attempts"]) == ("queued", 1)  # its attempt is kept
    assert ledger.claim().relative == "fine.svs"
    assert ledger.claim() is None
    ledger.close()


def test_release_gives_the_slide_back_without_counting_the_attempt(ledger: Ledger) -> None:
    add(ledger, "a.svs")
    ledger.release(ledger.claim())

    assert ledger.counts()["queued"] == 1
    assert ledger.claim().attempts == 1


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
    assert ledger.requeue(SCANS / "a.svs")
    assert ledger.claim().attempts == 1


def test_a_result_for_a_slide_replaced_meanwhile_is_stale(ledger: Ledger) -> None:
    add(ledger, "a.svs")
    old = ledger.claim()
    add(ledger, "a.svs", size=999)  # the scanner rewrote it while we classified

    assert finish(ledger, old) is False
    ledger.failed(old, "late failure", "slide", retry_in=None)  # nor does a stale failure count
    assert ledger.counts() == {"queued": 1, "processing": 0, "done": 0, "failed": 0}

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
    assert ledger.counts() == {"queued": 1, "processing": 0, "done": 1, "failed": 0}
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
            reader.enqueue(SCANS / "b.svs", "b.svs", "file", 1, 1)
    finally:
        reader.close()
    assert ledger.pending() == 1


def test_a_job_knows_when_its_slide_was_replaced(ledger):
    add(ledger, "a.svs", 10, 1)
    job = ledger.claim()
    assert ledger.is_current(job)
    add(ledger, "a.svs", 20, 2)  # the scanner wrote a new file under the name
    assert not ledger.is_current(job)
