"""Thumbnails with tissue boxes drawn on them, for people to check at a glance."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from lowmag.io import atomic_write_bytes
from lowmag.tissue import TissueBox

BOX_COLOUR = (0, 160, 60)


def draw_boxes(
    rgb: np.ndarray,
    boxes: Sequence[TissueBox],
    scale: tuple[float, float],
    labels: Sequence[str] | None = None,
    colour: tuple[int, int, int] = BOX_COLOUR,
    colours: Sequence[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """A copy of ``rgb`` with each box outlined (``scale`` maps level-0 px to image px).

    ``colours`` gives each box its own colour (e.g. by class); else all are ``colour``.
    Drawn in place on one copy (outlines as array slices, each label blended only where its
    text lies): the cost follows the boxes, not boxes x image size.
    """
    out = np.array(rgb, dtype=np.uint8, copy=True, order="C")
    height, width = out.shape[:2]
    thickness = max(1, int(round(min(height, width) / 300)))
    dpi = max(60, width // 6)
    for i, box in enumerate(boxes):
        box_colour = np.asarray(colours[i] if colours is not None else colour, np.uint8)
        x = int(round(box.x * scale[0]))
        y = int(round(box.y * scale[1]))
        w = max(1, int(round(box.width * scale[0])))
        h = max(1, int(round(box.height * scale[1])))
        _outline(out, x, y, w, h, thickness, box_colour)
        text = labels[i] if labels is not None else str(i + 1)
        mask = _text_mask(text, dpi)
        if mask is not None:
            _blend(out, mask, x + thickness + 2, y + thickness + 2, box_colour)
    return out


def _outline(out: np.ndarray, x: int, y: int, w: int, h: int, thickness: int, colour: np.ndarray) -> None:
    """Nested one-pixel rectangles, as libvips' draw_rect draws them, clipped to the image."""
    height, width = out.shape[:2]
    for t in range(thickness):
        left, top = x + t, y + t
        right, bottom = left + max(1, w - 2 * t) - 1, top + max(1, h - 2 * t) - 1
        x0, x1 = max(left, 0), min(right, width - 1)
        y0, y1 = max(top, 0), min(bottom, height - 1)
        if x0 > x1 or y0 > y1:
            continue
        for row in (top, bottom):
            if 0 <= row < height:
                out[row, x0:x1 + 1] = colour
        for column in (left, right):
            if 0 <= column < width:
                out[y0:y1 + 1, column] = colour


@lru_cache(maxsize=256)
def _text_mask(text: str, dpi: int) -> np.ndarray | None:
    """The label's text as a 0-255 coverage mask (None where libvips renders no text)."""
    import pyvips

    try:
        mask = pyvips.Image.text(text, dpi=dpi, font="sans bold")
    except pyvips.Error:  # no text rendering in this libvips build: boxes only
        return None
    return np.ascontiguousarray(mask.numpy().reshape(mask.height, mask.width))


def _blend(out: np.ndarray, mask: np.ndarray, x: int, y: int, colour: np.ndarray) -> None:
    """``colour`` over ``out`` at (x, y) with ``mask`` as its coverage, clipped to the image."""
    height, width = out.shape[:2]
    if x >= width or y >= height:
        return
    mh, mw = min(mask.shape[0], height - y), min(mask.shape[1], width - x)
    if mh <= 0 or mw <= 0:
        return
    coverage = mask[:mh, :mw, None].astype(np.int32)
    patch = out[y:y + mh, x:x + mw].astype(np.int32)
    # libvips' draw_mask arithmetic, so thumbnails come out as they always have.
    out[y:y + mh, x:x + mw] = ((colour.astype(np.int32) * coverage + patch * (255 - coverage)) // 255).astype(np.uint8)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB array as PNG, atomically."""
    import pyvips

    image = pyvips.Image.new_from_array(np.ascontiguousarray(rgb), interpretation="srgb")
    # zlib level 1, no row filter: stained tissue barely compresses, so effort buys little.
    # The CMU-1 region's 740 x 554 thumbnail: 7.7 ms and 855 kB, against 13 ms and 672 kB at
    # level 2 with the "average" filter and 33 ms and 698 kB at level 6 (a 30 x 22.5 mm
    # slide's 1024 px one: 4.8 ms, 404 kB, against 8.6 ms, 339 kB). Issue 15: outputs should
    # not cost more than inference. PNG is lossless: the pixels are the same.
    atomic_write_bytes(path, image.pngsave_buffer(compression=1, filter="none"))
    return Path(path)
