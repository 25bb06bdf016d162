"""Thumbnails with tissue boxes drawn on them, for people to check at a glance."""

from __future__ import annotations

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
    """
    import pyvips

    image = pyvips.Image.new_from_array(np.ascontiguousarray(rgb), interpretation="srgb")
    thickness = max(1, int(round(min(rgb.shape[:2]) / 300)))
    for i, box in enumerate(boxes):
        box_colour = list(colours[i] if colours is not None else colour)
        x = int(round(box.x * scale[0]))
        y = int(round(box.y * scale[1]))
        w = max(1, int(round(box.width * scale[0])))
        h = max(1, int(round(box.height * scale[1])))
        for t in range(thickness):
            image = image.draw_rect(box_colour, x + t, y + t, max(1, w - 2 * t), max(1, h - 2 * t))
        text = labels[i] if labels is not None else str(i + 1)
        image = _draw_label(image, text, x + thickness + 2, y + thickness + 2, box_colour)
    return np.ascontiguousarray(image.numpy().reshape(rgb.shape))


def _draw_label(image, text: str, x: int, y: int, colour: list[int]):
    import pyvips

    try:
        mask = pyvips.Image.text(text, dpi=max(60, image.width // 6), font="sans bold")
    except pyvips.Error:  # no text rendering in this libvips build: boxes only
        return image
    if x >= image.width or y >= image.height:
        return image
    return image.draw_mask(colour, mask, x, y)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB array as PNG, atomically."""
    import pyvips

    image = pyvips.Image.new_from_array(np.ascontiguousarray(rgb), interpretation="srgb")
    atomic_write_bytes(path, image.pngsave_buffer(compression=6))
    return Path(path)
