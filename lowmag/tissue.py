"""Where the tissue is: bounding boxes of the tissue pieces on a slide.

In the spirit of tissueloc (the localisation DiPalma et al. used): read the slide at a
low resolution with the core reader, threshold colour saturation with Otsu's method at about 2048 px across
(stained tissue is coloured, glass and background are grey or white), clean the mask
with a morphological closing and opening, and keep connected pieces larger than a
minimum area in µm². Pieces of one flat colour (synthetic test patterns, filled
annotation marks) are not tissue and are dropped. Boxes come back in level-0 pixels,
with their size in µm; a slide with no tissue yields an empty list.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from lowmag.concurrency import in_background
from lowmag.names import shown
from lowmag.reader import (DEFAULT_MAX_SOURCE_PIXELS, Region, choose_level, mpp_for_longest_side, read_at_mpp,
                           with_pyramid_checked_beside)
from lowmag.slide import Slide

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueParams:
    """Knobs of ``locate_tissue``; the defaults suit H&E slides scanned at 20x-40x."""

    #: The mask is computed on an image about this many pixels on its longest side...
    analysis_side: int = 2048
    #: ...or on a pyramid level as stored when one has between this and ``analysis_side``
    #: pixels on its longest side (no resampling, and 4-16x fewer pixels to decode)...
    min_analysis_side: int = 1024
    #: ...but never finer than this µm/px (2 µm/px = 5x): a 20 or 30 mm slide with a
    #: halving pyramid is analysed at 16 µm/px, a 1.5 mm biopsy region at 2 µm/px.
    min_mpp: float = 2.0
    #: Lowest saturation (0-1) ever counted as tissue, whatever Otsu says.
    min_saturation: float = 0.07
    #: Pieces smaller than this (µm² of tissue) are dropped as dust and debris.
    min_area_um2: float = 10_000.0
    #: Radius (µm) of the closing that joins a piece's fragments and of the opening that
    #: removes specks.
    close_um: float = 24.0
    open_um: float = 8.0
    #: Pieces whose median local grey-level gradient (0-255 per pixel) is below this are
    #: flat colour, not tissue (tissue measures 15-45 on real slides, flat patterns 0).
    min_texture: float = 2.0
    #: Margin (µm) added around each box, clipped to the slide.
    padding_um: float = 16.0


@dataclass(frozen=True)
class TissueBox:
    """One tissue piece: its bounding box in level-0 pixels and its size in µm."""

    x: int
    y: int
    width: int
    height: int
    mpp_x: float
    mpp_y: float
    tissue_area_um2: float

    @property
    def region(self) -> Region:
        return Region(self.x, self.y, self.width, self.height)

    @property
    def x_um(self) -> float:
        return self.x * self.mpp_x

    @property
    def y_um(self) -> float:
        return self.y * self.mpp_y

    @property
    def width_um(self) -> float:
        return self.width * self.mpp_x

    @property
    def height_um(self) -> float:
        return self.height * self.mpp_y

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            x_um=self.x_um, y_um=self.y_um, width_um=self.width_um, height_um=self.height_um
        )
        return data


def analysis_mpp(slide: Slide, params: TissueParams = TissueParams()) -> float:
    """µm/px at which the tissue mask of this slide is computed.

    About ``analysis_side`` pixels across, never finer than ``min_mpp``. When a pyramid level
    is between ``min_analysis_side`` and ``analysis_side`` pixels on its longest side, the
    overview is the finest such level as stored: decoding it is the whole cost, where the
    exact size would decode a finer level with up to 16x the pixels and then resample it.
    The mask's rules are in µm but rounded to whole pixels (at least one), so a coarser
    overview is a little coarser in what it keeps: at 16 µm/px the opening is one pixel,
    16 µm, where about 2048 px across a 20 mm slide (9.8 µm/px) it was 9.8 µm. Slides under
    about 4 mm keep ``min_mpp``, as before.
    """
    wanted = max(params.min_mpp, mpp_for_longest_side(slide, params.analysis_side))
    if wanted <= params.min_mpp:
        return wanted
    best = None
    for level in slide.info.levels:
        side = max(level.width, level.height)
        if level.index not in slide.unreadable_levels and params.min_analysis_side <= side <= params.analysis_side:
            mpp = max(level.mpp_x, level.mpp_y)
            best = mpp if best is None else min(best, mpp)
    return best if best is not None else wanted


def colour_saturation(rgb: np.ndarray) -> np.ndarray:
    """(max - min) / max of R, G, B per pixel, in 0-1 (0 for black): stain is coloured, glass grey."""
    # max and min on the uint8 pixels, then one float32 division: the same values as
    # converting the whole image to float first, at a third of the memory traffic.
    high, low = channel_max(rgb).astype(np.float32), channel_min(rgb).astype(np.float32)
    return (high - low) / np.maximum(high, np.float32(1.0))


def channel_max(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel max of R, G, B (element-wise: numpy reduces a last axis of 3 slowly)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def channel_min(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel min of R, G, B."""
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def brightness(rgb: np.ndarray) -> np.ndarray:
    """Mean of R, G and B per pixel as float32 (the same values as ``rgb.astype(float32).mean(2)``)."""
    total = rgb[..., 0].astype(np.float32) + rgb[..., 1] + rgb[..., 2]
    return total / np.float32(3.0)


@dataclass(frozen=True)
class Modality:
    """What kind of image the tissue step saw: ``brightfield`` (stained tissue on bright
    glass, what lowmag's models are trained on), ``dark-background`` (fluorescence, or an
    inverted image) or ``greyscale`` (no colour anywhere); ``reason`` says why, for people."""

    kind: str
    background: float  # brightness (0-255) of the background the step found
    reason: str = ""

    @property
    def brightfield(self) -> bool:
        return self.kind == "brightfield"


#: A slide with at least this share of dark pixels (every channel below 50) that form a flat
#: field (their median local gradient under 5) and almost no bright glass has a dark
#: background: fluorescence, or an inverted image. Dense H&E is dark too, but textured (the
#: darkest Kather tiles: half their pixels dark, median gradient 15 or more); a brightfield
#: slide padded with black still shows its glass.
DARK_BACKGROUND_SHARE = 0.3
DARK_FIELD_GRADIENT = 5.0
GLASS_SHARE = 0.05
#: A slide whose pixels all stay below this saturation (99.9th percentile) has no colour...
GREYSCALE_SATURATION = 0.05
#: ...and is greyscale tissue, not blank glass, when this share is darker than the glass.
GREYSCALE_TISSUE_SHARE = 0.02


def overview_modality(rgb: np.ndarray, params: TissueParams | None = None,
                      saturation: np.ndarray | None = None) -> Modality:
    """Brightfield, dark-background or greyscale, judged on the whole-slide overview
    (``saturation``: its ``colour_saturation``, when the caller has it)."""
    params = params or TissueParams()
    light = brightness(rgb)
    saturation = colour_saturation(rgb) if saturation is None else saturation
    high = channel_max(rgb)
    dark = high < 50
    glass = float(((high > 200) & (saturation < 0.1)).mean())
    if dark.mean() >= DARK_BACKGROUND_SHARE and glass < GLASS_SHARE \
            and float(np.median(_gradient(rgb)[dark])) < DARK_FIELD_GRADIENT:
        level = float(np.median(light[dark]))
        return Modality("dark-background", level, f"the background is dark ({dark.mean():.0%} of the slide is a "
                        f"flat near-black field, brightness {level:.0f}/255, and no bright glass): a fluorescence "
                        "or inverted image, not a brightfield scan")
    plain = saturation < params.min_saturation
    background = float(np.median(light[plain] if plain.mean() >= 0.2 else light))
    if float(np.quantile(saturation, 0.999)) < GREYSCALE_SATURATION:
        bright = float(np.quantile(light, 0.9))
        if (light < bright - 30).mean() >= GREYSCALE_TISSUE_SHARE:
            return Modality("greyscale", bright, "the slide has no colour at all: a greyscale or single-channel "
                            "image, not a stained brightfield scan")
    return Modality("brightfield", background)


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams(),
                modality: Modality | None = None, saturation: np.ndarray | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB image at ``mpp`` (before removing small pieces).

    Brightfield: coloured pixels (saturation above Otsu's threshold). On a dark background
    the signal is what is brighter than it, on a greyscale slide what is darker than it, so
    neither becomes one box covering the whole slide. ``saturation``: the image's
    ``colour_saturation``, when the caller has it."""
    import pyvips

    kind = modality.kind if modality is not None else "brightfield"
    if kind == "brightfield":
        signal = colour_saturation(rgb) if saturation is None else saturation
    else:
        light = brightness(rgb) / 255.0
        signal = light if kind == "dark-background" else 1.0 - light
    sat_image = pyvips.Image.new_from_array(np.ascontiguousarray(signal, np.float32)).gaussblur(1.0,
                                                                                               precision="float")
    signal = sat_image.numpy().reshape(signal.shape)
    threshold = max(_otsu(signal), params.min_saturation)
    mask = (signal > threshold).astype(np.uint8) * 255

    image = pyvips.Image.new_from_array(mask)
    close_r = max(1, int(round(params.close_um / mpp)))
    open_r = max(1, int(round(params.open_um / mpp)))
    # Closing, then opening. Each step is computed whole into memory before the next: chained
    # lazily, libvips recomputes every tile's overlap with its neighbours for the next mask
    # (2.7x the time on the CMU-1 region, 45 ms against 17, for the same pixels).
    for step, radius in ((_dilate, close_r), (_erode, close_r), (_erode, open_r), (_dilate, open_r)):
        image = step(image, radius).copy_memory()
    return image.numpy().reshape(mask.shape) > 127


class TissueFinding(NamedTuple):
    """The tissue step's answer: the boxes, the overview they were found on, and what kind
    of image the slide is (``Modality``)."""

    boxes: list[TissueBox]
    overview: np.ndarray
    modality: Modality


def locate_tissue(slide: Slide, params: TissueParams = TissueParams()) -> list[TissueBox]:
    """Bounding boxes of the tissue pieces, top to bottom then left to right."""
    return find_tissue(slide, params).boxes


def find_tissue_checked_beside(slide: Slide, reopen: Callable[[], Slide], up_to_mpp: float,
                               params: TissueParams = TissueParams(),
                               max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
                               should_stop: Callable[[], bool] | None = None,
                               keep_level0: bool = False) -> TissueFinding:
    """``find_tissue`` while the pyramid check of every level up to ``up_to_mpp`` (coarser or
    finer than the overview: give the model's µm/px) runs on a second handle, ``reopen()``,
    beside it. The answer is ``find_tissue``'s: it is found again when the check rules out
    the level the overview was read from (``reader.with_pyramid_checked_beside``)."""
    def levels_used() -> tuple[float, int]:
        mpp = analysis_mpp(slide, params)
        return mpp, choose_level(slide, mpp)

    return with_pyramid_checked_beside(
        slide, reopen, max(up_to_mpp, analysis_mpp(slide, params)),
        lambda: find_tissue(slide, params, max_source_pixels, should_stop, keep_level0), levels_used,
        max_source_pixels, should_stop)


def find_tissue(slide: Slide, params: TissueParams = TissueParams(),
                max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
                should_stop: Callable[[], bool] | None = None, keep_level0: bool = False) -> TissueFinding:
    """The tissue boxes, the low-resolution image of the whole slide they were found on,
    and the slide's modality (a fluorescence or greyscale slide is recognised here, with
    its reason, and its signal boxed, instead of one box covering the whole slide).

    The edge runner draws its thumbnail on the overview instead of reading the slide again.
    The overview read is bounded like any other (``read_at_mpp``'s ``max_source_pixels``).
    ``keep_level0``: a caller that reads the slide's pieces next, and then closes it, asks to
    keep level 0 when the overview decodes it whole (a slide without a usable coarser level:
    one-level SVS, the DICOM series with unusable levels) for those reads to slice
    (``read_at_mpp``). Not by default: a caller holding many slides open would hold each
    one's level 0 (up to 48 MB) until it closes them.
    """
    import pyvips

    info = slide.info
    mpp = analysis_mpp(slide, params)
    rgb = read_at_mpp(slide, mpp, max_source_pixels=max_source_pixels, should_stop=should_stop,
                      keep_level0=keep_level0)
    saturation = colour_saturation(rgb)
    # The modality is judged on the other core while the brightfield mask is computed (most
    # slides are brightfield; on the CMU-1 region 9 of the step's 70 ms); another modality
    # computes its own mask after.
    judging = in_background(lambda: overview_modality(rgb, params, saturation), "lowmag-modality")
    mask = tissue_mask(rgb, mpp, params, None, saturation)
    modality = judging.result()
    if not modality.brightfield:
        logger.info("%s: %s", shown(info.path), modality.reason)
        mask = tissue_mask(rgb, mpp, params, modality)
    if not mask.any():
        return TissueFinding([], rgb, modality)
    labels = pyvips.Image.new_from_array(mask.astype(np.uint8)).labelregions().numpy()
    labels = labels.reshape(mask.shape)
    ys, xs = np.nonzero(mask)
    ids = labels[ys, xs]
    # One sort groups the mask's pixels by piece: counts, bounding boxes and each piece's
    # gradients (for its median) come from the sorted runs.
    order = np.argsort(ids, kind="stable")
    grouped = ids[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    counts = np.diff(np.r_[starts, len(grouped)])
    n = len(starts)
    xs, ys = xs[order], ys[order]
    x_min, x_max = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    y_min, y_max = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    per_piece = np.split(_gradient(rgb)[ys, xs], starts[1:])

    # Scale from analysis pixels to level-0 pixels, per axis.
    sx = info.width / rgb.shape[1]
    sy = info.height / rgb.shape[0]
    pad_x = params.padding_um / info.mpp_x
    pad_y = params.padding_um / info.mpp_y
    boxes = []
    for i in range(n):
        area_um2 = float(counts[i]) * mpp * mpp
        if area_um2 < params.min_area_um2:
            continue
        texture = float(np.median(per_piece[i]))
        if texture < params.min_texture:
            logger.debug("%s: dropping a flat-colour piece (texture %.2f)", shown(info.path), texture)
            continue
        x0 = max(0, int(math.floor(x_min[i] * sx - pad_x)))
        y0 = max(0, int(math.floor(y_min[i] * sy - pad_y)))
        x1 = min(info.width, int(math.ceil((x_max[i] + 1) * sx + pad_x)))
        y1 = min(info.height, int(math.ceil((y_max[i] + 1) * sy + pad_y)))
        boxes.append(TissueBox(x0, y0, x1 - x0, y1 - y0, info.mpp_x, info.mpp_y, area_um2))
    boxes.sort(key=lambda b: (b.y, b.x))
    return TissueFinding(boxes, rgb, modality)


def _gradient(rgb: np.ndarray) -> np.ndarray:
    """Local grey-level variation: |d/dx| + |d/dy| of the mean of R, G and B."""
    gray = brightness(rgb)
    gradient = np.zeros_like(gray)
    gradient[:, 1:] += np.abs(np.diff(gray, axis=1))
    gradient[1:, :] += np.abs(np.diff(gray, axis=0))
    return gradient


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist = _histogram01(values, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = hist.sum()
    if total == 0:
        return 1.0
    centers = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    sum0 = np.cumsum(hist * centers)
    mean0 = sum0 / np.maximum(weight0, 1e-12)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(centers[int(np.argmax(between))])


def _histogram01(values: np.ndarray, bins: int) -> np.ndarray:
    """``np.histogram(values, bins, range=(0, 1))[0]`` as float64, for float32 ``values`` and
    a power-of-two ``bins``: a value's bin is floor(value * bins) (exact: scaling by a power
    of two loses nothing, and the edges k / bins are exact), the last bin closed, values
    outside [0, 1] left out. One bincount instead of numpy's general search (10 -> 3 ms on
    a 1.2 Mpx overview)."""
    flat = np.ravel(values)
    if flat.dtype != np.float32 or bins & (bins - 1):
        return np.histogram(flat, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    if flat.size and not (flat.min() >= 0.0 and flat.max() <= 1.0):  # NaN included
        flat = flat[(flat >= 0.0) & (flat <= 1.0)]
    index = (flat * np.float32(bins)).astype(np.intp)
    np.minimum(index, bins - 1, out=index)
    return np.bincount(index, minlength=bins).astype(np.float64)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return np.where(xx * xx + yy * yy <= radius * radius, 255, 128).astype(np.uint8)


def _dilate(image: Any, radius: int) -> Any:
    import pyvips

    return image.morph(pyvips.Image.new_from_array(_disk(radius)), "dilate")


def _erode(image: Any, radius: int) -> Any:
    import pyvips

    return image.morph(pyvips.Image.new_from_array(_disk(radius)), "erode")
