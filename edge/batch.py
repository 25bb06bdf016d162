"""Opening an output folder safely, and the one-shot ``edge-classify run`` over existing slides."""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from lowmag.bundle import Bundle
from lowmag.edge.backends import BackendChoice
from lowmag.edge.ledger import Ledger
from lowmag.edge.lock import OutputLock
from lowmag.edge.pipeline import PipelineConfig
from lowmag.edge.results import CSV_NAME, append_csv, csv_row
from lowmag.edge.runner import (
    WORKER_THREAD_PREFIX, Dispatcher, EdgeRunner, Outcome, OutputGate, OutputUnavailable, RunnerOptions, output_problem,
)
from lowmag.edge.scan import SlideUnit, find_units
from lowmag.edge.watcher import enqueue_unit
from lowmag.errors import LowmagError
from lowmag.io import TEMP_PREFIX
from lowmag.edge.ledger import Job
from lowmag.names import shown

logger = logging.getLogger("lowmag.edge")


@contextmanager
def open_output(out: Path, max_attempts: int) -> Iterator[Ledger]:
    """Lock ``out``, open its ledger and recover from a previous crash; release on exit.

    The lock is not released while a worker thread still runs (a slide that outlasted the
    stop): then it stays held until the process exits, so no second process can claim
    the same slide meanwhile.
    """
    lock = OutputLock(out).acquire()
    try:
        try:
            ledger = Ledger(out)
        except sqlite3.Error as error:
            if not output_problem(error):
                raise
            raise OutputUnavailable(out, error, resumes=False) from error
        try:
            requeued, failed = ledger.recover(max_attempts)
            if requeued or failed:
                logger.warning("%s: the last run stopped mid-slide; %d slide(s) queued again, %d failed after "
                               "%d interrupted attempts", shown(out), requeued, len(failed), max_attempts)
            for job in failed:
                append_csv(out / CSV_NAME, csv_row("failed", job.path, f"{job.id}.{job.version}.{'-' * 16}",
                                                   error=f"{job.shown}: the process stopped while classifying it "
                                                   f"{job.attempts} times", sha256=job.sha256 or ""),
                           skip_if_present=True)
                logger.error("failed %s: the process stopped while classifying it %d times; it is not retried "
                             "automatically", job.shown, job.attempts)
            _remove_stale_temporaries(out)
            yield ledger
        finally:
            if not workers_alive():
                ledger.close()
    finally:
        if workers_alive():
            logger.warning("%s: a worker is still running; the output lock is held until this process exits",
                           shown(out))
        else:
            lock.release()


def wait_until_writable(out: Path, stop: Callable[[], bool] = lambda: False) -> None:
    """Before a watcher opens its output: while the folder cannot be written (disk full...),
    log why and try again after 2 s, 4 s, ... up to every minute, instead of exiting (a
    service manager would restart it into the same failure)."""
    gate = OutputGate(out)
    error = gate.probe()
    if error is None:
        return
    gate.block(OutputUnavailable(out, error))
    while not stop() and not gate.is_open(None):
        time.sleep(0.25)


def workers_alive() -> bool:
    """Whether any edge worker thread of this process is still running."""
    return any(t.name.startswith(WORKER_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate())


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of atomic writes a killed process left behind (never results)."""
    for path in out.glob(f"{TEMP_PREFIX}*.tmp"):
        path.unlink(missing_ok=True)
    results = out / "results"
    if results.is_dir():
        for path in results.rglob(".*.tmp"):
            path.unlink(missing_ok=True)


def units_of(paths: list[Path]) -> list[SlideUnit]:
    """Slides named on the command line.

    A file is taken as given, whatever its name; a link given by name is followed (it was
    named on purpose). A folder is searched like a watched folder, and when it holds DICOM
    instances itself they are one series (``run SERIES_FOLDER``), next to the other slides
    in and below it. Each unit is keyed by its resolved folder, so the same slide named
    two ways is one slide.
    """
    units: list[SlideUnit] = []
    for path in paths:
        if path.is_file():
            real = Path(os.path.realpath(path))
            kind = "mrxs" if real.suffix.lower() == ".mrxs" else "file"
            units.append(SlideUnit(real, kind, real.parent))
        else:
            units.extend(find_units(path, root_dicom="series"))
    return units


@dataclass
class BatchReport:
    total: int
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: int = 0
    not_slides: int = 0
    seconds: float = 0.0
    #: Slides still being classified when the run stopped (the process must exit holding the lock).
    stuck: list[Job] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.status == "failed")

    @property
    def done(self) -> int:
        return sum(1 for o in self.outcomes if o.status in ("done", "unchanged"))

    def summary(self) -> str:
        ms = [o.ms for o in self.outcomes if o.status == "done"]
        text = f"{self.done} done, {self.failed} failed, {self.skipped} already done (skipped)"
        if self.not_slides:
            text += f", {self.not_slides} not slides (see edge-classify status)"
        if ms:
            text += (f"; median {statistics.median(ms):.0f} ms per slide; "
                     f"{3600 * self.done / max(self.seconds, 1e-9):.0f} slides/hour over {self.seconds:.1f} s")
        return text


def run_batch(paths: list[Path], out: Path, bundle: Bundle, choice: BackendChoice, config: PipelineConfig,
              options: RunnerOptions, reprocess: bool = False,
              install_signals: Callable[[Callable[[], None]], None] | None = None) -> BatchReport:
    """Classify the slides once (skipping those done before unless ``reprocess``).

    When the output folder cannot be written (disk full...), the slides in hand go back to
    the queue and the run stops with an error naming the folder and the fix; running the
    same command again later picks them up.
    """
    import click

    units = units_of(paths)
    with open_output(out, options.max_attempts) as ledger:
        report = BatchReport(total=len(units))
        for unit in units:
            signature = unit.signature()
            if signature is None:
                logger.warning("%s holds no slide files; skipped", shown(unit.path))
                continue
            status = enqueue_unit(ledger, out, unit, signature)
            if unit.skipped:
                report.not_slides += 1
            elif status == "known" and not ledger.requeue(unit, ("failed", "done") if reprocess else ("failed",)):
                report.skipped += 1
        runner = EdgeRunner(out, ledger, bundle, choice, config, options)
        runner.check_backend()
        outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        runner.on_outcome = outcomes.put
        dispatcher = Dispatcher(runner)
        if install_signals is not None:
            install_signals(runner.stop.set)
        started = time.perf_counter()
        total = ledger.pending()
        with click.progressbar(length=total, label="classifying", show_pos=True) as bar:
            while not runner.stop.is_set():
                dispatcher.fill()
                _collect(outcomes, report, bar)
                if not dispatcher.busy() and (ledger.pending() == 0 or runner.gate.blocked):
                    break
                if not dispatcher.busy():  # only retries waiting for their delay are left
                    time.sleep(0.2)
                time.sleep(0.02)
            report.stuck = dispatcher.shutdown(timeout=60.0)
            _collect(outcomes, report, bar)
        report.seconds = time.perf_counter() - started
        if runner.gate.problem is not None and not report.stuck:
            raise LowmagError(f"{runner.gate.problem} {ledger.pending()} slide(s) are still queued: run the same "
                              "command again once the folder can be written.")
        return report


def _collect(outcomes: "queue.SimpleQueue[Outcome]", report: BatchReport, bar) -> None:
    while True:
        try:
            outcome = outcomes.get_nowait()
        except queue.Empty:
            return
        report.outcomes.append(outcome)
        if outcome.status in ("done", "failed", "stale", "unchanged"):
            bar.update(1)

