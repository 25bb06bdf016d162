"""A scan folder that scanners, people and scripts all write to: hostile names, links and files.

Each test reproduces what once broke the watcher (issue 12) through the real CLI.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lowmag.edge.ledger import Ledger
from lowmag.edge.runner import EdgeRunner, RunnerOptions
from lowmag.edge.scan import SlideUnit
from lowmag.io import sha256_file
from lowmag.synthetic import Blob
from tests.edge.conftest import edge, ledger_states, start_watch, stop, wait_for
from tests.hostile import write_huge_header_tiff

FAST = ("--settle", "0.5", "--threads", "1")


def small(slide_factory, name: str, seed: int) -> Path:
    """A 512 x 384 slide at 0.5 µm/px with one piece of tissue in the middle."""
    return slide_factory(name, 512, 384, seed=seed, blobs=(Blob(256, 192, 150, 120),))


def started(log: Path, proc) -> None:
    """Wait until the watcher logged that it watches (its startup rescan runs next)."""
    wait_for(lambda: log.exists() and "INFO watching " in log.read_text(errors="replace"), 60, "the watcher to start",
             proc)


def csv_lines(out: Path) -> list[str]:
    return (out / "summary.csv").read_text(encoding="utf-8").splitlines()


def csv_rows(out: Path) -> list[dict[str, str]]:
    path = out / "summary.csv"
    return list(csv.DictReader(path.open(encoding="utf-8"))) if path.exists() else []


def ledger(out: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True) as db:
        return db.execute(sql).fetchall()


def test_names_that_are_not_utf8_or_hold_newlines_are_classified_and_shown_on_one_line(
        onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    slide = small(slide_factory, "s.tif", 3)
    names = [b"caf\xe9.svs", b"two\nlines.tif", b"tab\there.tif", b"plain.tif"]
    for name in names:
        shutil.copy(slide, os.fsencode(scans) + b"/" + name)

    result = edge("run", str(scans), "--model", str(onnx_bundle), "--out", str(out))

    assert result.returncode == 0, result.stderr
    assert "4 done, 0 failed" in result.stdout and "Traceback" not in result.stderr
    lines = csv_lines(out)
    assert len(lines) == 5  # header + one physical line per slide
    shown = {Path(row["slide"]).name for row in csv_rows(out)}
    assert shown == {"caf\\xe9.svs", "two\\nlines.tif", "tab\\there.tif", "plain.tif"}
    for name in names:  # outputs keep the slide's exact name, with the suffix added
        with open(os.fsencode(out / "results") + b"/" + name + b".json", encoding="utf-8") as handle:
            document = json.load(handle)
        assert document["slide"]["sha256"] == sha256_file(slide)
        assert "\n" not in document["slide"]["path"]
    done_lines = [line for line in result.stderr.splitlines() if " INFO done " in line]
    assert len(done_lines) == 4 and any("caf\\xe9.svs" in line for line in done_lines)
    status = edge("status", "--out", str(out))
    assert status.returncode == 0 and "done 4" in status.stdout


def test_a_latin1_name_dropped_into_a_running_watcher_neither_stops_it_nor_later_slides(
        onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    proc = start_watch(scans, out, onnx_bundle, *FAST)
    try:
        wait_for(lambda: (out / "ledger.sqlite").exists(), 30, "the watcher to start", proc)
        shutil.copy(small(slide_factory, "a.tif", 1), os.fsencode(scans) + b"/caf\xe9.svs")
        wait_for(lambda: list(ledger_states(out).values()).count("done") == 1, 60, "the Latin-1 slide", proc)
        shutil.copy(small(slide_factory, "b.tif", 2), scans / "later.tif")
        wait_for(lambda: list(ledger_states(out).values()).count("done") == 2, 60, "a later slide", proc)
    finally:
        assert stop(proc) == 0
    # A restart rescans the folder, Latin-1 name included, and finds nothing new to do.
    proc = start_watch(scans, out, onnx_bundle, *FAST, log=tmp_path / "again.log")
    try:
        started(tmp_path / "again.log", proc)
        time.sleep(2)  # the startup rescan's candidates settle (0.5 s) and are found known
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    assert len(csv_rows(out)) == 2
    assert sorted(Path(p).name for p in ledger_states(out)) == ["caf\\xe9.svs", "later.tif"]


def test_the_same_folder_typed_three_ways_is_one_folder(onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    (tmp_path / "link").symlink_to(scans)
    for i in range(2):
        shutil.copy(small(slide_factory, f"s{i}.tif", i), scans / f"s{i}.tif")

    first = edge("run", "scans", "--model", str(onnx_bundle), "--out", str(out), cwd=tmp_path)
    again = [edge("run", folder, "--model", str(onnx_bundle), "--out", str(out), cwd=tmp_path)
             for folder in (str(scans), "link", "./scans/../scans")]

    assert "2 done" in first.stdout
    assert all("0 done, 0 failed, 2 already done" in run.stdout for run in again), [r.stdout for r in again]
    assert ledger(out, "SELECT COUNT(*) FROM slides") == [(2,)]
    assert len(csv_rows(out)) == 2
    # A watcher started on the link's name agrees: nothing to do.
    proc = start_watch(tmp_path / "link", out, onnx_bundle, *FAST)
    try:
        started(tmp_path / "out.log", proc)
        time.sleep(2)  # the startup rescan's candidates settle (0.5 s) and are found known
    finally:
        assert stop(proc) == 0
    assert len(csv_rows(out)) == 2 and ledger(out, "SELECT COUNT(*) FROM slides") == [(2,)]


def test_links_out_of_the_scan_folder_are_never_read_and_are_refused_once(onnx_bundle, slide_factory, tmp_path):
    scans, out, outside = tmp_path / "scans", tmp_path / "out", tmp_path / "outside"
    scans.mkdir()
    outside.mkdir()
    secret = shutil.copy(small(slide_factory, "secret.tif", 9), outside / "secret.tif")
    # A DICOM series with one instance linked to a file outside.
    (scans / "series").mkdir()
    shutil.copy(small(slide_factory, "x.tif", 4), scans / "series" / "1.dcm")
    (scans / "series" / "zz.dcm").symlink_to("/etc/passwd")
    shutil.copy(small(slide_factory, "kept.tif", 5), scans / "kept.tif")
    proc = start_watch(scans, out, onnx_bundle, *FAST, "--rescan-interval", "1")
    try:
        wait_for(lambda: ledger_states(out).get(str(scans / "kept.tif")) == "done", 60, "the first slide", proc)
        wait_for(lambda: ledger_states(out).get(str(scans / "series")) == "failed", 60, "the series refused", proc)
        first = json.loads((out / "results" / "kept.tif.json").read_text())["slide"]["sha256"]

        # A done slide is replaced by a link to a file outside: its old results go, it is refused.
        (scans / "kept.tif").unlink()
        (scans / "kept.tif").symlink_to(secret)
        # A new slide is swapped for a link out while it settles.
        shutil.copy(small(slide_factory, "new.tif", 6), scans / "new.tif")
        time.sleep(0.1)
        (scans / "new.tif").unlink()
        (scans / "new.tif").symlink_to(secret)
        wait_for(lambda: ledger_states(out).get(str(scans / "kept.tif")) == "failed" and
                 ledger_states(out).get(str(scans / "new.tif")) == "failed", 60, "both links refused", proc)
        time.sleep(3)  # three rescans
    finally:
        assert stop(proc) == 0
    rows = csv_rows(out)
    assert sha256_file(secret) not in {r["sha256"] for r in rows}  # never hashed, never read
    assert not (out / "results" / "kept.tif.json").exists() and not (out / "results" / "kept.tif.png").exists()
    assert not (out / "results" / "new.tif.json").exists()
    errors = {Path(r["slide"]).name: r["error"] for r in rows if r["status"] == "failed"}
    assert set(errors) == {"series", "kept.tif", "new.tif"}
    assert "zz.dcm: is a symbolic link to /etc/passwd, outside the watched folder" in errors["series"]
    assert "outside the watched folder" in errors["kept.tif"] and "outside" in errors["new.tif"]
    assert [r["sha256"] for r in rows if r["status"] == "done"] == [first]
    sha_of_refused = ledger(out, "SELECT sha256 FROM slides WHERE state = 'failed'")
    assert sha_of_refused == [(None,)] * 3
    log = (tmp_path / "out.log").read_text()
    assert sum("kept.tif" in line and "symbolic link" in line for line in log.splitlines()) == 1


def test_a_tiny_file_declaring_a_gigantic_image_is_refused_at_once(onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    write_huge_header_tiff(scans / "a-huge.tif")  # 500 x 500 mm declared, 0.5 MB on disk
    # Plausible size, but no pyramid: its overview alone would decode 1.6 G pixels.
    write_huge_header_tiff(scans / "b-flat.tif", 40_000, 40_000, tile=1024)
    shutil.copy(small(slide_factory, "ok.tif", 2), scans / "c-ok.tif")

    started = time.monotonic()
    result = edge("run", str(scans), "--model", str(onnx_bundle), "--out", str(out), "--pixel-budget",
                  "100000000", timeout=120)
    seconds = time.monotonic() - started

    assert result.returncode == 1 and "1 done, 2 failed" in result.stdout
    assert seconds < 60
    errors = {Path(r["slide"]).name: r["error"] for r in csv_rows(out) if r["status"] == "failed"}
    assert "1,000,000 x 1,000,000 pixels at 0.5 µm/px, that is 500 x 500 mm, larger than any glass slide" \
        in errors["a-huge.tif"]
    assert "40,000 x 40,000 = 1,600,000,000 pixels from pyramid level 0" in errors["b-flat.tif"]
    assert "give the slide a pyramid" in errors["b-flat.tif"]
    kinds = dict(ledger(out, "SELECT path, error_kind FROM slides WHERE state = 'failed'"))
    assert set(kinds.values()) == {"permanent"}  # refused once, not retried


def test_long_names_empty_truncated_and_unknown_files(onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    slide = small(slide_factory, "s.tif", 1)
    long_name = "x" * 246 + ".svs"  # 250 bytes: the longest names the filesystem takes
    shutil.copy(slide, scans / long_name)
    (scans / "empty.svs").touch()
    data = Path(slide).read_bytes()
    (scans / "truncated.tif").write_bytes(data[: len(data) // 3])
    (scans / "olympus.vsi").write_bytes(b"vsi")
    (scans / "readme.txt").write_text("notes")

    result = edge("run", str(scans), "--model", str(onnx_bundle), "--out", str(out), "--retry-delay", "0")

    assert result.returncode == 1 and "1 done, 2 failed" in result.stdout and "2 not slides" in result.stdout
    done = json.loads(next((out / "results").glob("x*.json")).read_text())
    assert done["slide"]["name"] == long_name and done["slide"]["sha256"] == sha256_file(slide)
    assert all(len(os.fsencode(p.name)) <= 255 for p in (out / "results").iterdir())
    assert not list((out / "results").glob(".*"))  # no temporary file left behind
    errors = {Path(r["slide"]).name: r for r in csv_rows(out) if r["status"] == "failed"}
    assert "is empty (0 bytes)" in errors["empty.svs"]["error"]
    assert "is truncated: it ends at byte" in errors["truncated.tif"]["error"]
    assert errors["truncated.tif"]["sha256"] == sha256_file(scans / "truncated.tif")  # failed rows say what failed
    status = edge("status", "--out", str(out))
    assert "skipped 2 (not slides)" in status.stdout
    assert "olympus.vsi: an Olympus/Evident VSI slide" in status.stdout
    assert "readme.txt: not a slide format the watcher reads (.txt)" in status.stdout


def test_run_on_a_dicom_series_folder_also_classifies_the_other_slides_in_it(onnx_bundle, slide_factory, tmp_path,
                                                                           slides_dir):
    folder, out = tmp_path / "case", tmp_path / "out"
    shutil.copytree(slides_dir / "dicom" / "CMU-1-Small-Region", folder)
    shutil.copy(small(slide_factory, "s.tif", 1), folder / "extra.tif")
    (folder / "deeper").mkdir()
    shutil.copy(small(slide_factory, "t.tif", 2), folder / "deeper" / "more.tif")

    result = edge("run", str(folder), "--model", str(onnx_bundle), "--out", str(out))

    assert result.returncode == 0, result.stderr
    assert sorted(Path(p).name for p in ledger_states(out)) == ["case", "extra.tif", "more.tif"]


def test_new_content_with_the_old_size_and_mtime_is_classified_again_but_a_chmod_is_not(
        onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    big, little = sorted((small(slide_factory, "a.tif", 1), small(slide_factory, "b.tif", 2)),
                         key=os.path.getsize, reverse=True)
    # Another slide, padded to the first one's size (a TIFF ignores bytes after its data).
    same_size = Path(little).read_bytes().ljust(os.path.getsize(big), b"\0")
    target = scans / "case.tif"
    shutil.copy(big, target)
    assert edge("run", str(scans), "--model", str(onnx_bundle), "--out", str(out)).returncode == 0
    stat = target.stat()

    os.chmod(target, 0o600)  # ctime changes, content does not: no new classification
    result = edge("run", str(scans), "--model", str(onnx_bundle), "--out", str(out))
    assert result.returncode == 0 and len(csv_rows(out)) == 1

    time.sleep(0.01)
    target.write_bytes(same_size)  # rsync -t / cp -p: new bytes, old size and mtime
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert edge("run", str(scans), "--model", str(onnx_bundle), "--out", str(out)).returncode == 0

    rows = csv_rows(out)
    assert len(rows) == 2 and rows[1]["sha256"] == sha256_file(target) != rows[0]["sha256"]


@contextmanager
def in_process(onnx_bundle: Path, tmp_path: Path, **options) -> Iterator[tuple[Path, Ledger, EdgeRunner]]:
    """A scan folder, an output ledger and a runner in this process, for races a test sets up."""
    from lowmag.bundle import load_bundle
    from lowmag.edge.backends import choose_backend

    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    bundle = load_bundle(onnx_bundle)
    ledger = Ledger(out)
    try:
        yield scans, ledger, EdgeRunner(out, ledger, bundle, choose_backend(bundle), options=RunnerOptions(**options))
    finally:
        ledger.close()


def test_a_failure_of_a_file_replaced_as_it_was_claimed_is_not_recorded_twice(onnx_bundle, tmp_path):
    with in_process(onnx_bundle, tmp_path, retry_delay_s=0) as (scans, ledger, runner):
        path = scans / "a.svs"
        path.write_bytes(b"not a slide")
        unit = SlideUnit(path, "file", scans)
        ledger.enqueue(unit, unit.signature())
        old = ledger.claim()
        path.write_bytes(b"still not a slide, but another file")  # the replacement lands as it is claimed
        assert ledger.enqueue(unit, unit.signature()) == "replaced"

        assert runner.process(old).status == "stale"
        assert not (runner.out / "summary.csv").exists()
        assert runner.process(ledger.claim()).status == "failed"
    [row] = csv_rows(runner.out)
    assert row["status"] == "failed" and row["sha256"] == sha256_file(path)


def test_a_slide_written_again_after_it_was_queued_is_classified_once_as_it_is_now(
        onnx_bundle, slide_factory, tmp_path):
    """The soak's find: a worker read the new content under the old version, then the
    watcher queued the new version and the same content got a second CSV row."""
    with in_process(onnx_bundle, tmp_path, settle_s=0.3) as (scans, ledger, runner):
        path = scans / "case.tif"
        shutil.copy(small(slide_factory, "a.tif", 1), path)
        unit = SlideUnit(path, "file", scans)
        ledger.enqueue(unit, unit.signature())
        job = ledger.claim()
        shutil.copy(small(slide_factory, "b.tif", 2), path)  # rewritten before the watcher saw it settle

        assert runner.process(job).status == "stale"
        assert ledger.claim() is None  # due only once it could have settled
        time.sleep(0.35)
        again = ledger.claim()
        assert again.version == job.version + 1 and runner.process(again).status == "done"
    [row] = csv_rows(runner.out)
    assert row["sha256"] == sha256_file(path)


def test_a_failure_whose_ledger_write_hits_a_full_disk_is_recorded_once_when_space_returns(
        onnx_bundle, tmp_path, monkeypatch):
    with in_process(onnx_bundle, tmp_path) as (scans, ledger, runner):
        path = scans / "a.svs"
        path.write_bytes(b"not a slide")
        unit = SlideUnit(path, "file", scans)
        ledger.enqueue(unit, unit.signature())
        real_failed = ledger.failed

        def full_once(*args, **kwargs):
            monkeypatch.setattr(ledger, "failed", real_failed)
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(ledger, "failed", full_once)
        assert runner.process(ledger.claim()).status == "paused"  # its CSV row is written, the ledger's not
        assert runner.gate.blocked and ledger.counts()["queued"] == 1
        monkeypatch.setattr(runner.gate, "_next_probe", 0.0)
        assert runner.gate.is_open(ledger)  # the probe write works: resume
        assert runner.process(ledger.claim()).status == "failed"
    assert [r["status"] for r in csv_rows(runner.out)] == ["failed"]
    assert ledger_states(runner.out) == {str(path): "failed"}


def test_a_slide_replaced_while_it_failed_is_neither_failed_nor_quarantined(onnx_bundle, slide_factory, tmp_path):
    from lowmag.errors import UnsupportedSlideError

    with in_process(onnx_bundle, tmp_path, quarantine=tmp_path / "quarantine") as (scans, ledger, runner):
        path = scans / "case.svs"
        path.write_bytes(b"not a slide")
        unit = SlideUnit(path, "file", scans)
        ledger.enqueue(unit, unit.signature())

        class ReplacedMeanwhile:
            def classify(self, *args, **kwargs):
                shutil.copy(small(slide_factory, "good.tif", 3), path)  # rsync renames the rescan into place
                raise UnsupportedSlideError(path, "not a slide format.")

        runner._local.classifier = ReplacedMeanwhile()
        assert runner.process(ledger.claim()).status == "stale"
        assert path.exists() and not (tmp_path / "quarantine").exists()
        assert not (runner.out / "summary.csv").exists()
        assert ledger_states(runner.out) == {str(path): "queued"}  # the new file, due once it settled
