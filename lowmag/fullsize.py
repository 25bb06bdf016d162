"""Full-size slides from real tissue, for benchmarks at the scale labs scan.

The real slides a machine has here are small regions (the CMU-1 region is 1.1 x 1.5 mm);
a lab's slide is 15 x 20 mm or more, and the costs that grow with the slide's area (the
pyramid check, the tissue overview, the outputs) only show at that size. This module lays
real tissue out as many separate pieces on glass and writes a tiled JPEG pyramid of the
size asked for, at the source's µm/px, streaming through libvips (a 60k x 45k slide is
never held in memory).

Where the pieces come from:
- ``pieces_from_slide``: the tissue box of a real slide, read at its own µm/px (level 0);
- ``pieces_from_tiles``: labeled tiles put back where they were cut from their source crop
  (Kather 2016 names each tile's row and column), missing tiles left as glass, resampled
  from the tiles' µm/px to the slide's (always coarser: 0.495 -> 0.499, never upsampled).

How a generated slide differs from a real one: every piece is a rotated, flipped or cropped
copy of the same few real pieces, or where a piece is larger than any of them a mosaic of
such crops with straight seams (their texture repeats), its outline is an ellipse with a
wavy rim rather than a cut edge, its tissue covers about a fifth of the glass, the glass is uniform with faint noise (no dust, pen marks,
bubbles or label), and the pyramid is libvips' (levels halving, JPEG Q90, 256 px tiles)
rather than a scanner's. What a bench measures on it (decoding, tissue finding, reading
the pieces, inference) depends on the pixel counts and the tissue's layout, which match.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lowmag.errors import SlideError
from lowmag.synthetic import save_pyramid

#: Colour of the generated glass (0-255 per channel) and the amplitude of its noise.
GLASS = 244
GLASS_NOISE = 6


@dataclass(frozen=True)
class FullSizeLayout:
    """Where each piece went, in level-0 pixels (x, y, width, height), for tests."""

    width: int
    height: int
    mpp: float
    pieces: tuple[tuple[int, int, int, int], ...]


def pieces_from_slide(path: str | Path) -> tuple[list[np.ndarray], float]:
    """The tissue of a real slide as one RGB piece per tissue box, at its level-0 µm/px."""
    from lowmag.reader import read_at_mpp
    from lowmag.slide import open_slide
    from lowmag.tissue import locate_tissue

    with open_slide(path) as slide:
        mpp = slide.info.mpp
        pieces = [read_at_mpp(slide, mpp, box.region, exact=True) for box in locate_tissue(slide)]
    return pieces, mpp


def pieces_from_tiles(folder: str | Path, tile_mpp: float, mpp: float, min_tiles: int = 9,
                      limit: int = 12, metadata: str = "tiles.csv",
                      exclude: Sequence[str] = ("08_EMPTY",)) -> list[np.ndarray]:
    """Source crops rebuilt from labeled tiles (``metadata`` columns path, source_image, row,
    col; row and col are pixel offsets in the crop), the ``limit`` fullest with at least
    ``min_tiles`` tiles (blank-glass classes in ``exclude`` left out), resampled from ``tile_mpp`` to ``mpp`` (which must be coarser or equal)."""
    import pyvips

    if mpp < tile_mpp * 0.999:
        raise ValueError(f"the slide's {mpp} µm/px is finer than the tiles' {tile_mpp}: that would upsample")
    folder = Path(folder)
    groups: dict[tuple[str, str], list[tuple[int, int, Path]]] = {}
    for row in tile_rows(folder / metadata):
        key = (row["label"], row["source_image"])
        groups.setdefault(key, []).append((int(row["row"]), int(row["col"]), folder / row["path"]))
    def filled(tiles: list[tuple[int, int, Path]]) -> float:  # tiles present x share of the crop they fill
        rows = {t[0] for t in tiles}
        cols = {t[1] for t in tiles}
        return len(tiles) * len(tiles) / (len(rows) * len(cols))

    candidates = [g for (label, _), g in groups.items() if len(g) >= min_tiles and label not in exclude]
    chosen = sorted(candidates, key=filled, reverse=True)[:limit]
    pieces = []
    for tiles in chosen:
        first = pyvips.Image.new_from_file(str(tiles[0][2]))
        side_y, side_x = first.height, first.width
        top, left = min(t[0] for t in tiles), min(t[1] for t in tiles)
        height = max(t[0] for t in tiles) - top + side_y
        width = max(t[1] for t in tiles) - left + side_x
        canvas = glass(height, width, np.random.default_rng(len(pieces)))
        for row, col, path in tiles:
            rgb = pyvips.Image.new_from_file(str(path)).extract_band(0, n=3).numpy()
            canvas[row - top:row - top + side_y, col - left:col - left + side_x] = rgb
        scale = tile_mpp / mpp
        if scale < 0.999:
            image = pyvips.Image.new_from_array(canvas, interpretation="srgb").resize(scale, kernel="lanczos3")
            canvas = np.ascontiguousarray(image.numpy())
        pieces.append(canvas)
    return pieces


#: The columns ``pieces_from_tiles`` reads from the tiles' metadata.
TILE_COLUMNS = ("path", "label", "source_image", "row", "col")


def tile_rows(metadata: Path) -> list[dict[str, str]]:
    """The rows of a tiles.csv, refused with the file and the fix when it is missing or lacks
    the columns that place each tile in its source crop."""
    fix = ("give a folder of labeled tiles with a tiles.csv naming, per tile, its path, label, source_image, "
           "and the row and col of its top-left pixel in that image (as the Kather 2016 tiles have).")
    if not metadata.is_file():
        raise SlideError(metadata, "not found: the tiles' source crops cannot be rebuilt without it.", fix)
    with metadata.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in TILE_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise SlideError(metadata, f"lacks the column(s) {', '.join(missing)}.", fix)
        rows = list(reader)
    for number, row in enumerate(rows, start=2):
        if not (row["row"] or "").isdigit() or not (row["col"] or "").isdigit():
            raise SlideError(metadata, f"line {number}: row and col must be whole pixel offsets, got "
                             f"{row['row']!r} and {row['col']!r}.", fix)
    return rows


def glass(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform bright glass with faint noise, as RGB."""
    out = np.full((height, width, 3), GLASS - GLASS_NOISE // 2, np.uint8)
    out += rng.integers(0, GLASS_NOISE, size=(height, width, 1), dtype=np.uint8)
    return out


def shaped_piece(piece: np.ndarray, rng: np.random.Generator, cell: tuple[int, int]) -> np.ndarray:
    """A copy of ``piece`` rotated, flipped and cropped to fit ``cell`` (height, width), its
    outline an ellipse with a wavy rim (outside it: glass). Never enlarged."""
    out = np.rot90(piece, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    h = min(out.shape[0], cell[0], int(out.shape[0] * rng.uniform(0.6, 1.0)))
    w = min(out.shape[1], cell[1], int(out.shape[1] * rng.uniform(0.6, 1.0)))
    y0 = int(rng.integers(0, out.shape[0] - h + 1))
    x0 = int(rng.integers(0, out.shape[1] - w + 1))
    out = np.ascontiguousarray(out[y0:y0 + h, x0:x0 + w])
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.arctan2(yy - h / 2, xx - w / 2)
    phases = rng.uniform(0, 2 * math.pi, 3)
    rim = 1.0 - 0.12 * sum(np.sin(k * angle + p) ** 2 for k, p in zip((3, 5, 7), phases))
    inside = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= rim ** 2
    background = glass(h, w, rng)
    return np.where(inside[..., None], out, background)


def tissue_mosaic(pieces: Sequence[np.ndarray], rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A ``height`` x ``width`` block of real tissue packed from crops of ``pieces`` (rows of
    crops, each rotated or flipped at random), for tissue pieces larger than any one source.
    Only crops: nothing is resized."""
    out = glass(height, width, rng)
    y = 0
    while y < height:
        row = min(height - y, int(rng.integers(600, 1600)))
        x = 0
        while x < width:
            source = np.rot90(pieces[int(rng.integers(0, len(pieces)))], int(rng.integers(0, 4)))
            if rng.random() < 0.5:
                source = source[::-1]
            h = min(row, source.shape[0])
            w = min(width - x, source.shape[1], int(rng.integers(600, 2400)))
            y0 = int(rng.integers(0, source.shape[0] - h + 1))
            x0 = int(rng.integers(0, source.shape[1] - w + 1))
            out[y:y + h, x:x + w] = source[y0:y0 + h, x0:x0 + w]
            x += w
        y += row
    return out


def write_full_size_slide(target: str | Path, pieces: Sequence[np.ndarray], mpp: float, width: int, height: int,
                          count: int, seed: int = 0, quality: int = 90, tile: int = 256,
                          fill: tuple[float, float] = (0.5, 0.9)) -> FullSizeLayout:
    """A ``width`` x ``height`` slide at ``mpp`` with ``count`` pieces of the given real tissue
    spread over a grid, written as a tiled JPEG pyramid (BigTIFF) with resolution tags.
    Each piece spans ``fill`` (a random share, per side) of its grid cell: a mosaic of the
    sources (``tissue_mosaic``) where one source is too small, shaped by ``shaped_piece``.
    Returns where the pieces are."""
    import tempfile

    import pyvips

    if not pieces:
        raise ValueError("no tissue pieces to lay out")
    rng = np.random.default_rng(seed)
    columns = max(1, round(math.sqrt(count * width / height)))
    rows = math.ceil(count / columns)
    cell_w, cell_h = width // columns, height // rows
    noise = glass(512, 512, rng)
    canvas = pyvips.Image.new_from_array(noise, interpretation="srgb").replicate(
        math.ceil(width / 512), math.ceil(height / 512)).crop(0, 0, width, height)
    placed = []
    margin = 0.05
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lowmag-fullsize-", dir=target.parent) as scratch:
        for i in range(count):
            r, c = divmod(i, columns)
            room = (int(cell_h * (1 - 2 * margin)), int(cell_w * (1 - 2 * margin)))
            size = (int(room[0] * rng.uniform(*fill)), int(room[1] * rng.uniform(*fill)))
            source = pieces[i % len(pieces)]
            if source.shape[0] < size[0] or source.shape[1] < size[1]:
                source = tissue_mosaic(pieces, rng, *size)
            piece = shaped_piece(source, rng, room)
            ph, pw = piece.shape[:2]
            x = c * cell_w + int(cell_w * margin) + int(rng.integers(0, room[1] - pw + 1))
            y = r * cell_h + int(cell_h * margin) + int(rng.integers(0, room[0] - ph + 1))
            stored = Path(scratch) / f"piece-{i}.v"  # on disk, so memory holds one piece at a time
            pyvips.Image.new_from_array(piece, interpretation="srgb").write_to_file(str(stored))
            canvas = canvas.insert(pyvips.Image.new_from_file(str(stored)), x, y)
            placed.append((x, y, pw, ph))
        partial = target.with_name(target.name + ".part")
        save_pyramid(canvas, partial, mpp, tile=tile, quality=quality, bigtiff=True)
    partial.replace(target)  # a slide interrupted half-way is never left under its name
    return FullSizeLayout(width, height, mpp, tuple(placed))


#: The bench's full-size slides: name -> (width, height, pieces) at the tissue's µm/px
#: (about 0.5: 20 x 15 mm and 30 x 22.5 mm, the sizes issue 15 measured).
BENCH_SLIDES = {
    "fullsize-20x15mm.tif": (40000, 30000, 27),
    "fullsize-30x22mm.tif": (60000, 45000, 68),
}


def bench_slides(folder: str | Path, tissue_slide: str | Path, tiles: str | Path | None = None,
                 tiles_mpp: float = 0.495,
                 progress: Callable[[Path, int, int, int], None] = lambda *_: None) -> list[Path]:
    """The ``BENCH_SLIDES`` in ``folder``, made from the tissue of ``tissue_slide`` (and of the
    labeled ``tiles``' source crops when given); slides already there from the same sources
    are kept (a recipe file beside them says what made them). ``progress(path, width,
    height, pieces)`` is called before each slide is written (each takes a minute or two)."""
    import json

    folder = Path(folder)
    recipe = {"tissue_slide": Path(tissue_slide).name, "tiles": Path(tiles).name if tiles else None,
              "tiles_mpp": tiles_mpp, "slides": {k: list(v) for k, v in BENCH_SLIDES.items()}, "version": 2}
    stamp = folder / "recipe.json"
    paths = [folder / name for name in BENCH_SLIDES]
    if stamp.exists() and json.loads(stamp.read_text()) == recipe and all(p.exists() for p in paths):
        return paths
    if tiles is not None:
        tile_rows(Path(tiles) / "tiles.csv")  # a wrong folder fails now, not after the slide is read
    pieces, mpp = pieces_from_slide(tissue_slide)
    if not pieces:
        raise SlideError(tissue_slide, "holds no tissue the localiser finds, so there is nothing to lay out.",
                         "give a slide of stained tissue (e.g. the CMU-1 region); `lowmag info` shows what it holds.")
    if tiles is not None:
        pieces += pieces_from_tiles(tiles, tiles_mpp, mpp)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for seed, (path, (width, height, count)) in enumerate(zip(paths, BENCH_SLIDES.values())):
        progress(path, width, height, count)
        write_full_size_slide(path, pieces, mpp, width, height, count, seed=seed)
    stamp.write_text(json.dumps(recipe, indent=1) + "\n")
    return paths
