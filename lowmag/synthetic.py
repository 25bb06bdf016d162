"""Synthetic slides with known geometry, for tests and for demos without real data.

``make_synthetic_slide`` writes a tiled, pyramidal, JPEG-compressed TIFF (the
"generic TIFF" OpenSlide reads) whose resolution tags give a chosen µm/px, with
H&E-like textured pieces of tissue at known places on a white background.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Blob:
    """An elliptical piece of synthetic tissue, in level-0 pixels."""

    cx: int
    cy: int
    rx: int
    ry: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return (self.cx - self.rx, self.cy - self.ry, 2 * self.rx, 2 * self.ry)


def synthetic_pixels(width: int, height: int, blobs: Sequence[Blob], seed: int = 0) -> np.ndarray:
    """RGB pixels: white glass with pink, textured, nucleus-dotted tissue in each blob."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 244, dtype=np.uint8)
    image += rng.integers(0, 6, size=(height, width, 1), dtype=np.uint8)  # glass noise
    yy, xx = np.mgrid[0:height, 0:width]
    for blob in blobs:
        inside = ((xx - blob.cx) / blob.rx) ** 2 + ((yy - blob.cy) / blob.ry) ** 2 <= 1.0
        n = int(inside.sum())
        stroma = np.array([222, 140, 185], dtype=np.float32)
        texture = rng.normal(0, 18, size=(n, 1)).astype(np.float32)
        image[inside] = np.clip(stroma + texture, 0, 255).astype(np.uint8)
        # Nuclei: small dark purple dots scattered through the piece.
        ys, xs = np.nonzero(inside)
        picks = rng.choice(n, size=max(1, n // 300), replace=False)
        for y, x in zip(ys[picks], xs[picks]):
            image[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] = (95, 50, 140)
    return image


def make_synthetic_slide(
    path: str | Path,
    width: int = 2048,
    height: int = 1536,
    mpp: float | None = 0.5,
    blobs: Sequence[Blob] | None = None,
    seed: int = 0,
    tile: int = 256,
    pixels: np.ndarray | None = None,
) -> Path:
    """Write a pyramidal tiled TIFF; ``mpp=None`` writes no resolution tags at all."""
    import pyvips

    if pixels is None:
        if blobs is None:
            blobs = default_blobs(width, height)
        pixels = synthetic_pixels(width, height, blobs, seed)
    image = pyvips.Image.new_from_array(np.ascontiguousarray(pixels), interpretation="srgb")
    options = dict(tile=True, tile_width=tile, tile_height=tile, pyramid=True, compression="jpeg", Q=92)
    if mpp is not None:
        px_per_mm = 1000.0 / mpp
        options.update(xres=px_per_mm, yres=px_per_mm, resunit="cm")
    else:
        options.update(resunit="inch", xres=72 / 25.4, yres=72 / 25.4)  # 72 dpi
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.tiffsave(str(path), **options)
    return path


def default_blobs(width: int, height: int) -> list[Blob]:
    """Two pieces of tissue: a large one on the left, a smaller one on the right."""
    return [
        Blob(cx=int(width * 0.30), cy=int(height * 0.50), rx=int(width * 0.18), ry=int(height * 0.32)),
        Blob(cx=int(width * 0.75), cy=int(height * 0.40), rx=int(width * 0.10), ry=int(height * 0.15)),
    ]


def write_in_pieces(source: str | Path, target: str | Path, pieces: int, pause: float) -> None:
    """Copy ``source`` to ``target`` the way a scanner writes a slide: in ``pieces`` chunks,
    flushed, with ``pause`` seconds between them (for watcher tests and the demo)."""
    import time

    data = Path(source).read_bytes()
    step = len(data) // pieces + 1
    with Path(target).open("wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start:start + step])
            handle.flush()
            time.sleep(pause)
