"""Process queued slides: one worker thread per ``--workers``, each with its own session.

``EdgeRunner.process`` is the per-slide boundary where every error is caught, recorded
in the ledger with its reason, and the runner goes on. Failures whose cause may pass
(a read error on a file still settling on a network share, an I/O error) are retried
with a growing delay up to ``max_attempts``; those that cannot pass (not a slide, no
µm/px, no tissue, too large) fail at once, and are moved to ``quarantine`` when one is
set. Each slide gets one log line: path, label, confidence, milliseconds.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lowmag.bundle import Bundle
from lowmag.edge.backends import BackendChoice, open_session
from lowmag.edge.ledger import Job, Ledger
from lowmag.edge.pipeline import PipelineConfig, SlideClassifier, SlideInterrupted
from lowmag.edge.results import CSV_NAME, append_csv, csv_row, output_paths, write_slide_outputs
from lowmag.edge.scan import SlideUnit
from lowmag.errors import (
    ImplausibleMppError, LowmagError, MissingMppError, SlideError, SlideReadError, SlideTooLargeError,
    UnsupportedSlideError, without_path,
)
from lowmag.runtimes import RuntimeUnavailableError

logger = logging.getLogger("lowmag.edge")

#: Errors that the same file will raise again however often it is retried.
PERMANENT_ERRORS = (UnsupportedSlideError, MissingMppError, ImplausibleMppError, SlideTooLargeError)


@dataclass(frozen=True)
class RunnerOptions:
    workers: int = 1
    threads: int | None = None
    max_attempts: int = 3
    retry_delay_s: float = 30.0
    quarantine: Path | None = None
    rebuild_engine: bool = False


@dataclass(frozen=True)
class Outcome:
    job: Job
    status: str  # "done", "retry", "failed", "released", "stale"
    label: str = ""
    confidence: float = 0.0
    ms: float = 0.0
    error: str = ""


def error_kind(error: BaseException) -> str:
    """'permanent' for what a retry cannot fix, else 'transient'."""
    if isinstance(error, PERMANENT_ERRORS):
        return "permanent"
    if isinstance(error, SlideReadError):
        return "transient"  # a truncated or still-settling file may read fine later
    if isinstance(error, SlideError):
        return "permanent"  # no tissue, scanned too coarse
    if isinstance(error, LowmagError):
        return "permanent"  # e.g. a bundle this slide cannot be run with
    return "transient"  # OSError, MemoryError, an unexpected fault: bounded retries


def vips_for_worker_threads() -> None:
    """Turn libvips' operation cache off: workers run libvips from several Python threads.

    With the cache on, 8 worker threads x 100 slides in one process ended in a segmentation
    fault (a libvips worker thread calling a null function pointer) in 3 of 10 runs, and CI
    lost a watcher with 2 workers the same way; with it off, 16 runs of 16 finished. The
    cache buys nothing here: every image libvips sees comes from a fresh numpy array.
    """
    import pyvips

    pyvips.cache_set_max(0)


class EdgeRunner:
    """Classifies claimed slides and records every outcome in the ledger and the CSV."""

    def __init__(self, out: Path, ledger: Ledger, bundle: Bundle, choice: BackendChoice,
                 config: PipelineConfig = PipelineConfig(), options: RunnerOptions = RunnerOptions()) -> None:
        vips_for_worker_threads()
        self.out = Path(out)
        self.ledger = ledger
        self.bundle = bundle
        self.choice = choice
        self.config = config
        self.options = options
        self.stop = threading.Event()
        self._local = threading.local()
        self.on_outcome: Callable[[Outcome], None] | None = None

    def check_backend(self) -> None:
        """Open (and drop) one session now, so a bundle the runtime cannot load stops the
        command with its reason instead of failing every slide one by one."""
        try:
            open_session(self.bundle, self.choice, self.options.threads, self.options.rebuild_engine)
        except LowmagError:
            raise
        except Exception as error:  # a runtime's own exception: say which bundle and runtime
            raise RuntimeUnavailableError(
                f"{self.bundle.directory}: {self.choice.describe()} cannot load the model ({error}). "
                "Try --backend or --device to pick another runtime.") from error

    def classifier(self) -> SlideClassifier:
        """This thread's classifier (sessions are not shared between threads)."""
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            session = open_session(self.bundle, self.choice, self.options.threads, self.options.rebuild_engine)
            classifier = self._local.classifier = SlideClassifier(self.bundle, session, self.config)
        return classifier

    def process(self, job: Job) -> Outcome:
        """Classify one claimed slide; never raises (except on KeyboardInterrupt/SystemExit)."""
        started = time.perf_counter()
        sha256 = None
        try:
            unit = SlideUnit(job.path, job.kind, job.path.parent)
            if not job.path.exists():
                raise UnsupportedSlideError(job.path, "the file disappeared before it could be read.",
                                            "nothing to do if it was moved away on purpose.")
            result = self.classifier().classify(job.path, unit.files(), should_stop=self.stop.is_set)
            sha256 = result.sha256
            if not self.ledger.is_current(job):  # replaced mid-way: the new file's result must win
                logger.warning("%s was replaced while it was being classified; the new file is queued", job.path)
                return self._report(Outcome(job, "stale"))
            document = write_slide_outputs(self.out, job.relative, result, self.bundle, self.choice,
                                           self.options.threads, self.config.review_threshold)
            json_path = output_paths(self.out, job.relative)["json"]
            row = csv_row("done", job.path, self._result_id(job, sha256), document, result_path=json_path)
            append_csv(self.out / CSV_NAME, row, skip_if_present=job.attempts > 1)
            ms = document["timings_ms"]["total"]
            if not self.ledger.done(job, sha256, result.label, result.confidence, result.needs_review, ms,
                                    str(json_path)):
                logger.warning("%s was replaced while it was being classified; the new file is queued", job.path)
                return self._report(Outcome(job, "stale"))
            review = " needs_review" if result.needs_review else ""
            logger.info("done %s label=%s confidence=%.3f ms=%.0f%s", job.path, result.label, result.confidence,
                        ms, review)
            return self._report(Outcome(job, "done", result.label, result.confidence, ms))
        except SlideInterrupted:
            self.ledger.release(job)
            logger.info("released %s (shutting down); it will be classified on the next start", job.path)
            return self._report(Outcome(job, "released"))
        except Exception as error:  # the per-slide boundary: record, go on
            return self._report(self._failed(job, error, sha256, time.perf_counter() - started))

    def _result_id(self, job: Job, sha256: str) -> str:
        return f"{job.id}.{job.version}.{sha256[:16]}"

    def _failed(self, job: Job, error: Exception, sha256: str | None, seconds: float) -> Outcome:
        kind = error_kind(error)
        message = str(error) if isinstance(error, LowmagError) else f"{type(error).__name__}: {error}"
        if not isinstance(error, LowmagError):
            logger.debug("unexpected error on %s", job.path, exc_info=error)
        if kind == "transient" and job.attempts < self.options.max_attempts:
            delay = self.options.retry_delay_s * 2 ** (job.attempts - 1)
            self.ledger.failed(job, message, kind, retry_in=delay, sha256=sha256)
            logger.warning("retry %s in %.0f s (attempt %d of %d): %s", job.path, delay, job.attempts,
                           self.options.max_attempts, without_path(message, job.path))
            return Outcome(job, "retry", error=message)
        self.ledger.failed(job, message, kind, retry_in=None, sha256=sha256)
        row = csv_row("failed", job.path, self._result_id(job, sha256 or "-" * 16), error=message,
                      sha256=sha256 or "")
        append_csv(self.out / CSV_NAME, row, skip_if_present=job.attempts > 1)
        logger.error("failed %s ms=%.0f: %s", job.path, seconds * 1000, without_path(message, job.path))
        if self.options.quarantine is not None:
            self._quarantine(job)
        return Outcome(job, "failed", error=message)

    def _quarantine(self, job: Job) -> None:
        """Move a failed slide (with a MIRAX data folder) out of the scan folder, keeping its path."""
        root = self.options.quarantine
        if (root / job.relative).exists():
            root = root / time.strftime("%Y%m%dT%H%M%S")
        destination = root / job.relative
        moves = [(job.path, destination)]
        if job.kind == "mrxs" and job.path.with_suffix("").is_dir():
            moves.append((job.path.with_suffix(""), destination.with_suffix("")))
        elif job.kind == "dicom-folder":  # only the series' instances: other files there are not this slide
            moves = [(f, destination / f.name) for f in SlideUnit(job.path, job.kind, job.path.parent).files()]
        try:
            for source, target in moves:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(source), str(target))
        except OSError as error:
            logger.error("could not move %s to quarantine %s: %s", job.path, destination, error)
            return
        self.ledger.quarantined(job, destination)
        logger.warning("moved %s to quarantine: %s", job.path, destination)

    def _report(self, outcome: Outcome) -> Outcome:
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome


class Dispatcher:
    """Hands claimed slides to a pool of worker threads, at most ``workers`` at a time."""

    def __init__(self, runner: EdgeRunner) -> None:
        self.runner = runner
        self.pool = ThreadPoolExecutor(max_workers=runner.options.workers, thread_name_prefix="edge-worker")
        self.in_flight: dict[Future, Job] = {}

    def fill(self) -> int:
        """Claim due slides until every worker has one; returns how many were started."""
        started = 0
        self.in_flight = {f: j for f, j in self.in_flight.items() if not f.done()}
        while not self.runner.stop.is_set() and len(self.in_flight) < self.runner.options.workers:
            job = self.runner.ledger.claim()
            if job is None:
                break
            self.in_flight[self.pool.submit(self.runner.process, job)] = job
            started += 1
        return started

    def busy(self) -> bool:
        self.in_flight = {f: j for f, j in self.in_flight.items() if not f.done()}
        return bool(self.in_flight)

    def shutdown(self, timeout: float) -> list[Job]:
        """Stop claiming, let the slides in hand finish or release; returns those still running."""
        self.runner.stop.set()
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck = list(self.in_flight.values())
        for job in stuck:
            self.runner.ledger.release(job)
        self.pool.shutdown(wait=not stuck, cancel_futures=True)
        return stuck
