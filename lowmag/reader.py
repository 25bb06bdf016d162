"""The one function that turns a slide into RGB pixels at a target µm/px.

Training caches, calibration sets, parity checks and the edge runner all call
``read_at_mpp``; if two code paths resampled, they would drift.

How it reads (``PREPROCESSING_VERSION`` names this recipe in every model spec):

1. Choose the source level: the coarsest pyramid level whose µm/px is at most the
   target (levels within 1% of the target count as matching), or level 0 when
   ``exact=True`` (the paper's protocol: resample from the original resolution).
2. Box-average by an integer factor ``k = floor(f / 2)``, where ``f`` is the remaining
   downsampling factor, in blocks of at most ``stripe_pixels`` source pixels (whole-width
   stripes, or k-row strips cut into columns when the level is very wide) so memory stays
   bounded however large the region. This is what libvips itself does before a large
   Lanczos reduction (its "reducing gap"); doing it explicitly makes the result
   independent of block size.
3. Resample the rest of the way (a factor below 4) with libvips Lanczos3 to exactly
   ``round(size_um / target_mpp)`` pixels on each axis.

Opt-in, for deployment only (``as_stored_within``, ``edge-classify --level-tolerance``): a
pyramid level whose µm/px is within that fraction of the target, finer or coarser, is
returned as stored, neither box-averaged nor resampled. The model then sees tissue up to
that fraction off its scale, and a level a little coarser than the target is used instead
of decoding a finer one (4x the pixels). Training, calibration and the default reads never
do this; docs/level-tolerance/results.md measures what it changes.

A header's declared size is a claim: before any pixel is decoded, the source pixels a
read needs are checked against ``max_source_pixels`` (``SlideTooLargeError`` names the
level and the fix), and ``should_stop`` is asked before every block, so a stop never
waits for a whole slide to decode.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, MutableMapping, TypeVar

import numpy as np

from lowmag.concurrency import in_background
from lowmag.errors import Interrupted, SlideReadError, SlideTooLargeError
from lowmag.names import shown
from lowmag.resolution import Resolution
from lowmag.slide import LevelInfo, Slide

T = TypeVar("T")

#: Names the reading recipe above; bump it whenever the pixels it yields change.
PREPROCESSING_VERSION = "lowmag-read-1"

#: Levels whose µm/px is within this fraction above the target are used as matching.
LEVEL_MATCH_TOLERANCE = 0.01

#: Pyramid check: window side (coarse-level pixels), the side of the summary cells the
#: levels are compared on (coarse pixels), and the largest tolerated mean difference.
#: Measured on the real slides (cell means of the levels as stored, 2026-12-04): healthy
#: levels differ by 0.0-3.7/255 on 8 px cells of 64 px windows, the DICOM series'
#: wrong-colour levels by 33-44 (its level 3 fails to decode in the check: a short frame).
PYRAMID_CHECK_WINDOW = 64
PYRAMID_CHECK_CELL = 8
PYRAMID_MISMATCH_LIMIT = 20.0

#: Largest block of source pixels held in memory at once while reading.
DEFAULT_STRIPE_PIXELS = 16 * 1024 * 1024

#: Most source pixels one read may decode unless the caller says otherwise (about 1 G:
#: seconds of decoding, never memory: blocks bound that).
DEFAULT_MAX_SOURCE_PIXELS = 1 << 30

#: The pyramid check never reads a window larger than this side at the finer level.
PYRAMID_CHECK_MAX_FINE_SIDE = 2048


@dataclass(frozen=True)
class Region:
    """A rectangle in level-0 pixel coordinates."""

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"region must have a positive size, got {self.width}x{self.height}")


def output_size(slide: Slide, target_mpp: float, region: Region | None = None) -> tuple[int, int]:
    """(width, height) in pixels that ``read_at_mpp`` returns for this target."""
    info = slide.info
    w0 = region.width if region else info.width
    h0 = region.height if region else info.height
    return (
        max(1, int(round(w0 * info.mpp_x / target_mpp))),
        max(1, int(round(h0 * info.mpp_y / target_mpp))),
    )


def mpp_for_longest_side(slide: Slide, pixels: int) -> float:
    """µm/px at which the slide's longest side spans ``pixels``, never finer than its scan."""
    info = slide.info
    longest_um = max(info.width * info.mpp_x, info.height * info.mpp_y)
    return max(info.mpp, longest_um / pixels)


def within(level: LevelInfo, target_mpp: float, fraction: float) -> bool:
    """Whether ``level``'s µm/px is within ``fraction`` of ``target_mpp``, finer or coarser, on both axes."""
    return fraction > 0 and all(abs(math.log(mpp / target_mpp)) <= math.log1p(fraction) + 1e-12
                                for mpp in (level.mpp_x, level.mpp_y))


def choose_level(slide: Slide, target_mpp: float, as_stored_within: float = 0.0) -> int:
    """Index of the coarsest readable level at least as fine as ``target_mpp`` (1% tolerance).

    With ``as_stored_within``, a readable level within that fraction of the target (the
    nearest, if several) is chosen first: ``read_at_mpp`` returns it as stored.
    """
    near = [level for level in slide.info.levels
            if level.index not in slide.unreadable_levels and within(level, target_mpp, as_stored_within)]
    if near:
        return min(near, key=lambda level: abs(math.log(max(level.mpp_x, level.mpp_y) / target_mpp))).index
    best = 0
    for level in slide.info.levels:
        if level.index in slide.unreadable_levels:
            continue
        if max(level.mpp_x, level.mpp_y) <= target_mpp * (1.0 + LEVEL_MATCH_TOLERANCE):
            if level.downsample > slide.info.levels[best].downsample:
                best = level.index
    return best


def read_at_mpp(
    slide: Slide,
    target: float | Resolution | str,
    region: Region | None = None,
    *,
    exact: bool = False,
    max_output_pixels: int | None = None,
    stripe_pixels: int = DEFAULT_STRIPE_PIXELS,
    timings: MutableMapping[str, float] | None = None,
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
    should_stop: Callable[[], bool] | None = None,
    keep_level0: bool = False,
    as_stored_within: float = 0.0,
) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of the slide (or a level-0 ``region``) at ``target``.

    ``target`` is µm/px as a number, a ``Resolution``, or a string such as ``"1.25x"``.
    ``exact=True`` resamples from level 0 instead of the nearest finer pyramid level.
    ``max_output_pixels`` refuses reads whose result would be larger (``SlideTooLargeError``).
    ``timings``, when given, accumulates seconds spent decoding the slide (``read``) and
    box-averaging plus Lanczos (``resample``), for the edge runner's per-stage times.
    ``max_source_pixels`` refuses a read that would decode more source pixels than that
    (the pyramid check's windows included); ``should_stop`` is asked before each block and
    raises ``Interrupted`` when it returns True. ``keep_level0``: when this read decodes
    level 0 whole in one block, keep those pixels on the slide (``Slide.decoded_level0``) for
    later level-0 reads to slice: the tissue overview of a slide whose coarser levels are
    missing or unusable is then decoded once for the overview and the model's pieces.
    ``as_stored_within`` (deployment only, default off): a level within this fraction of the
    target is returned as stored, at its own µm/px (``read_size`` gives the size); see the
    module's docstring.
    """
    started = time.perf_counter()
    decode = [0.0]
    budget = _Budget(max_source_pixels, should_stop, stripe_pixels)
    try:
        return _read_at_mpp(slide, target, region, exact, max_output_pixels, budget, decode, keep_level0,
                            as_stored_within)
    finally:
        if timings is not None:
            total = time.perf_counter() - started
            timings["read"] = timings.get("read", 0.0) + decode[0]
            timings["resample"] = timings.get("resample", 0.0) + max(0.0, total - decode[0])


@dataclass(frozen=True)
class _Budget:
    """What one read may do: decode at most ``pixels`` source pixels, in blocks of at most
    ``block_pixels``, asking ``should_stop`` before each block."""

    pixels: int
    should_stop: Callable[[], bool] | None
    block_pixels: int = DEFAULT_STRIPE_PIXELS

    def check_stop(self, slide: Slide) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted(f"{shown(slide.info.path)}: reading was interrupted by a stop")

    def check_size(self, slide: Slide, level: int, width: int, height: int, what: str) -> None:
        if width * height > self.pixels:
            info = slide.info
            coarsest = info.levels[-1]
            raise SlideTooLargeError(
                info.path,
                f"{what} would decode {width:,} x {height:,} = {width * height:,} pixels from pyramid level "
                f"{level} (its coarsest level is {coarsest.width:,} x {coarsest.height:,}), more than the budget of "
                f"{self.pixels:,}.",
                "give the slide a pyramid (vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg) or "
                "raise the pixel budget (edge-classify --pixel-budget).",
            )


def _read_at_mpp(
    slide: Slide,
    target: float | Resolution | str,
    region: Region | None,
    exact: bool,
    max_output_pixels: int | None,
    budget: _Budget,
    decode: list[float],
    keep: bool = False,
    as_stored_within: float = 0.0,
) -> np.ndarray:
    target_mpp = resolve_target_mpp(slide, target)
    info = slide.info
    if region is None:
        region = Region(0, 0, info.width, info.height)
    if exact:
        as_stored_within = 0.0
    out_w, out_h = output_size(slide, target_mpp, region)  # (a level as stored: within the fraction of it)
    if max_output_pixels is not None and out_w * out_h > max_output_pixels:
        raise SlideTooLargeError(
            info.path,
            f"at {target_mpp:g} µm/px the image would be {out_w}x{out_h} pixels, more than "
            f"the budget of {max_output_pixels:,}.",
            "raise the pixel budget or read a smaller region or a lower magnification.",
        )

    if not exact:
        tick = time.perf_counter()
        verify_pyramid(slide, budget, up_to_mpp=target_mpp * (1.0 + as_stored_within))
        decode[0] += time.perf_counter() - tick
    while True:
        level = info.levels[0 if exact else choose_level(slide, target_mpp, as_stored_within)]
        try:
            if within(level, target_mpp, as_stored_within):
                lx, ly, lw, lh = stored_window(level, region)
                budget.check_size(slide, level.index, lw, lh, "reading it")
                return _read_box_shrunk(slide, level.index, lx, ly, lw, lh, 1, budget, decode, keep)
            return _read_from_level(slide, level.index, region, out_w, out_h, budget, decode, "reading it", keep)
        except SlideReadError as error:
            # Some files have pyramid levels OpenSlide cannot decode (e.g. DICOM series
            # whose edge frames are not padded to the tile size): fall back to finer levels.
            if level.index == 0:
                raise
            slide.mark_level_unreadable(level.index, error.__cause__ or error)


def read_size(slide: Slide, target_mpp: float, region: Region | None = None,
              as_stored_within: float = 0.0) -> tuple[int, int]:
    """(width, height) that ``read_at_mpp`` returns with ``as_stored_within``: a level's window
    when that level is read as stored, else ``output_size``. Exact once the pyramid check
    has run (``verify_pyramid``), as it has after the tissue step."""
    level = slide.info.levels[choose_level(slide, target_mpp, as_stored_within)]
    if within(level, target_mpp, as_stored_within):
        info = slide.info
        return stored_window(level, region or Region(0, 0, info.width, info.height))[2:]
    return output_size(slide, target_mpp, region)


def stored_window(level: LevelInfo, region: Region) -> tuple[int, int, int, int]:
    """The level pixels nearest a level-0 ``region`` (x, y, width, height), for a read as
    stored: edges rounded to the nearest level pixel, not outwards, so a piece gains no row of
    its neighbour's pixels and the tiles of one box abut exactly."""
    def span(start: float, end: float, size: int) -> tuple[int, int]:
        a = min(max(0, int(round(start / level.downsample))), size - 1)
        b = min(max(a + 1, int(round(end / level.downsample))), size)
        return a, b - a

    x, w = span(region.x, region.x + region.width, level.width)
    y, h = span(region.y, region.y + region.height, level.height)
    return x, y, w, h


def level_window(level: LevelInfo, region: Region) -> tuple[int, int, int, int]:
    """A level-0 ``region`` in ``level``'s pixels (x, y, width, height), as reads decode it:
    sub-pixel offsets at coarse levels are dropped, the far edges rounded outwards."""
    x = int(math.floor(region.x / level.downsample))
    y = int(math.floor(region.y / level.downsample))
    return (x, y, max(1, int(math.ceil((region.x + region.width) / level.downsample)) - x),
            max(1, int(math.ceil((region.y + region.height) / level.downsample)) - y))


def _read_from_level(
    slide: Slide, level_index: int, region: Region, out_w: int, out_h: int, budget: _Budget,
    decode: list[float] | None = None, what: str = "reading it", keep: bool = False,
) -> np.ndarray:
    lx, ly, lw, lh = level_window(slide.info.levels[level_index], region)
    budget.check_size(slide, level_index, lw, lh, what)

    factor = min(lw / out_w, lh / out_h)
    k = max(1, int(factor // 2))
    decode = decode if decode is not None else [0.0]
    shrunk = _read_box_shrunk(slide, level_index, lx, ly, lw, lh, k, budget, decode, keep)
    return _lanczos_to(shrunk, out_w, out_h)


def verify_pyramid(slide: Slide, budget: _Budget | None = None, up_to_mpp: float | None = None) -> frozenset[int]:
    """Check that each coarser level shows what the finer ones do, once per open slide.

    Some files carry pyramid levels that decode to wrong pixels without any error (a
    DICOM series whose downsampled frames are YCbCr labelled as RGB, for example) or
    that fail to decode at their edges. Each level is compared with the coarsest
    already-verified finer level on three windows of ``PYRAMID_CHECK_WINDOW`` pixels, as
    means of ``PYRAMID_CHECK_CELL``-pixel cells; a level whose median mean-absolute
    difference exceeds ``PYRAMID_MISMATCH_LIMIT`` (0-255 scale), or that cannot be decoded,
    is marked unreadable and reads fall back to finer levels (a level that fails to decode
    elsewhere is caught by the read itself, which falls back the same way). The windows
    shrink so the finer level's never exceeds ``PYRAMID_CHECK_MAX_FINE_SIDE`` pixels a
    side; a level too far from the finer one to be checked that way (a downsample jump
    over 512) is not used.

    ``up_to_mpp``: check only the levels a read at that µm/px may use (those at least as
    fine), continuing where an earlier call stopped: levels no read needs are never
    decoded. Without it every level is checked. Returns the unreadable levels so far.
    """
    if slide.pyramid_verified:
        return slide.unreadable_levels
    budget = budget or _Budget(DEFAULT_MAX_SOURCE_PIXELS, None)
    info = slide.info
    checked = getattr(slide, "pyramid_checked_through", 0)
    reference = info.levels[getattr(slide, "pyramid_reference", 0)]
    if reference.index in slide.unreadable_levels:  # a read failed on it since: compare with a usable one
        reference = info.levels[max(i for i in range(checked + 1) if i not in slide.unreadable_levels)]
    for level in info.levels[checked + 1:]:
        if up_to_mpp is not None and max(level.mpp_x, level.mpp_y) > up_to_mpp * (1.0 + LEVEL_MATCH_TOLERANCE):
            return slide.unreadable_levels
        if level.index not in slide.unreadable_levels and _level_matches(slide, level, reference, budget):
            reference = level
        slide.pyramid_checked_through = level.index
        slide.pyramid_reference = reference.index
    slide.pyramid_verified = True
    return slide.unreadable_levels


def with_pyramid_checked_beside(slide: Slide, reopen: Callable[[], Slide], up_to_mpp: float, work: Callable[[], T],
                                levels_used: Callable[[], Hashable],
                                max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
                                should_stop: Callable[[], bool] | None = None) -> T:
    """``work()`` on ``slide`` while its pyramid check (``verify_pyramid`` up to ``up_to_mpp``)
    runs on a second handle (``reopen()``) in a thread: the check's decoding then overlaps
    the work's instead of preceding it (on the CMU-1 TIFF, 93 -> 69 ms for the tissue step
    and the 1.25x student's levels).

    The work reads the levels as if they were sound (falling back from a level that fails to
    decode, as any read does). Then the check's verdict becomes the slide's, and the work
    runs again if what it chose (``levels_used()``, called after the work and after the
    verdict) changed with it: a level found unusable is never used for a result. An error of
    the check (a reference level that cannot be decoded, a stop) is raised after the work's
    own. A slide whose check has already begun, or that has one level, just runs ``work()``.
    """
    if slide.pyramid_verified or slide.pyramid_checked_through or slide.unreadable_levels \
            or len(slide.info.levels) == 1:
        return work()
    budget = _Budget(max_source_pixels, should_stop)

    def check() -> tuple[frozenset[int], bool, int, int]:
        with reopen() as other:
            verify_pyramid(other, budget, up_to_mpp)
            return (other.unreadable_levels, other.pyramid_verified, other.pyramid_checked_through,
                    other.pyramid_reference)

    future = in_background(check, "lowmag-pyramid-check")
    slide.pyramid_verified = True  # reads take the levels as they are until the verdict
    try:
        result = work()
    except BaseException:
        future.exception()  # the thread's handle is closed before the work's error leaves
        raise
    finally:
        slide.pyramid_verified = False
    chosen = levels_used()  # with the levels the work itself found undecodable
    unreadable, verified, through, reference = future.result()
    # The thread's slide logged each unusable level; a level the work itself found
    # undecodable is already marked (and its handle reopened).
    slide.unreadable_levels = slide.unreadable_levels | unreadable
    # (verify_pyramid compares further levels with a finer one if the work found the
    # reference undecodable.)
    slide.pyramid_verified, slide.pyramid_checked_through, slide.pyramid_reference = verified, through, reference
    return work() if levels_used() != chosen else result


def _level_matches(slide: Slide, level: LevelInfo, reference: LevelInfo, budget: _Budget) -> bool:
    """Whether ``level`` shows what the verified ``reference`` level does (else it is marked unreadable)."""
    info = slide.info
    ratio = level.downsample / reference.downsample
    side = min(PYRAMID_CHECK_WINDOW, level.width, level.height, int(PYRAMID_CHECK_MAX_FINE_SIDE / ratio))
    if side < 4:
        slide.mark_level_unreadable(level.index, ValueError(
            f"it is {ratio:.0f}x coarser than level {reference.index}, too far apart to check"))
        return False
    summary = max(1, min(16, side // PYRAMID_CHECK_CELL))
    w0 = min(info.width, int(round(side * level.downsample)))
    h0 = min(info.height, int(round(side * level.downsample)))
    differences = []
    for fx, fy in ((0.5, 0.5), (0.25, 0.25), (0.75, 0.75)):
        x = int(max(0, min(info.width - w0, fx * info.width - w0 / 2)))
        y = int(max(0, min(info.height - h0, fy * info.height - h0 / 2)))
        window = Region(x, y, w0, h0)
        try:
            coarse = _cell_means(slide, level.index, window, summary, budget)
        except SlideReadError as error:
            slide.mark_level_unreadable(level.index, error.__cause__ or error)
            return False
        # A failure at the reference level is not this level's fault: it propagates.
        fine = _cell_means(slide, reference.index, window, summary, budget)
        differences.append(float(np.abs(coarse - fine).mean()))
    mismatch = float(np.median(differences))
    if mismatch > PYRAMID_MISMATCH_LIMIT:
        slide.mark_level_unreadable(level.index, ValueError(
            f"its pixels differ from level {reference.index} by {mismatch:.0f}/255 on average (wrong colours or "
            "geometry)"))
        return False
    return True


def _cell_means(slide: Slide, level_index: int, region: Region, cells: int, budget: _Budget) -> np.ndarray:
    """Mean colour of each of ``cells`` x ``cells`` equal parts of a level-0 ``region``, read
    at one level as stored (float32, cells x cells x 3). The pyramid check compares levels
    on these: plain sums, where resampling each window cost as much as decoding it."""
    lx, ly, lw, lh = level_window(slide.info.levels[level_index], region)
    budget.check_size(slide, level_index, lw, lh, "checking its pyramid")
    budget.check_stop(slide)
    pixels = slide.read_region(level_index, lx, ly, lw, lh)
    rows = np.linspace(0, lh, cells + 1).round().astype(np.intp)
    columns = np.linspace(0, lw, cells + 1).round().astype(np.intp)
    sums = np.add.reduceat(np.add.reduceat(pixels, rows[:-1], axis=0, dtype=np.uint32), columns[:-1], axis=1)
    counts = np.diff(rows)[:, None, None] * np.diff(columns)[None, :, None]
    return sums.astype(np.float32) / counts.astype(np.float32)


def resolve_target_mpp(slide: Slide, target: float | Resolution | str) -> float:
    """µm/px of a target given as a number (µm/px), a Resolution or a string."""
    if isinstance(target, str):
        target = Resolution.parse(target)
    if isinstance(target, Resolution):
        return target.to_mpp(slide.info.mpp)
    value = float(target)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"target µm/px must be positive, got {target!r}")
    return value


def _blocks(height: int, width: int, k: int, block_pixels: int) -> Iterator[tuple[int, int, int, int]]:
    """(top, rows, left, columns) of source blocks, each a multiple of k on both sides and
    at most ``block_pixels`` (or one k x k block): whole-width stripes when k rows of the
    width fit, else k-row strips cut into columns."""
    if width * k <= block_pixels:
        rows = max(k, (max(1, block_pixels // max(width, 1)) // k) * k)
        columns = width
    else:
        rows = k
        columns = max(k, (block_pixels // k // k) * k)
    for top in range(0, height, rows):
        for left in range(0, width, columns):
            yield top, min(rows, height - top), left, min(columns, width - left)


def _read_box_shrunk(
    slide: Slide, level: int, lx: int, ly: int, lw: int, lh: int, k: int, budget: _Budget, decode: list[float],
    keep: bool = False,
) -> np.ndarray:
    """Read a level region block by block, box-averaging each k x k square. Level-0 blocks
    come from ``slide.decoded_level0`` when it holds them; ``keep``: a read of the whole of
    level 0 in one block is kept there (at most one block's pixels, ``budget.block_pixels``)."""
    out_w, out_h = lw // k, lh // k
    if out_w == 0 or out_h == 0:  # k <= factor / 2 keeps this from happening
        raise ValueError(f"region {lw}x{lh} is smaller than the {k}x{k} box")
    out = np.empty((out_h, out_w, 3), np.uint8)
    kept = slide.decoded_level0 if level == 0 else None
    for top, rows, left, columns in _blocks(out_h * k, out_w * k, k, budget.block_pixels):
        budget.check_stop(slide)
        x, y = lx + left, ly + top
        if kept is not None and x + columns <= kept.shape[1] and y + rows <= kept.shape[0]:
            block = kept[y:y + rows, x:x + columns]  # the very pixels a read would decode
        else:
            tick = time.perf_counter()
            try:
                block = slide.read_region(level, x, y, columns, rows)
            finally:
                decode[0] += time.perf_counter() - tick
            if keep and level == 0 and (x, y, columns, rows) == (0, 0, out_w * k, out_h * k):
                slide.decoded_level0 = block
        if k > 1:
            block = box_mean(block, k)
        out[top // k:(top + rows) // k, left // k:(left + columns) // k] = block
    return out


def box_mean(pixels: np.ndarray, k: int) -> np.ndarray:
    """Each k x k square of uint8 RGB ``pixels`` (sides multiples of k) as its mean, rounded
    half to even: the same values as a float32 mean over a reshaped array, at a fraction of
    its time (numpy reduces over non-adjacent axes slowly). The k rows of each square are
    added first, whole rows at a time (contiguous), then the k columns of the row sums; the
    sum is divided as float32, or, for a k x k a power of two (where that division is
    exact), rounded with integer shifts. 6.6 Mpx: k = 2 32 -> 31 ms, k = 7 25 -> 7 ms."""
    height, width = pixels.shape[0] // k * k, pixels.shape[1] // k * k
    kind = np.uint16 if k * k * 255 < 65536 else np.uint32
    rows = pixels[0:height:k, :width].astype(kind)
    for dy in range(1, k):
        rows += pixels[dy:height:k, :width]
    squares = rows.reshape(height // k, width // k, k, pixels.shape[2])
    total = squares[:, :, 0].copy()
    for dx in range(1, k):
        total += squares[:, :, dx]
    n = k * k
    if n & (n - 1):
        return np.rint(total / np.float32(n)).astype(np.uint8)
    shift = n.bit_length() - 1  # total / n = q + r / n; half to even: q + (r > n/2 or r == n/2 and q odd)
    total += (n // 2 - 1) + ((total >> shift) & 1)
    return (total >> shift).astype(np.uint8)


def _lanczos_to(pixels: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Resample an RGB array to exactly (out_h, out_w) with libvips Lanczos3."""
    import pyvips

    h, w = pixels.shape[:2]
    if (w, h) == (out_w, out_h):
        return np.ascontiguousarray(pixels)
    image = pyvips.Image.new_from_array(np.ascontiguousarray(pixels), interpretation="srgb")
    resized = image.resize(out_w / w, vscale=out_h / h, kernel="lanczos3", gap=0.0)
    if (resized.width, resized.height) != (out_w, out_h):
        # libvips rounds the output size; pad by edge replication or crop to the exact size.
        resized = resized.gravity("north-west", max(out_w, resized.width), max(out_h, resized.height), extend="copy")
        resized = resized.crop(0, 0, out_w, out_h)
    return np.ascontiguousarray(resized.numpy().reshape(out_h, out_w, 3))
