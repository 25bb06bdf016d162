"""``edge-classify watch`` as a service runs it: a real process, real files, real signals."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from lowmag.io import sha256_file
from lowmag.synthetic import Blob, write_in_pieces
from tests.edge.conftest import ledger_states, start_watch, stop, wait_for

FAST = ("--settle", "1", "--threads", "1")


def csv_rows(out: Path) -> list[dict[str, str]]:
    path = out / "summary.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def done(out: Path, n: int):
    return lambda: list(ledger_states(out).values()).count("done") >= n


def test_slides_written_in_pieces_are_classified_once_complete(onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    (scans / "day1").mkdir(parents=True)
    proc = start_watch(scans, out, onnx_bundle, *FAST)
    try:
        wait_for(lambda: (out / "ledger.sqlite").exists(), 30, "the watcher to start", proc)
        # A second watcher on the same output folder is refused, naming the first.
        second = start_watch(scans, out, onnx_bundle, *FAST, log=tmp_path / "second.log")
        assert second.wait(timeout=60) == 1
        assert "already writing here" in (tmp_path / "second.log").read_text()

        a = slide_factory("a.tif", seed=1)
        # 1.6 s of writing in 4 pieces, each pause under the 1 s settle time.
        write_in_pieces(a, scans / "day1" / "a.svs", pieces=4, pause=0.4)
        assert not ledger_states(out), "a slide still being written was queued"
        # Copy tools write under a temporary name and rename when done.
        shutil.copy(slide_factory("b.tif", seed=2), scans / "b.tif.part")
        (scans / "notes.tif~").write_bytes(b"editor backup")
        (scans / ".hidden.tif").write_bytes(b"dot file")
        outside = tmp_path / "outside.tif"
        shutil.copy(slide_factory("c.tif", seed=3), outside)
        (scans / "link-out.tif").symlink_to(outside)
        time.sleep(1.5)
        assert set(ledger_states(out)) <= {str(scans / "day1" / "a.svs"), str(scans / "link-out.tif")}
        (scans / "b.tif.part").rename(scans / "b.tif")
        wait_for(done(out, 2), 60, "two slides done", proc)
        time.sleep(1.5)
        assert ledger_states(out) == {str(scans / "day1" / "a.svs"): "done", str(scans / "b.tif"): "done",
                                      str(scans / "link-out.tif"): "failed"}
        doc = json.loads((out / "results" / "day1" / "a.svs.json").read_text())
        assert doc["slide"]["sha256"] == sha256_file(scans / "day1" / "a.svs")
        assert sorted(r["status"] for r in csv_rows(out)) == ["done", "done", "failed"]
        assert not (out / "results" / "link-out.tif.json").exists()
    finally:
        code = stop(proc)
    assert code == 0
    log = (out.parent / "out.log").read_text()
    refusals = [line for line in log.splitlines() if "link-out.tif" in line]
    assert len(refusals) == 1 and "is a symbolic link to" in refusals[0]  # refused once, not at every rescan
    assert "SIGTERM" in log


def test_polling_mode_and_a_slide_replaced_under_the_same_name(onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    # Events are off and the rescan is an hour away: only polling can see these slides.
    proc = start_watch(scans, out, onnx_bundle, *FAST, "--poll", "--poll-interval", "0.3",
                       "--rescan-interval", "3600")
    try:
        wait_for(lambda: (out / "ledger.sqlite").exists(), 30, "the watcher to start", proc)
        time.sleep(0.5)  # the startup rescan has run
        shutil.copy(slide_factory("v1.tif", seed=1), scans / "case.tif")
        wait_for(done(out, 1), 60, "the slide done", proc)
        first = json.loads((out / "results" / "case.tif.json").read_text())

        # The scanner rescans the case and writes a new file under the same name.
        replacement = slide_factory("v2.tif", 1200, 900, seed=7, blobs=(Blob(600, 450, 300, 300),))
        shutil.copy(replacement, scans / "case.tif")
        wait_for(lambda: len(csv_rows(out)) == 2 and (out / "results" / "case.tif.json").exists(), 60,
                 "the replaced slide classified again", proc)
        second = json.loads((out / "results" / "case.tif.json").read_text())
        assert second["slide"]["sha256"] == sha256_file(replacement) != first["slide"]["sha256"]
        assert second["tissue"][0]["box_px"] != first["tissue"][0]["box_px"]
        assert [r["sha256"] for r in csv_rows(out)] == [first["slide"]["sha256"], second["slide"]["sha256"]]
    finally:
        assert stop(proc) == 0


def test_kill_9_mid_slide_then_restart_loses_nothing_and_doubles_nothing(onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    for i in range(3):  # slow slides: 4200 px of tissue in 16 px tiles take a few seconds each
        shutil.copy(slide_factory(f"slow{i}.tif", 4200, 3400, seed=10 + i), scans / f"slow{i}.tif")
    slow = ("--max-piece-px", "16", "--settle", "0.5", "--threads", "1")
    proc = start_watch(scans, out, onnx_bundle, *slow)
    # Killed the moment a slide is seen in hand: a pause here once let a slide finish and the
    # kill land between two slides (the pipeline got faster; the test must not depend on it).
    wait_for(lambda: "processing" in ledger_states(out).values(), 60, "a slide in hand", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    states = ledger_states(out)
    assert "processing" in states.values() and list(states.values()).count("done") < 3

    proc = start_watch(scans, out, onnx_bundle, *slow)
    try:
        wait_for(done(out, 3), 180, "all three slides done after the restart", proc)
    finally:
        assert stop(proc) == 0
    assert set(ledger_states(out).values()) == {"done"}
    rows = csv_rows(out)
    assert sorted(Path(r["slide"]).name for r in rows) == ["slow0.tif", "slow1.tif", "slow2.tif"]
    for i in range(3):
        doc = json.loads((out / "results" / f"slow{i}.tif.json").read_text())
        assert doc["slide"]["sha256"] == sha256_file(scans / f"slow{i}.tif")
    assert not [p for p in (out / "results").iterdir() if p.name.endswith(".tmp")]
    assert "queued again" in (out.parent / "out.log").read_text()


def test_200_slides_dropped_at_once(onnx_bundle, slide_factory, tmp_path):
    scans, out, staging = tmp_path / "scans", tmp_path / "out", tmp_path / "staging"
    scans.mkdir()
    staging.mkdir()
    one = slide_factory("small.tif", 384, 384, blobs=(Blob(192, 192, 150, 150),))
    for i in range(200):
        os.link(one, staging / f"s{i:03d}.tif") if i % 2 else shutil.copy(one, staging / f"s{i:03d}.tif")
    proc = start_watch(scans, out, onnx_bundle, "--settle", "0.5", "--threads", "1", "--workers", "2")
    try:
        wait_for(lambda: (out / "ledger.sqlite").exists(), 30, "the watcher to start", proc)
        for path in staging.iterdir():
            path.rename(scans / path.name)
        wait_for(done(out, 200), 240, "200 slides done", proc)
    finally:
        assert stop(proc) == 0
    rows = csv_rows(out)
    assert len(rows) == 200 and len({r["slide"] for r in rows}) == 200
    assert len(list((out / "results").glob("*.json"))) == 200


@pytest.mark.shared_data
def test_real_slides_and_bad_files_in_the_watched_folder(onnx_bundle, slides_dir, slide_factory, tmp_path):
    scans, out, quarantine = tmp_path / "scans", tmp_path / "out", tmp_path / "quarantine"
    shutil.copytree(slides_dir, scans)
    proc = start_watch(scans, out, onnx_bundle, *FAST, "--quarantine", str(quarantine), "--retry-delay", "0.2")
    try:
        wait_for(lambda: len(ledger_states(out)) >= 8 and
                 set(ledger_states(out).values()) <= {"done", "failed"}, 180, "every slide settled", proc)
        states = ledger_states(out)
        assert [p for p, s in states.items() if s == "done"] and [p for p, s in states.items() if s == "failed"]
        assert not (scans / "bad" / "untiled-ihc-no-mpp.tif").exists()  # moved to quarantine
        assert (quarantine / "bad" / "untiled-ihc-no-mpp.tif").exists()
        # The watcher carries on after its failures.
        shutil.copy(slide_factory("late.tif", seed=5), scans / "late.tif")
        wait_for(lambda: ledger_states(out).get(str(scans / "late.tif")) == "done", 60, "a later slide", proc)
    finally:
        assert stop(proc) == 0
    failed = {Path(r["slide"]).name: r["error"] for r in csv_rows(out) if r["status"] == "failed"}
    assert "no µm/px" in failed["TCGA-CR-7395-frozen-jp2k-no-mpp.svs"]
    assert "--assume-mpp" in failed["untiled-ihc-no-mpp.tif"]


def test_sigterm_releases_the_slide_in_hand_and_a_restart_finishes_it(onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    shutil.copy(slide_factory("slow0.tif", 3000, 2400, seed=10), scans / "slow.tif")
    slow = ("--max-piece-px", "16", "--settle", "0.5", "--threads", "1", "--shutdown-timeout", "30")
    proc = start_watch(scans, out, onnx_bundle, *slow)
    wait_for(lambda: "processing" in ledger_states(out).values(), 60, "the slide in hand", proc)
    started = time.monotonic()
    assert stop(proc) == 0
    assert time.monotonic() - started < 10  # released between tiles, not after the whole slide
    assert ledger_states(out) == {str(scans / "slow.tif"): "queued"}
    assert not (out / "results" / "slow.tif.json").exists() and not csv_rows(out)

    proc = start_watch(scans, out, onnx_bundle, *slow)
    try:
        wait_for(done(out, 1), 120, "the slide done after the restart", proc)
    finally:
        assert stop(proc) == 0
    assert len(csv_rows(out)) == 1
    assert "released" in (out.parent / "out.log").read_text()
