"""Process queued slides: one worker thread per ``--workers``, each with its own session.

``EdgeRunner.process`` is the per-slide boundary where every error is caught, recorded
in the ledger with its reason, and the runner goes on. Failures whose cause may pass
(a read error on a file still settling on a network share, an I/O error reading it) are
retried with a growing delay up to ``max_attempts``; those that cannot pass (not a slide,
a link out of the folder, no µm/px, no tissue, too large) fail at once, and are moved to
``quarantine`` when one is set. A problem of the *output* folder (disk full, quota, I/O
error, read-only) is never the slide's fault: the slide goes back to the queue and the
``OutputGate`` pauses claiming until writing works again. Each slide gets one log line:
path, label, confidence, milliseconds.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lowmag.bundle import Bundle
from lowmag.edge.backends import BackendChoice, open_session
from lowmag.edge.ledger import Job, Ledger
from lowmag.edge.pipeline import (
    OutOfDistributionError, PipelineConfig, SlideClassifier, Timer, checked_content_hash,
)
from lowmag.edge.results import CSV_NAME, append_csv, csv_row, output_paths, remove_outputs, write_slide_outputs
from lowmag.edge.scan import SlideUnit, check_files, same_files
from lowmag.errors import (
    ImplausibleMppError, Interrupted, LowmagError, MissingMppError, SlideError, SlideReadError, SlideTooLargeError,
    UnsupportedSlideError, without_path,
)
from lowmag.io import TEMP_PREFIX
from lowmag.names import printable, shown
from lowmag.runtimes import RuntimeUnavailableError, Session

logger = logging.getLogger("lowmag.edge")

#: Names of the worker threads (the output lock is kept while one lives).
WORKER_THREAD_PREFIX = "edge-worker"

#: Errors that the same file will raise again however often it is retried.
PERMANENT_ERRORS = (UnsupportedSlideError, MissingMppError, ImplausibleMppError, SlideTooLargeError)

#: errno values that mean the output folder cannot take writes, whatever the slide (EACCES
#: too: only the output folder is ever written, so it is that folder's permissions).
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES})
#: The same, as SQLite says it (the ledger lives in the output folder).
OUTPUT_SQLITE_ERRORS = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")


@dataclass(frozen=True)
class RunnerOptions:
    workers: int = 1
    threads: int | None = None
    max_attempts: int = 3
    retry_delay_s: float = 30.0
    quarantine: Path | None = None
    rebuild_engine: bool = False
    #: Seconds a slide found changed while in hand waits before it is claimed again.
    settle_s: float = 2.0


@dataclass(frozen=True)
class Outcome:
    job: Job
    # "done", "retry", "failed", "released" (a stop), "stale", "paused" (output folder), "unchanged"
    status: str
    label: str = ""
    confidence: float = 0.0
    ms: float = 0.0
    error: str = ""


def error_kind(error: BaseException) -> str:
    """'permanent' for what a retry cannot fix, 'out_of_distribution' for a slide refused as
    unlike the training data (``--ood refuse``), else 'transient'."""
    if isinstance(error, OutOfDistributionError):
        return "out_of_distribution"
    if isinstance(error, PERMANENT_ERRORS):
        return "permanent"
    if isinstance(error, SlideReadError):
        return "transient"  # a truncated or still-settling file may read fine later
    if isinstance(error, SlideError):
        return "permanent"  # no tissue, scanned too coarse
    if isinstance(error, LowmagError):
        return "permanent"  # e.g. a bundle this slide cannot be run with
    return "transient"  # OSError, MemoryError, an unexpected fault: bounded retries


def output_problem(error: BaseException) -> bool:
    """True for errors that say the output folder cannot be written (not the slide's fault)."""
    if isinstance(error, OSError):
        return error.errno in OUTPUT_ERRNOS
    if isinstance(error, sqlite3.Error):
        name = getattr(error, "sqlite_errorname", "") or ""
        return name.startswith(OUTPUT_SQLITE_ERRORS) or "disk is full" in str(error) or "disk I/O" in str(error)
    return False


class OutputUnavailable(LowmagError):
    """Writing to the output folder failed for a reason of the folder (``output_problem``)."""

    def __init__(self, out: Path, cause: BaseException, resumes: bool = True) -> None:
        self.out = Path(out)
        self.cause = cause
        if isinstance(cause, OSError):
            reason = cause.strerror or str(cause)
            code = errno.errorcode.get(cause.errno, "") if cause.errno else ""
        else:  # SQLite, writing the ledger
            code = getattr(cause, "sqlite_errorname", "") or ""
            full = code in ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE")  # the -shm file cannot grow either
            reason = "No space left on device" if full else str(cause)
        fix = ("free space on the disk that holds it (or raise the quota, remount it read-write, or give this "
               "user write access to it)")
        then = (f"no slide is claimed or failed until it can. Fix: {fix}; classifying resumes by itself."
                if resumes else f"nothing was classified. Fix: {fix}, then run the same command again.")
        super().__init__(f"{shown(out)}: cannot write results ({reason}{' [' + code + ']' if code else ''}); {then}")


def vips_for_worker_threads() -> None:
    """Turn libvips' operation cache off: workers run libvips from several Python threads.

    With the cache on, 8 worker threads x 100 slides in one process ended in a segmentation
    fault (a libvips worker thread calling a null function pointer) in 3 of 10 runs, and CI
    lost a watcher with 2 workers the same way; with it off, 16 runs of 16 finished. The
    cache buys nothing here: every image libvips sees comes from a fresh numpy array.
    """
    import pyvips

    pyvips.cache_set_max(0)


class OutputGate:
    """Claiming pauses while the output folder cannot be written, and resumes by itself.

    The first failure logs the reason and the fix; then a probe write (1 MiB, fsynced,
    removed) is tried after 2 s, 4 s, ... up to every 60 s, each failure logged again, so
    a journal always shows why nothing is classified. Jobs whose release the ledger itself
    could not record are released once writing works.
    """

    FIRST_WAIT_S = 2.0
    MAX_WAIT_S = 60.0
    PROBE_BYTES = 1 << 20

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._lock = threading.Lock()
        self.problem: OutputUnavailable | None = None
        self._wait = self.FIRST_WAIT_S
        self._next_probe = 0.0
        self._unreleased: list[Job] = []

    @property
    def blocked(self) -> bool:
        return self.problem is not None

    def block(self, problem: OutputUnavailable, unreleased: Job | None = None) -> None:
        with self._lock:
            if unreleased is not None:
                self._unreleased.append(unreleased)
            if self.problem is None:
                self._wait = self.FIRST_WAIT_S
                self._next_probe = time.monotonic() + self._wait
                logger.error("%s (checking again in %.0f s)", problem, self._wait)
            self.problem = problem

    def is_open(self, ledger: Ledger | None) -> bool:
        """True when slides may be claimed (probing the folder when it is due)."""
        with self._lock:
            if self.problem is None:
                return True
            if time.monotonic() < self._next_probe:
                return False
            error = self.probe()
            if error is None and ledger is not None:
                try:
                    for job in self._unreleased:
                        ledger.release(job, "output")
                except sqlite3.Error as failure:
                    error = failure
            if error is None:
                logger.warning("%s can be written again: classifying resumes", shown(self.out))
                self.problem, self._unreleased = None, []
                return True
            self._wait = min(self._wait * 2, self.MAX_WAIT_S)
            self._next_probe = time.monotonic() + self._wait
            logger.error("%s (still; checking again in %.0f s)", self.problem, self._wait)
            return False

    def probe(self) -> BaseException | None:
        """Write, fsync and remove 1 MiB in the folder; the error if that fails."""
        probe = self.out / f"{TEMP_PREFIX}probe.tmp"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"\0" * self.PROBE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
            return None
        except OSError as error:
            return error
        finally:
            try:
                probe.unlink()
            except OSError:
                pass


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
        self.gate = OutputGate(self.out)
        self._local = threading.local()
        self._spare: Session | None = None  # the session check_backend opened, for the first worker
        self._spare_lock = threading.Lock()
        self.on_outcome: Callable[[Outcome], None] | None = None

    def check_backend(self) -> None:
        """Open one session now, so a bundle the runtime cannot load stops the command with
        its reason instead of failing every slide one by one; the first worker thread then
        uses it (the model is compiled once, not twice)."""
        try:
            session = open_session(self.bundle, self.choice, self.options.threads, self.options.rebuild_engine)
            with self._spare_lock:
                self._spare = session
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
            with self._spare_lock:
                session, self._spare = self._spare, None
            if session is None:
                session = open_session(self.bundle, self.choice, self.options.threads, self.options.rebuild_engine)
            classifier = self._local.classifier = SlideClassifier(self.bundle, session, self.config)
        return classifier

    def process(self, job: Job) -> Outcome:
        """Classify one claimed slide; never raises (except on KeyboardInterrupt/SystemExit)."""
        started = time.perf_counter()
        try:
            try:
                return self._report(self._classify(job))
            except Interrupted:
                return self._report(self._interrupted(job))
            except OutputUnavailable:
                raise
            except Exception as error:  # the per-slide boundary: record, go on
                sha256 = getattr(error, "lowmag_sha256", None)
                return self._report(self._failed(job, error, sha256, time.perf_counter() - started))
        except OutputUnavailable as problem:  # writing failed for the output folder's sake
            return self._report(self._pause(job, problem))

    def _classify(self, job: Job) -> Outcome:
        unit = SlideUnit(job.path, job.kind, job.root)
        checked = check_files(unit)  # links resolved once, inside the folder, regular files
        if not job.describes(unit.signature()):
            return self._changed(job)  # written again after it settled: its new version is queued
        timer = Timer()
        if not job.recheck:  # the usual case: the hash runs beside the classification
            return self._classified(job, unit, checked, timer, lambda: (
                *checked_content_hash(checked, self.stop.is_set), len(checked)))
        with timer.stage("hash"):  # a recheck needs the hash first: unchanged content keeps its result
            sha256, size = checked_content_hash(checked, self.stop.is_set)
        if sha256 == job.sha256:
            if self._writing(lambda: self.ledger.restore(job)):
                logger.info("unchanged %s: same content as before (only its inode or ctime changed); it keeps "
                            "its result", job.shown)
                return Outcome(job, "unchanged")
            return self._stale(job)
        self._writing(lambda: self.ledger.forget_outcome(job))
        self._writing(lambda: remove_outputs(self.out, job.relative))  # they describe other content
        return self._classified(job, unit, checked, timer, (sha256, size, len(checked)))

    def _classified(self, job: Job, unit: SlideUnit, checked: list, timer: Timer,
                    content: tuple[str, int, int] | Callable[[], tuple[str, int, int]]) -> Outcome:
        """Classify and write a slide whose files were checked (``content``: their hash, or
        the function that hashes them beside the classification)."""
        real = Path(os.path.realpath(job.path)) if job.kind == "dicom-folder" else checked[0].real
        # A failure carries the sha256 as lowmag_sha256: failed rows name the content they failed on.
        result = self.classifier().classify(real, should_stop=self.stop.is_set, timer=timer, content=content)
        sha256 = result.sha256
        if not same_files(checked) or not job.describes(unit.signature()):
            return self._changed(job)  # replaced, rewritten or swapped for a link while it was read
        if not self.ledger.is_current(job):  # replaced mid-way: the new file's result must win
            return self._stale(job)

        def write() -> dict | None:
            document = write_slide_outputs(self.out, job.relative, result, self.bundle, self.choice,
                                           self.options.threads, self.config.review_threshold, slide_path=job.path)
            json_path = output_paths(self.out, job.relative)["json"]
            row = csv_row("done", job.path, self._result_id(job, sha256), document, result_path=json_path)
            append_csv(self.out / CSV_NAME, row, skip_if_present=self._maybe_written(job))
            ms = document["timings_ms"]["total"]
            if not self.ledger.done(job, sha256, result.label, result.confidence, result.needs_review, ms,
                                    str(json_path), result.distribution.verdict):
                return None
            return document

        document = self._writing(write)
        if document is None:
            return self._stale(job)
        ms = document["timings_ms"]["total"]
        review = " needs_review" if result.needs_review else ""
        if result.distribution.out:
            review += " out_of_distribution: " + printable("; ".join(result.distribution.reasons))
        logger.info("done %s label=%s confidence=%.3f ms=%.0f%s", job.shown, result.label, result.confidence,
                    ms, review)
        return Outcome(job, "done", result.label, result.confidence, ms)

    def _writing(self, action: Callable[[], object]) -> object:
        """Run a write to the output folder; its folder's problems become ``OutputUnavailable``."""
        try:
            return action()
        except (OSError, sqlite3.Error) as error:
            if output_problem(error):
                raise OutputUnavailable(self.out, error) from error
            raise

    @staticmethod
    def _maybe_written(job: Job) -> bool:
        """Its CSV row may exist already: a retry after a crash, a stop or a full disk."""
        return job.attempts > 1 or job.last_error_kind in ("output", "interrupted")

    @staticmethod
    def _unchanged(job: Job) -> bool:
        """The slide's files still have the identity it was queued with (an unreadable or
        vanished file counts as unchanged: the failure says so)."""
        try:
            signature = SlideUnit(job.path, job.kind, job.root).signature()
        except OSError:
            return True
        return signature is None or job.describes(signature)

    def _changed(self, job: Job) -> Outcome:
        """The file is no longer the one that was queued (written again, replaced, swapped for
        a link): nothing is recorded for this version; the file as it is now is queued as a
        new version, due once it could have settled (``settle_s``)."""
        unit = SlideUnit(job.path, job.kind, job.root)
        signature = unit.signature()
        if signature is None:
            raise UnsupportedSlideError(job.path, "disappeared while it was being classified.",
                                        "nothing to do if it was moved away on purpose.")
        if not self.ledger.is_current(job):
            return self._stale(job)  # the watcher queued the new version already
        status = self._writing(lambda: self.ledger.enqueue(unit, signature, delay=self.options.settle_s))
        if status in ("replaced", "recheck"):
            if status == "replaced":
                self._writing(lambda: remove_outputs(self.out, job.relative))
            logger.warning("%s changed after it was queued (written again, replaced or swapped for a link); it is "
                           "classified again once it settles", job.shown)
        return Outcome(job, "stale")

    def _stale(self, job: Job) -> Outcome:
        logger.warning("%s was replaced while it was being classified; the new file is queued", job.shown)
        return Outcome(job, "stale")

    def _pause(self, job: Job, problem: OutputUnavailable) -> Outcome:
        try:
            self.ledger.release(job, "output")
            self.gate.block(problem)
        except sqlite3.Error:
            self.gate.block(problem, unreleased=job)
        return Outcome(job, "paused", error=str(problem))

    def _interrupted(self, job: Job) -> Outcome:
        state = self._writing(lambda: self.ledger.interrupted(job, self.options.max_attempts))
        if state == "failed":
            message = (f"{job.shown}: a stop interrupted its classification {job.attempts} times; it is not retried "
                       "automatically (edge-classify run retries it)")
            self._writing(lambda: append_csv(self.out / CSV_NAME, csv_row(
                "failed", job.path, self._result_id(job, "-" * 16), error=message), skip_if_present=True))
            logger.error("failed %s: %s", job.shown, without_path(message, job.path))
            return Outcome(job, "failed", error=message)
        logger.info("released %s (stopping); it will be classified on the next start", job.shown)
        return Outcome(job, "released")

    def _result_id(self, job: Job, sha256: str) -> str:
        return f"{job.id}.{job.version}.{sha256[:16]}"

    def _failed(self, job: Job, error: Exception, sha256: str | None, seconds: float) -> Outcome:
        kind = error_kind(error)
        message = printable(str(error) if isinstance(error, LowmagError) else f"{type(error).__name__}: {error}")
        if not isinstance(error, LowmagError):
            logger.debug("unexpected error on %s", job.shown, exc_info=error)
        if kind == "transient" and job.attempts < self.options.max_attempts:
            delay = self.options.retry_delay_s * 2 ** (job.attempts - 1)
            if not self._writing(lambda: self.ledger.failed(job, message, kind, retry_in=delay, sha256=sha256)):
                return self._stale(job)
            logger.warning("retry %s in %.0f s (attempt %d of %d): %s", job.shown, delay, job.attempts,
                           self.options.max_attempts, without_path(message, job.path))
            return Outcome(job, "retry", error=message)
        if not self.ledger.is_current(job):
            return self._stale(job)  # a replacement is queued: this failure is about a file that is gone
        if not self._unchanged(job):
            return self._changed(job)  # rewritten meanwhile: the failure may not hold (nor be quarantined)
        # The CSV row first: a crash or a full disk between the two writes then leaves the slide
        # to be tried again (and its row is not written twice), never failed without a row.
        row = csv_row("failed", job.path, self._result_id(job, sha256 or "-" * 16), error=message,
                      sha256=sha256 or "")
        self._writing(lambda: append_csv(self.out / CSV_NAME, row, skip_if_present=self._maybe_written(job)))
        if not self._writing(lambda: self.ledger.failed(job, message, kind, retry_in=None, sha256=sha256)):
            return self._stale(job)
        logger.error("failed %s ms=%.0f: %s", job.shown, seconds * 1000, without_path(message, job.path))
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
        try:
            if job.kind == "dicom-folder":  # only the series' instances: other files there are not this slide
                moves = [(f, destination / f.name) for f in SlideUnit(job.path, job.kind, job.root).files()]
            for source, target in moves:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(source), str(target))
        except OSError as error:
            logger.error("could not move %s to quarantine %s: %s", job.shown, shown(destination), error.strerror)
            return
        self.ledger.quarantined(job, destination)
        logger.warning("moved %s to quarantine: %s", job.shown, shown(destination))

    def _report(self, outcome: Outcome) -> Outcome:
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome


class Dispatcher:
    """Hands claimed slides to a pool of worker threads, at most ``workers`` at a time."""

    def __init__(self, runner: EdgeRunner) -> None:
        self.runner = runner
        self.pool = ThreadPoolExecutor(max_workers=runner.options.workers, thread_name_prefix=WORKER_THREAD_PREFIX)
        self.in_flight: dict[Future, Job] = {}

    def fill(self) -> int:
        """Claim due slides until every worker has one; returns how many were started.

        Nothing is claimed while the output folder cannot be written (``OutputGate``).
        """
        started = 0
        self.in_flight = {f: j for f, j in self.in_flight.items() if not f.done()}
        runner = self.runner
        while not runner.stop.is_set() and len(self.in_flight) < runner.options.workers:
            if not runner.gate.is_open(runner.ledger):
                break
            try:
                job = runner.ledger.claim()
            except sqlite3.Error as error:
                if not output_problem(error):
                    raise
                runner.gate.block(OutputUnavailable(runner.out, error))
                break
            if job is None:
                break
            self.in_flight[self.pool.submit(runner.process, job)] = job
            started += 1
        return started

    def busy(self) -> bool:
        self.in_flight = {f: j for f, j in self.in_flight.items() if not f.done()}
        return bool(self.in_flight)

    def shutdown(self, timeout: float) -> list[Job]:
        """Stop claiming and let the slides in hand finish or stop between reads; returns
        those still running after ``timeout``. They stay 'processing' in the ledger: the
        next start counts the attempt, so a slide that outlasts every stop ends failed.
        The caller must then exit without releasing the output lock (``lock.py``)."""
        self.runner.stop.set()
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck = list(self.in_flight.values())
        self.pool.shutdown(wait=not stuck, cancel_futures=True)
        return stuck
