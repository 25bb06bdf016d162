"""Classify one slide: open, find its tissue, read each piece at the bundle's µm/px, run it.

The steps, each timed (milliseconds in every result):

1. ``hash``: sha256 of the slide's files (identifies the content in the results), in a
   thread beside steps 2-6; the stage is the time left waiting for it at the end.
2. ``open``: ``open_slide`` (core); a slide scanned coarser than the model's µm/px is
   refused: upsampling would invent detail the student never saw.
3. ``tissue``: ``locate_tissue`` (core), on a low-resolution read of the whole slide.
4. ``read`` / ``resample``: ``read_at_mpp`` (core) of each tissue box from the pyramid,
   split into decoding the slide's pixels and box-averaging plus Lanczos; done one piece
   ahead in a thread, beside step 5 (so these stages overlap inference in time).
5. ``inference``: each piece runs at its own size, as the students were trained. A piece
   larger than ``max_piece_px`` on a side at the model's µm/px is cut into a grid of
   near-equal tiles, read one at a time (memory stays bounded); its probabilities are
   the mean of its tiles' weighted by their tissue fraction (tiles with less than
   ``min_tile_tissue`` are skipped). Pieces smaller than 16 px (the smallest input
   export-student traces) are padded with the slide's background colour.

6. ``distribution``: the tissue pixels read in step 4 are summarised as they are read
   (``lowmag.fingerprint.StainStats``, in the reading thread, beside the inference of the
   previous tile) and the slide is judged against the bundle's
   fingerprint of its training data; a slide the tissue step found not to be brightfield
   (dark background, no colour) is out of distribution whatever the model. ``ood="flag"``
   classifies it and sets ``needs_review`` with the reasons; ``ood="refuse"`` raises
   ``OutOfDistributionError`` instead (before any read when the tissue step already knows).

The slide's result (the documented rule, ``SLIDE_RULE``): the mean of the pieces'
calibrated probabilities (softmax of logits / the bundle's temperature) weighted by each
piece's tissue area; its label is the most probable class and its confidence that
probability. ``needs_review`` is set when the confidence is below ``review_threshold``.
Before anything is read, the tissue's total size at the model's µm/px is checked against
``pixel_budget``; a slide over it is refused with ``SlideTooLargeError``. No single read,
the tissue overview and the pyramid check included, may decode more than
``decode_budget`` (4 x ``pixel_budget``) source pixels, and every read stops between
blocks when ``should_stop`` says so.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from lowmag.bundle import Bundle
from lowmag.edge.scan import CheckedFile
from lowmag.errors import Interrupted, LowmagError, SlideError, SlideReadError, SlideTooLargeError
from lowmag.io import sha256_fd, sha256_file
from lowmag.names import shown
from lowmag.reader import DEFAULT_MAX_SOURCE_PIXELS, Region, choose_level, read_at_mpp, read_size, within
from lowmag.runtimes import Session, logits_of, softmax
from lowmag.slide import Slide, SlideInfo, open_slide
from lowmag.fingerprint import Fingerprint, StainStats, Verdict
from lowmag.concurrency import in_background
from lowmag.tissue import Modality, TissueBox, TissueParams, colour_saturation, find_tissue_checked_beside

logger = logging.getLogger("lowmag.edge")
T = TypeVar("T")

#: The smallest side export-student traces graphs for (export.onnx_graph.MIN_SIDE).
MIN_INPUT_SIDE = 16
SLIDE_RULE = "tissue-area-weighted mean of the pieces' calibrated probabilities"
STAGES = ("hash", "open", "tissue", "read", "resample", "distribution", "inference", "write")
#: What ``--ood`` may be: classify and flag for review, or refuse with the reasons.
OOD_POLICIES = ("flag", "refuse")
#: The largest ``--level-tolerance``: "a few percent" off the model's scale.
MAX_LEVEL_TOLERANCE = 0.05


class NoTissueError(SlideError):
    """The slide shows no tissue the localiser accepts (blank glass, a label, a test pattern)."""


class ResolutionTooCoarseError(SlideError):
    """The slide's finest level is coarser than the model's µm/px."""


class OutOfDistributionError(SlideError):
    """``--ood refuse``: the slide is unlike the model's training data (the reasons say how)."""


#: Shutdown was asked for while a slide was in hand (raised between reads and tiles).
SlideInterrupted = Interrupted


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs of the per-slide pipeline (``edge-classify`` options of the same names)."""

    max_piece_px: int = 2048
    pixel_budget: int = 256_000_000
    review_threshold: float = 0.6
    min_tile_tissue: float = 0.05
    #: The thumbnail is the tissue localiser's overview (at most 2048 px), shrunk to this.
    thumbnail_px: int = 1024
    assume_mpp: float | None = None
    tissue: TissueParams = field(default_factory=TissueParams)
    #: Out-of-distribution slides: "flag" (classified, needs_review) or "refuse" (failed).
    ood: str = "flag"
    #: A pyramid level within this fraction of the model's µm/px is used as stored, without
    #: resampling (``reader.read_at_mpp``'s ``as_stored_within``). 0 = always resample exactly.
    level_tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.max_piece_px < MIN_INPUT_SIDE:
            raise LowmagError(f"max_piece_px must be at least {MIN_INPUT_SIDE}, got {self.max_piece_px}")
        if not 0.0 <= self.review_threshold <= 1.0:
            raise LowmagError(f"review_threshold must be within 0-1, got {self.review_threshold}")
        if self.pixel_budget <= 0:
            raise LowmagError(f"pixel_budget must be positive, got {self.pixel_budget}")
        if self.ood not in OOD_POLICIES:
            raise LowmagError(f"ood must be one of {', '.join(OOD_POLICIES)}, got {self.ood!r}")
        if not 0.0 <= self.level_tolerance <= MAX_LEVEL_TOLERANCE:
            raise LowmagError(f"level_tolerance must be within 0-{MAX_LEVEL_TOLERANCE:g}, got {self.level_tolerance}")

    @property
    def decode_budget(self) -> int:
        """Most source pixels any one read may decode (a pyramid level at most 2x finer per
        axis than needed decodes 4x the pixels it yields)."""
        return 4 * self.pixel_budget


class Timer:
    """Accumulates seconds per stage; ``ms()`` reports them in milliseconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {stage: 0.0 for stage in STAGES}
        #: CPU seconds of work done in a thread beside the stages (the hash), which no stage
        #: shows: on two cores it takes a core the stages would use (``edge-classify bench``).
        self.cpu_beside: dict[str, float] = {}
        self.started = time.perf_counter()
        #: The process's CPU clock (every thread) when the timer started.
        self.cpu_started = time.process_time()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tick

    def beside(self, name: str, job: Callable[[], T]) -> Callable[[], T]:
        """``job`` for a thread beside the stages, its thread's CPU seconds kept as ``cpu_beside[name]``."""
        def timed() -> T:
            tick = time.thread_time()
            try:
                return job()
            finally:
                self.cpu_beside[name] = self.cpu_beside.get(name, 0.0) + time.thread_time() - tick
        return timed

    def ms(self) -> dict[str, float]:
        out = {name: round(value * 1000.0, 1) for name, value in self.seconds.items()}
        out["total"] = round((time.perf_counter() - self.started) * 1000.0, 1)
        return out


@dataclass(frozen=True)
class PieceResult:
    """One tissue piece: its box, the size it ran at, its tiles and its probabilities."""

    box: TissueBox
    input_px: tuple[int, int]
    tiles: int
    probabilities: np.ndarray
    #: (width, height) of every image the model ran on for this piece (for GFLOPs).
    inputs: tuple[tuple[int, int], ...] = ()


@dataclass
class SlideClassification:
    """Everything the outputs are written from."""

    path: Path
    info: SlideInfo
    sha256: str
    size_bytes: int
    files: int
    pieces: list[PieceResult]
    probabilities: np.ndarray
    needs_review: bool
    timer: Timer
    thumbnail: np.ndarray
    classes: tuple[str, ...]
    #: The slide against the training data's fingerprint (``lowmag.fingerprint.Verdict``).
    distribution: Verdict = field(default_factory=lambda: Verdict("unchecked", None, None))
    modality: Modality | None = None
    #: Where the model's pixels came from: the pyramid level, its µm/px, and whether it was
    #: resampled to the model's µm/px (false: used as stored, ``--level-tolerance``).
    reading: dict | None = None

    @property
    def label(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]

    @property
    def confidence(self) -> float:
        return float(np.max(self.probabilities))


def content_hash(files: Sequence[Path]) -> tuple[str, int]:
    """sha256 of one file, or of 'name  sha256' lines for a multi-file slide; and total bytes."""
    return _combined([(path.name, sha256_file(path)) for path in files]), sum(p.stat().st_size for p in files)


def checked_content_hash(checked: Sequence[CheckedFile], should_stop: Callable[[], bool] = lambda: False
                         ) -> tuple[str, int]:
    """``content_hash`` of files ``check_files`` vetted, each read from one descriptor that
    is checked to be the very inode that was vetted (a link swapped in meanwhile fails).
    Stops between chunks when ``should_stop`` says so."""
    named, size = [], 0
    for item in checked:
        fd = os.open(item.real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != (item.device, item.inode) or not stat.S_ISREG(info.st_mode):
                raise SlideReadError(item.path, "was replaced while it was being checked.",
                                     "nothing to do: it is read again.")
            named.append((item.path.name, sha256_fd(fd, should_stop)))
            size += info.st_size
        finally:
            os.close(fd)
    if should_stop():
        raise SlideInterrupted(f"{shown(checked[0].path)}: interrupted by a stop")
    return _combined(named), size


def _combined(named: Sequence[tuple[str, str]]) -> str:
    if len(named) == 1:
        return named[0][1]
    digest = hashlib.sha256()
    for name, sha256 in named:
        digest.update(f"{name}  {sha256}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


class Prefetched:
    """``read(item, cancelled)`` for each item in order, one item ahead in a thread: the next
    piece is decoded and resampled while the current one is inferred (the runtimes release
    the GIL, so both cores work). The thread starts the next read only when the caller has
    taken the previous result, so at most one result waits; the pixels and their order are
    those of reading in turn. Use as a context manager: leaving it cancels (``cancelled()``
    turns true, for the read to stop between blocks) and waits for the thread."""

    def __init__(self, items: Sequence[Region], read: Callable[[Region, Callable[[], bool]], np.ndarray]) -> None:
        import queue

        self._items = list(items)
        self._read = read
        self._results: "queue.SimpleQueue[tuple[bool, object]]" = queue.SimpleQueue()
        self._room = threading.Semaphore(1)  # reads allowed ahead of what the caller has taken
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._work, name="lowmag-read", daemon=True)

    def __enter__(self) -> "Prefetched":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cancel.set()
        self._room.release()  # wakes the thread if it waits for room
        self._thread.join()

    def next(self) -> np.ndarray:
        ok, value = self._results.get()
        self._room.release()
        if not ok:
            raise value  # type: ignore[misc]  # the read's own error, in the caller's thread
        return value  # type: ignore[return-value]

    def _work(self) -> None:
        for item in self._items:
            self._room.acquire()
            if self._cancel.is_set():
                return
            try:
                outcome: tuple[bool, object] = (True, self._read(item, self._cancel.is_set))
            except BaseException as error:  # handed to the caller, which raises it
                outcome = (False, error)
            self._results.put(outcome)
            if not outcome[0]:
                return


def tile_regions(box: TissueBox, size_px: tuple[int, int], max_piece_px: int) -> list[Region]:
    """A near-equal grid of level-0 regions covering ``box``, each at most ``max_piece_px``."""
    nx = max(1, math.ceil(size_px[0] / max_piece_px))
    ny = max(1, math.ceil(size_px[1] / max_piece_px))
    xs = [box.x + round(i * box.width / nx) for i in range(nx + 1)]
    ys = [box.y + round(j * box.height / ny) for j in range(ny + 1)]
    return [Region(xs[i], ys[j], xs[i + 1] - xs[i], ys[j + 1] - ys[j]) for j in range(ny) for i in range(nx)]


def tissue_fraction(rgb: np.ndarray, min_saturation: float) -> float:
    """Share of pixels coloured enough to be stained tissue (the localiser's floor)."""
    return float((colour_saturation(rgb) > min_saturation).mean())


def tiles_to_run(tiles: Iterable[np.ndarray], count: int, min_saturation: float,
                 min_tissue: float) -> Iterator[tuple[np.ndarray, float]]:
    """The tiles of one piece that are classified, with their weights, as they stream in.

    A tile with less than ``min_tissue`` of stained pixels is skipped; when every tile of
    the piece is near-blank, the piece rests on its best one (weight 1). A piece of one
    tile (``count`` 1) is always classified, with weight 1.
    """
    emptiest: tuple[float, np.ndarray] | None = None
    kept = False
    for rgb in tiles:
        weight = tissue_fraction(rgb, min_saturation) if count > 1 else 1.0
        if weight < min_tissue:
            if emptiest is None or weight > emptiest[0]:
                emptiest = (weight, rgb)
            continue
        kept = True
        yield rgb, weight
    if not kept and emptiest is not None:
        yield emptiest[1], 1.0


def shrink_to(rgb: np.ndarray, longest_side: int) -> np.ndarray:
    """``rgb`` reduced (never enlarged) so its longest side is at most ``longest_side``."""
    import pyvips

    scale = longest_side / max(rgb.shape[:2])
    if scale >= 1.0:
        return rgb
    image = pyvips.Image.new_from_array(np.ascontiguousarray(rgb), interpretation="srgb").resize(scale)
    return np.ascontiguousarray(image.numpy())


def pad_to(rgb: np.ndarray, side: int, colour: tuple[int, int, int]) -> np.ndarray:
    """``rgb`` extended right and down with ``colour`` to at least ``side`` x ``side``."""
    h, w = rgb.shape[:2]
    if h >= side and w >= side:
        return rgb
    out = np.empty((max(h, side), max(w, side), 3), np.uint8)
    out[:] = np.asarray(colour, np.uint8)
    out[:h, :w] = rgb
    return out


def usable_fingerprint(bundle: Bundle) -> Fingerprint | None:
    """The bundle's fingerprint of its training data, or None (with a warning, once per
    bundle) when it has none or one this lowmag cannot use: the slides are then only
    checked for being brightfield, never refused for the fingerprint's sake."""
    if not bundle.spec.fingerprint:
        return None
    fingerprint = Fingerprint(bundle.spec.fingerprint)
    problems = fingerprint.check(float(bundle.spec.target_mpp))
    if problems:
        if bundle.directory not in _WARNED:
            _WARNED.add(bundle.directory)
            logger.warning("%s: its fingerprint of the training data is not used (%s); slides are only checked "
                           "for being brightfield. Fix: re-export it with export-student --refresh-fingerprint.",
                           bundle.directory, "; ".join(problems))
        return None
    return fingerprint


_WARNED: set[Path] = set()


class SlideClassifier:
    """Runs the pipeline for one bundle with one session (one per worker thread)."""

    def __init__(self, bundle: Bundle, session: Session, config: PipelineConfig = PipelineConfig()) -> None:
        self.bundle = bundle
        self.session = session
        self.config = config
        self.classes = tuple(bundle.spec.classes)
        self.target_mpp = float(bundle.spec.target_mpp)
        self.temperature = float(bundle.spec.temperature)
        self.fingerprint = usable_fingerprint(bundle)

    def classify(self, path: Path, files: Sequence[Path] | None = None,
                 should_stop: Callable[[], bool] = lambda: False, timer: Timer | None = None,
                 content: tuple[str, int, int] | Callable[[], tuple[str, int, int]] | None = None
                 ) -> SlideClassification:
        """Classify the slide at ``path`` (``files``: what it consists of, for the hash).

        ``content`` is (sha256, bytes, files) when the caller hashed the files already, or a
        function that hashes them (the edge runner's, on the files it checked). The hash runs
        in a thread beside the work on the pixels (which decodes a small part of the file)
        and is waited for at the end: the ``hash`` stage is only that wait. A hash that fails
        (the file was replaced meanwhile) wins over the slide's own error; a slide's error
        carries the sha256 as ``lowmag_sha256`` when the hash succeeded.
        """
        timer = timer or Timer()
        if content is None:
            names = list(files) if files else ([path] if path.is_file() else sorted(path.iterdir()))
            content = lambda: (*content_hash(names), len(names))  # noqa: E731 - the job for the thread
        hashing = in_background(timer.beside("hash", content), "lowmag-hash") if callable(content) else None
        try:
            result = self._classify(path, should_stop, timer)
        except BaseException as error:
            # The hash's own failure, if any, is raised instead.
            sha256 = hashing.result()[0] if hashing is not None else content[0]  # type: ignore[index]
            error.lowmag_sha256 = sha256  # type: ignore[attr-defined]
            raise
        with timer.stage("hash"):
            result.sha256, result.size_bytes, result.files = hashing.result() if hashing is not None else content
        return result

    def _classify(self, path: Path, should_stop: Callable[[], bool], timer: Timer) -> SlideClassification:
        config = self.config
        with timer.stage("open"):
            slide = open_slide(path, assume_mpp=config.assume_mpp)
        with slide:
            info = slide.info
            self._check_resolution(info)
            with timer.stage("tissue"):
                # The pyramid check of the levels the overview and the model need runs on a
                # second handle beside the tissue step, on the other core.
                boxes, overview, modality = find_tissue_checked_beside(
                    slide, lambda: open_slide(path, assume_mpp=config.assume_mpp),
                    self.target_mpp * (1.0 + config.level_tolerance), config.tissue,
                    config.decode_budget, should_stop, keep_level0=True)
            level = info.levels[choose_level(slide, self.target_mpp, config.level_tolerance)]
            if level.index != 0:
                slide.decoded_level0 = None  # the pieces come from a coarser level: free it now
            reading = {"level": level.index, "level_mpp": round(max(level.mpp_x, level.mpp_y), 5),
                       "resampled": not within(level, self.target_mpp, config.level_tolerance),
                       "level_tolerance_pct": round(config.level_tolerance * 100, 3)}
            if not modality.brightfield and config.ood == "refuse":
                raise OutOfDistributionError(path, f"{modality.reason}; the model was trained on brightfield "
                                             "stained tissue.", "route this slide to a model made for it.")
            if not boxes:
                why = f" ({modality.reason})" if not modality.brightfield else ""
                raise NoTissueError(path, f"no tissue found on the slide (blank glass, pen marks or a test "
                                    f"pattern){why}.", "check the scan; tune the tissue options if this slide does "
                                    "hold tissue.")
            sizes = [read_size(slide, self.target_mpp, box.region, config.level_tolerance) for box in boxes]
            total = sum(w * h for w, h in sizes)
            if total > config.pixel_budget:
                raise SlideTooLargeError(
                    path, f"its tissue at {self.target_mpp:g} µm/px is {total:,} pixels, more than the budget of "
                    f"{config.pixel_budget:,}.", "raise --pixel-budget (memory and time grow with it) or use a "
                    "lower-magnification model.")
            stats = self.fingerprint.stats() if self.fingerprint is not None else None
            plan = [(box, tile_regions(box, size_px, config.max_piece_px)) for box, size_px in zip(boxes, sizes)]

            def read(region: Region, cancelled: Callable[[], bool]) -> np.ndarray:
                rgb = timed_read(slide, self.target_mpp, region, timer, config.pixel_budget,
                                 max_source_pixels=config.decode_budget,
                                 should_stop=lambda: should_stop() or cancelled(),
                                 as_stored_within=config.level_tolerance)
                if stats is not None:  # the pixels just read, in the reading thread: beside the inference
                    with timer.stage("distribution"):
                        stats.add(rgb)
                return rgb

            with Prefetched([region for _, regions in plan for region in regions], read) as reads:
                pieces = [self._classify_piece(slide, box, size_px, regions, reads, timer, should_stop)
                          for (box, regions), size_px in zip(plan, sizes)]
        with timer.stage("distribution"):
            distribution = self._judge(stats, modality)
        if distribution.out and config.ood == "refuse":
            raise OutOfDistributionError(path, "unlike the model's training data: " + "; ".join(distribution.reasons)
                                         + ".", "check the slide, or classify it anyway with --ood flag.")
        with timer.stage("write"):
            thumbnail = shrink_to(overview, config.thumbnail_px)
        weights = np.array([max(piece.box.tissue_area_um2, 1e-9) for piece in pieces])
        probabilities = (np.stack([p.probabilities for p in pieces]) * weights[:, None]).sum(0) / weights.sum()
        return SlideClassification(
            path=path, info=info, sha256="", size_bytes=0, files=0, pieces=pieces,
            probabilities=probabilities,
            needs_review=bool(probabilities.max() < config.review_threshold or distribution.out),
            timer=timer, thumbnail=thumbnail, classes=self.classes, distribution=distribution, modality=modality,
            reading=reading,
        )

    def _judge(self, stats: StainStats | None, modality: Modality) -> Verdict:
        """The slide against the fingerprint; without one only the tissue step's modality counts."""
        reasons = () if modality.brightfield else (modality.reason,)
        if self.fingerprint is not None and stats is not None:
            return self.fingerprint.judge(stats.features(), stats.histogram(), reasons)
        if reasons:
            return Verdict("out_of_distribution", None, None, reasons)
        return Verdict("unchecked", None, None)

    def _check_resolution(self, info: SlideInfo) -> None:
        if info.mpp > self.target_mpp * (1.0 + max(0.01, self.config.level_tolerance)):
            raise ResolutionTooCoarseError(
                info.path, f"scanned at {info.mpp:.3g} µm/px, coarser than the model's {self.target_mpp:g} µm/px "
                f"({self.bundle.spec.magnification}).", "rescan at a higher magnification or use a student for a "
                "lower magnification.")

    def _classify_piece(self, slide: Slide, box: TissueBox, size_px: tuple[int, int], regions: list[Region],
                        reads: "Prefetched", timer: Timer, should_stop: Callable[[], bool]) -> PieceResult:
        probabilities, weights, inputs = [], [], []

        def read() -> Iterator[np.ndarray]:
            for _ in regions:
                if should_stop():
                    raise SlideInterrupted(f"{shown(slide.info.path)}: interrupted by a stop")
                yield reads.next()

        for rgb, weight in tiles_to_run(read(), len(regions), self.config.tissue.min_saturation,
                                        self.config.min_tile_tissue):
            probabilities.append(self._run(rgb, slide, timer, inputs))
            weights.append(weight)
        w = np.asarray(weights, np.float64)
        merged = (np.stack(probabilities) * w[:, None]).sum(0) / w.sum()
        return PieceResult(box=box, input_px=size_px, tiles=len(regions), probabilities=merged, inputs=tuple(inputs))

    def _run(self, rgb: np.ndarray, slide: Slide, timer: Timer, inputs: list[tuple[int, int]]) -> np.ndarray:
        image = pad_to(rgb, MIN_INPUT_SIDE, slide.info.background)
        inputs.append((image.shape[1], image.shape[0]))
        with timer.stage("inference"):
            logits = logits_of(self.session, [image], batch_size=1)
        return softmax(logits[0], self.temperature)


def timed_read(slide: Slide, mpp: float, region: Region | None, timer: Timer,
               max_output_pixels: int | None = None, exact: bool = False,
               max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
               should_stop: Callable[[], bool] | None = None, as_stored_within: float = 0.0) -> np.ndarray:
    """``read_at_mpp`` with its decode and resample seconds added to ``timer``."""
    seconds: dict[str, float] = {}
    try:
        return read_at_mpp(slide, mpp, region, exact=exact, max_output_pixels=max_output_pixels, timings=seconds,
                           max_source_pixels=max_source_pixels, should_stop=should_stop,
                           as_stored_within=as_stored_within)
    finally:
        for stage, value in seconds.items():
            timer.seconds[stage] = timer.seconds.get(stage, 0.0) + value
