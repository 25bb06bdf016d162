"""Opening an output folder safely, and the one-shot ``edge-classify run`` over existing slides."""

from __future__ import annotations

import logging
import queue
import statistics
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
from lowmag.edge.runner import Dispatcher, EdgeRunner, Outcome, RunnerOptions
from lowmag.edge.scan import DICOM_SUFFIX, SlideUnit, find_units
from lowmag.edge.watcher import enqueue_unit

logger = logging.getLogger("lowmag.edge")


@contextmanager
def open_output(out: Path, max_attempts: int) -> Iterator[Ledger]:
    """Lock ``out``, open its ledger and recover from a previous crash; release on exit."""
    with OutputLock(out):
        ledger = Ledger(out)
        try:
            requeued, failed = ledger.recover(max_attempts)
            if requeued or failed:
                logger.warning("%s: the last run stopped mid-slide; %d slide(s) queued again, %d failed after "
                               "%d interrupted attempts", out, requeued, failed, max_attempts)
            _remove_stale_temporaries(out)
            yield ledger
        finally:
            ledger.close()


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of atomic writes a killed process left behind (never results)."""
    results = out / "results"
    if results.is_dir():
        for path in results.rglob(".*.tmp"):
            path.unlink(missing_ok=True)


def units_of(paths: list[Path]) -> list[SlideUnit]:
    """Slides named on the command line: files as given, DICOM series folders, folders searched."""
    units: list[SlideUnit] = []
    for path in paths:
        path = path.absolute()
        if path.is_file():
            kind = "mrxs" if path.suffix.lower() == ".mrxs" else "file"
            units.append(SlideUnit(path, kind, path.parent))
        elif any(p.suffix.lower() == DICOM_SUFFIX for p in path.iterdir() if p.is_file()):
            units.append(SlideUnit(path, "dicom-folder", path.parent))
        else:
            units.extend(find_units(path))
    return units


@dataclass
class BatchReport:
    total: int
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.status == "failed")

    @property
    def done(self) -> int:
        return sum(1 for o in self.outcomes if o.status == "done")

    def summary(self) -> str:
        ms = [o.ms for o in self.outcomes if o.status == "done"]
        text = f"{self.done} done, {self.failed} failed, {self.skipped} already done (skipped)"
        if ms:
            text += (f"; median {statistics.median(ms):.0f} ms per slide; "
                     f"{3600 * self.done / max(self.seconds, 1e-9):.0f} slides/hour over {self.seconds:.1f} s")
        return text


def run_batch(paths: list[Path], out: Path, bundle: Bundle, choice: BackendChoice, config: PipelineConfig,
              options: RunnerOptions, reprocess: bool = False,
              install_signals: Callable[[Callable[[], None]], None] | None = None) -> BatchReport:
    """Classify the slides once (skipping those done before unless ``reprocess``)."""
    import click

    units = units_of(paths)
    with open_output(out, options.max_attempts) as ledger:
        report = BatchReport(total=len(units))
        for unit in units:
            signature = unit.signature()
            if signature is None:
                logger.warning("%s holds no slide files; skipped", unit.path)
                continue
            status = enqueue_unit(ledger, out, unit, signature)
            if status == "known" and not ledger.requeue(unit.path, ("failed", "done") if reprocess else ("failed",)):
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
                if not dispatcher.busy() and ledger.pending() == 0:
                    break
                if not dispatcher.busy():  # only retries waiting for their delay are left
                    time.sleep(0.2)
                time.sleep(0.02)
            dispatcher.shutdown(timeout=60.0)
            _collect(outcomes, report, bar)
        report.seconds = time.perf_counter() - started
        return report


def _collect(outcomes: "queue.SimpleQueue[Outcome]", report: BatchReport, bar) -> None:
    while True:
        try:
            outcome = outcomes.get_nowait()
        except queue.Empty:
            return
        report.outcomes.append(outcome)
        if outcome.status in ("done", "failed", "stale"):
            bar.update(1)

