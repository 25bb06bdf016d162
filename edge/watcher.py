"""Watch a scanner's output folder and classify each slide once it is complete.

Three ways to notice a slide, so none is missed:

- filesystem events through watchdog (inotify on Linux), or ``--poll`` (watchdog's
  polling observer) for network shares where inotify sees nothing;
- a full rescan at start and every ``rescan_interval_s``, which also catches what an
  overflowed event queue dropped.

A noticed slide becomes a *candidate*; it is queued in the ledger once its signature
(size, mtime, inode and ctime of all its files) has not changed for ``settle_s``. Slides
the ledger already has with the same identity are not queued again; a changed one is
(same-name replacement). An entry that is no slide is recorded once as ``skipped`` with
its reason. The watched folder is resolved first, so the ledger keys one slide the same
however the folder was typed. Only the main thread touches candidates and claims work;
workers classify.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lowmag.edge.ledger import Ledger
from lowmag.edge.ledger import Job
from lowmag.edge.results import remove_outputs
from lowmag.edge.runner import Dispatcher, EdgeRunner, OutputUnavailable, output_problem
from lowmag.edge.scan import Signature, SlideUnit, find_units, unit_for
from lowmag.names import printable, shown

logger = logging.getLogger("lowmag.edge")


@dataclass(frozen=True)
class WatchOptions:
    settle_s: float = 10.0
    poll: bool = False
    poll_interval_s: float = 5.0
    rescan_interval_s: float = 300.0
    shutdown_timeout_s: float = 60.0
    tick_s: float = 0.25


@dataclass
class _Candidate:
    unit: SlideUnit
    signature: Signature | None
    changed_at: float
    #: Not looked at again before this (monotonic seconds): a candidate that cannot be read
    #: backs off instead of being retried, and warned about, at every tick.
    not_before: float = 0.0
    #: Since when it has had no files (an emptied series folder is dropped after a while).
    empty_since: float | None = None
    warned: bool = False


#: A candidate that cannot be read is looked at again after this many seconds.
UNREADABLE_BACKOFF_S = 30.0
#: A candidate folder that stays empty this long stops being one (a rescan finds it again).
EMPTY_FOR_S = 60.0


def enqueue_unit(ledger: Ledger, out: Path, unit: SlideUnit, signature: Signature) -> str:
    """Record a complete slide (or a skipped entry) in the ledger; a replaced file loses its
    stale outputs. Returns the ledger's verdict ('new', 'known', 'replaced', 'recheck')."""
    if unit.skipped:
        status = ledger.record_skipped(unit, signature, unit.skip_reason())
        if status != "known":
            logger.info("skipped %s: %s", shown(unit.path), printable(unit.skip_reason()))
    else:
        status = ledger.enqueue(unit, signature)
    if status == "replaced":
        remove_outputs(out, unit.relative)
        if not unit.skipped:
            logger.info("queued %s again: the file was replaced (size or mtime changed)", shown(unit.path))
    elif status == "recheck":
        logger.info("queued %s for a content check: same size and mtime, but another inode or ctime",
                    shown(unit.path))
    elif status == "new" and not unit.skipped:
        logger.debug("queued %s", shown(unit.path))
    return status


class Watcher:
    """The watch loop: events and rescans -> candidates -> ledger -> workers."""

    def __init__(self, root: Path, runner: EdgeRunner, options: WatchOptions = WatchOptions(),
                 exclude: Iterable[Path] = ()) -> None:
        self.root = Path(os.path.realpath(root))
        self.runner = runner
        self.options = options
        self.exclude = [Path(p) for p in exclude]
        self.candidates: dict[Path, _Candidate] = {}
        self.events: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self.stop = threading.Event()
        self.dispatcher = Dispatcher(runner)

    # -- noticing slides --------------------------------------------------------------
    def _notice(self, unit: SlideUnit) -> None:
        if unit.path not in self.candidates:
            self.candidates[unit.path] = _Candidate(unit, None, time.monotonic())

    def rescan(self) -> int:
        """Make a candidate of every slide under root the ledger does not have as it is now."""
        found = 0
        for unit in find_units(self.root, self.exclude):
            try:
                signature = unit.signature()
            except OSError:
                signature = None  # unreadable now: the candidate says why, once
            if signature and self.runner.ledger.unchanged(unit, signature):
                continue
            self._notice(unit)
            found += 1
        return found

    def _drain_events(self) -> None:
        while True:
            try:
                path = self.events.get_nowait()
            except queue.Empty:
                return
            if path.is_dir() and not path.is_symlink():
                for unit in find_units(self.root, self.exclude, under=path):
                    self._notice(unit)
                continue
            unit = unit_for(path, self.root, self.exclude)
            if unit is not None:
                self._notice(unit)

    def _settle(self) -> None:
        now = time.monotonic()
        for path, candidate in list(self.candidates.items()):
            if now < candidate.not_before:
                continue
            try:
                signature = candidate.unit.signature()
            except OSError as error:  # e.g. its folder may be listed but not entered
                if not candidate.warned:
                    logger.warning("cannot read %s (%s); looking again every %.0f s", shown(path),
                                   error.strerror or error, UNREADABLE_BACKOFF_S)
                candidate.warned, candidate.not_before = True, now + UNREADABLE_BACKOFF_S
                continue
            if signature is None:
                if not os.path.lexists(candidate.unit.path):
                    del self.candidates[path]  # gone (moved away or renamed)
                elif candidate.empty_since is None:
                    candidate.empty_since = now
                elif now - candidate.empty_since > max(EMPTY_FOR_S, self.options.settle_s):
                    del self.candidates[path]  # a folder emptied for good (a rescan finds new files)
                continue
            candidate.empty_since = None
            if signature != candidate.signature:
                candidate.signature = signature
                candidate.changed_at = now
                continue
            if now - candidate.changed_at >= self.options.settle_s:
                try:
                    enqueue_unit(self.runner.ledger, self.runner.out, candidate.unit, signature)
                except sqlite3.Error as error:  # the ledger's disk is full: keep it a candidate
                    if not output_problem(error):
                        raise
                    self.runner.gate.block(OutputUnavailable(self.runner.out, error))
                    return
                del self.candidates[path]

    # -- the loop -------------------------------------------------------------------
    def _observer(self):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        events = self.events

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # noqa: D401 - watchdog's callback
                if event.event_type in ("opened", "closed_no_write"):
                    return
                for attr in ("src_path", "dest_path"):
                    value = getattr(event, attr, "")
                    if value:
                        events.put(Path(os.fsdecode(value)))

        observer = PollingObserver(timeout=self.options.poll_interval_s) if self.options.poll else Observer()
        observer.schedule(Handler(), str(self.root), recursive=True)
        return observer

    def request_stop(self) -> None:
        self.stop.set()

    def run(self) -> list[Job]:
        """Watch until ``request_stop``; then let the slides in hand finish or stop.

        Returns the slides still being classified after ``shutdown_timeout_s``: the caller
        must exit the process without releasing the output lock (see ``Dispatcher.shutdown``).
        """
        observer = self._observer()
        observer.start()
        mode = f"polling every {self.options.poll_interval_s:g} s" if self.options.poll else "filesystem events"
        logger.info("watching %s (%s, full rescan every %g s, settle %g s, %d worker(s))", shown(self.root), mode,
                    self.options.rescan_interval_s, self.options.settle_s, self.runner.options.workers)
        next_rescan = 0.0
        try:
            while not self.stop.is_set():
                try:
                    if time.monotonic() >= next_rescan:
                        next_rescan = time.monotonic() + self.options.rescan_interval_s
                        found = self.rescan()
                        if found:
                            logger.info("rescan of %s: %d slide(s) to check", shown(self.root), found)
                    self._drain_events()
                    self._settle()
                except OSError as error:  # the folder changed under the scan (a rename, a vanished folder)
                    logger.warning("scanning %s: %s; the next tick looks again", shown(self.root),
                                   printable(error))
                    next_rescan = min(next_rescan, time.monotonic() + 5.0)
                except Exception:  # noqa: BLE001 - a scan must never take the watcher down
                    logger.exception("scanning %s failed; it is tried again in 5 s (please report this)",
                                     shown(self.root))
                    next_rescan = min(next_rescan, time.monotonic() + 5.0)
                    self.stop.wait(5.0)
                self.dispatcher.fill()
                self.stop.wait(self.options.tick_s)
        finally:
            observer.stop()
            stuck = self.dispatcher.shutdown(self.options.shutdown_timeout_s)
            try:
                observer.join(timeout=5)
            except RuntimeError:
                pass
        return stuck

