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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_pyramid(image, path, mpp, tile=tile)
    return path


def save_pyramid(image, path: str | Path, mpp: float | None, tile: int = 256, quality: int = 92,
                 bigtiff: bool = False) -> None:
    """Write a libvips image as a JPEG-tiled pyramidal TIFF (the "generic TIFF" OpenSlide
    reads) whose resolution tags give ``mpp``; ``mpp=None`` writes 72 dpi, as image tools do."""
    options = dict(tile=True, tile_width=tile, tile_height=tile, pyramid=True, compression="jpeg", Q=quality,
                   bigtiff=bigtiff)
    if mpp is not None:
        px_per_mm = 1000.0 / mpp
        options.update(xres=px_per_mm, yres=px_per_mm, resunit="cm")
    else:
        options.update(resunit="inch", xres=72 / 25.4, yres=72 / 25.4)  # 72 dpi
    image.tiffsave(str(path), **options)


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


def write_tissue_mosaic(source: str | Path, target: str | Path, pieces: int = 2, gap_um: float = 400.0) -> Path:
    """A slide of ``pieces`` separate pieces of real tissue on glass: the tissue of ``source``
    (a real slide) cut into that many bands, laid side by side with ``gap_um`` of glass
    between them, at the source's µm/px and never upsampled (a multi-piece slide from the
    one real slide a machine has)."""
    from lowmag.reader import read_at_mpp
    from lowmag.slide import open_slide
    from lowmag.tissue import locate_tissue

    with open_slide(source) as slide:
        mpp = slide.info.mpp
        box = max(locate_tissue(slide), key=lambda b: b.width * b.height)
        rgb = read_at_mpp(slide, mpp, box.region, exact=True)
    rng = np.random.default_rng(0)
    gap = int(round(gap_um / mpp))
    bands = np.array_split(rgb, pieces, axis=0)
    height = max(b.shape[0] for b in bands) + 2 * gap
    width = sum(b.shape[1] for b in bands) + (pieces + 1) * gap
    canvas = np.full((height, width, 3), 244, np.uint8)
    canvas += rng.integers(0, 6, size=(height, width, 1), dtype=np.uint8)  # glass noise
    x = gap
    for band in bands:
        canvas[gap:gap + band.shape[0], x:x + band.shape[1]] = band
        x += band.shape[1] + gap
    return make_synthetic_slide(target, width, height, mpp=mpp, pixels=canvas)


#: Ways to turn a real H&E slide into one a model trained on H&E must not answer for.
VARIANTS = ("fluorescence", "greyscale", "blurred", "inverted")


def write_variant(source: str | Path, target: str | Path, kind: str, blur_um: float = 4.0) -> Path:
    """Write ``source`` (a real brightfield slide) as a pyramidal TIFF at the same µm/px,
    changed the way other modalities or bad scans look, from real tissue, never upsampled:

    - ``fluorescence``: inverted and reduced to one (green) channel on a black background;
    - ``greyscale``: the grey level of each pixel, no colour;
    - ``blurred``: out of focus by a Gaussian of ``blur_um`` µm (beyond a 5x model's detail);
    - ``inverted``: every channel inverted (a brightfield scan saved as a negative).
    """
    import pyvips

    from lowmag.reader import read_at_mpp
    from lowmag.slide import open_slide

    with open_slide(source) as slide:
        mpp = slide.info.mpp
        rgb = read_at_mpp(slide, mpp, exact=True)
    if kind == "fluorescence":
        signal = 255 - rgb.astype(np.float32).mean(axis=2)
        pixels = np.zeros_like(rgb)
        pixels[..., 1] = np.clip(signal * 1.5, 0, 255).astype(np.uint8)  # background ~0, tissue bright
    elif kind == "greyscale":
        grey = np.rint(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
        pixels = np.repeat(grey[..., None], 3, axis=2)
    elif kind == "blurred":
        image = pyvips.Image.new_from_array(np.ascontiguousarray(rgb), interpretation="srgb")
        pixels = image.gaussblur(blur_um / mpp, precision="float").cast("uchar").numpy()
    elif kind == "inverted":
        pixels = 255 - rgb
    else:
        raise ValueError(f"kind must be one of {', '.join(VARIANTS)}, got {kind!r}")
    return make_synthetic_slide(target, pixels.shape[1], pixels.shape[0], mpp=mpp, pixels=pixels)
