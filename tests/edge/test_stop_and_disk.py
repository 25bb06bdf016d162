"""Stops that outlast --shutdown-timeout, and an output disk that fills up (issue 12, items 4 and 5)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowmag.edge.lock import holder
from lowmag.synthetic import Blob
from tests.edge.conftest import REPO, edge, ledger_states, start_watch, stop, wait_for

#: edge-classify with the classification stage replaced by a call that ignores every stop,
#: as a decoder or runtime stuck in native code does.
_STUCK_WATCH = """
import sys, threading
from lowmag.edge import pipeline
pipeline.SlideClassifier.classify = lambda self, *args, **kwargs: threading.Event().wait()
from lowmag.edge.cli import main
sys.argv[0] = "edge-classify"
main()
"""


def csv_rows(out: Path) -> list[dict[str, str]]:
    path = out / "summary.csv"
    return list(csv.DictReader(path.open(encoding="utf-8"))) if path.exists() else []


def slide(slide_factory, name: str, seed: int) -> Path:
    return slide_factory(name, 512, 384, seed=seed, blobs=(Blob(256, 192, 150, 120),))


def test_a_stop_that_outlasts_the_timeout_keeps_the_lock_until_exit_and_fails_the_slide_in_the_end(
        onnx_bundle, slide_factory, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    shutil.copy(slide(slide_factory, "a.tif", 1), scans / "stuck.tif")
    args = ["watch", str(scans), "--model", str(onnx_bundle), "--out", str(out), "--settle", "0.3",
            "--shutdown-timeout", "1"]
    for attempt in (1, 2, 3):
        log = open(tmp_path / f"stuck{attempt}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-c", _STUCK_WATCH, *args], stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO)
        # (the previous process left the slide 'processing': wait until this one claimed it again)
        wait_for(lambda: "watching" in (tmp_path / f"stuck{attempt}.log").read_text() and
                 "processing" in ledger_states(out).values(), 60, "the slide in hand", proc)
        proc.send_signal(signal.SIGTERM)
        seen_locked = False
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            if holder(out) is None:  # only an exiting process may drop it (the kernel does, at exit)
                time.sleep(0.5)
                assert proc.poll() is not None, "the lock was dropped by a process that still runs"
            else:
                seen_locked = True
            time.sleep(0.05)
        assert proc.poll() == 0, "the stopped watcher did not exit after its shutdown timeout"
        assert seen_locked
        assert ledger_states(out) == {str(scans / "stuck.tif"): "processing"}
        assert f"still classifying {scans / 'stuck.tif'} after 1 s" in (tmp_path / f"stuck{attempt}.log").read_text()

    # The next start counts the three interrupted attempts and fails the slide with that reason.
    proc = start_watch(scans, out, onnx_bundle, "--settle", "0.3")
    try:
        wait_for(lambda: ledger_states(out).get(str(scans / "stuck.tif")) == "failed", 30, "the slide failed", proc)
    finally:
        assert stop(proc) == 0
    [row] = csv_rows(out)
    assert row["status"] == "failed" and "stopped while classifying it 3 times" in row["error"]


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (CI and these machines run as root)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def _fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s filesystem; returns the filler file."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


@pytest.fixture
def small_disk(tmp_path: Path):
    out = tmp_path / "out"
    _mount_tmpfs(out, "8m")
    yield out
    subprocess.run(["umount", "-l", str(out)], capture_output=True)


def test_a_full_output_disk_pauses_the_watcher_and_no_slide_fails_for_it(onnx_bundle, slide_factory, small_disk,
                                                                         tmp_path):
    scans, out = tmp_path / "scans", small_disk
    scans.mkdir()
    proc = start_watch(scans, out, onnx_bundle, "--settle", "0.3", "--threads", "1", "--retry-delay", "0.2",
                       log=tmp_path / "watch.log")
    try:
        wait_for(lambda: (out / "ledger.sqlite").exists(), 30, "the watcher to start", proc)
        shutil.copy(slide(slide_factory, "a.tif", 1), scans / "first.tif")
        wait_for(lambda: ledger_states(out).get(str(scans / "first.tif")) == "done", 60, "a first slide", proc)
        filler = _fill(out)
        for i in range(3):
            shutil.copy(slide(slide_factory, f"s{i}.tif", 10 + i), scans / f"s{i}.tif")
        wait_for(lambda: (tmp_path / "watch.log").read_text().count("(still; checking again") >= 2, 60,
                 "the pause logged again", proc)
        assert "failed" not in ledger_states(out).values()
        filler.unlink()  # space comes back: the watcher resumes by itself
        wait_for(lambda: list(ledger_states(out).values()).count("done") == 4, 120, "every slide done", proc)
    finally:
        assert stop(proc) == 0
    log = (tmp_path / "watch.log").read_text()
    assert f"{out}: cannot write results (No space left on device [" in log  # [ENOSPC] or [SQLITE_FULL]
    assert "free space on the disk that holds it" in log and "can be written again: classifying resumes" in log
    rows = csv_rows(out)
    assert [r["status"] for r in rows] == ["done"] * 4
    assert len({(r["slide"], r["sha256"]) for r in rows}) == 4
    assert not list(out.glob(".lowmag-*")) and not list((out / "results").glob(".*"))


def test_run_on_a_full_output_disk_stops_with_the_fix_and_a_rerun_finishes(onnx_bundle, slide_factory, small_disk,
                                                                          tmp_path):
    scans, out = tmp_path / "scans", small_disk
    scans.mkdir()
    for i in range(2):
        shutil.copy(slide(slide_factory, f"s{i}.tif", 20 + i), scans / f"s{i}.tif")
    edge("run", str(scans / "s0.tif"), "--model", str(onnx_bundle), "--out", str(out))  # the ledger exists
    filler = _fill(out)

    full = edge("run", str(scans), "--model", str(onnx_bundle), "--out", str(out))
    filler.unlink()
    again = edge("run", str(scans), "--model", str(onnx_bundle), "--out", str(out))

    assert full.returncode == 1 and "Traceback" not in full.stderr
    assert "cannot write results (No space left on device" in full.stderr
    assert "run the same command again" in full.stderr
    assert again.returncode == 0 and "1 done, 0 failed, 1 already done" in again.stdout
    assert [r["status"] for r in csv_rows(out)] == ["done", "done"]


#: edge-classify whose model check takes 3 s and says when it begins: a start slow enough to stop in.
_SLOW_START = """
import sys, time
from lowmag.edge import runner
real = runner.EdgeRunner.check_backend
def slow(self, *args, **kwargs):
    print("checking the backend", flush=True)
    time.sleep(3)
    return real(self, *args, **kwargs)
runner.EdgeRunner.check_backend = slow
from lowmag.edge.cli import main
sys.argv[0] = "edge-classify"
main()
"""


@pytest.mark.parametrize("command", ["watch", "run"])
def test_a_stop_during_the_start_is_a_clean_stop(onnx_bundle, slide_factory, tmp_path, command):
    """SIGTERM while the model is being checked (systemd stopping a unit it just started):
    the process stops cleanly with exit 0, not by the signal's default action."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    shutil.copy(slide(slide_factory, "a.tif", 1), scans / "a.tif")
    args = [command, str(scans), "--model", str(onnx_bundle), "--out", str(out)]
    log_path = tmp_path / "start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_START, *args], stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO)
        wait_for(lambda: "checking the backend" in log_path.read_text(), 60, "the start", proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    text = log_path.read_text()
    assert code == 0, text
    assert "SIGTERM: finishing or releasing the slides in hand, then stopping" in text
    assert set(ledger_states(out).values()) <= {"queued"}  # nothing was classified or lost
