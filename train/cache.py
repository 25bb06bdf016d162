"""On-disk cache of items read at one µm/px, so epochs and runs never re-read slides.

Every item is read once with the core reader from the original resolution (``exact=True``:
level 0, box-shrink then Lanczos — the paper's protocol) and stored in one flat
``pixels.bin`` with an ``index.npy`` of (offset, height, width) per item. The folder name
is a hash of everything that determines the pixels (files, regions, µm/px, preprocessing
version), so a changed input makes a new cache instead of silently reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lowmag.errors import LowmagError
from lowmag.labeled import Item
from lowmag.reader import PREPROCESSING_VERSION

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


class PixelCache:
    """Read-only view of a built cache: ``cache[i]`` is an (H, W, 3) uint8 array."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index = np.load(folder / "index.npy")
        self.pixels = np.memmap(folder / "pixels.bin", dtype=np.uint8, mode="r")
        self.manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        offset, height, width = (int(v) for v in self.index[i])
        return np.asarray(self.pixels[offset : offset + height * width * 3]).reshape(height, width, 3)

    @cached_property
    def uniform_shape(self) -> tuple[int, int] | None:
        """(H, W) when every item has the same size (so they can be batched), else None."""
        shapes = {(int(h), int(w)) for _, h, w in self.index}
        return shapes.pop() if len(shapes) == 1 else None

    @property
    def mpp(self) -> float:
        return float(self.manifest["mpp"])


class ConcatCache:
    """Several caches read as one (labeled then unlabeled images, for distillation)."""

    def __init__(self, parts: Sequence[PixelCache]) -> None:
        self.parts = list(parts)
        self.index = np.concatenate([p.index for p in self.parts]) if self.parts else np.zeros((0, 3), np.int64)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]

    @property
    def uniform_shape(self) -> tuple[int, int] | None:
        shapes = {p.uniform_shape for p in self.parts}
        return shapes.pop() if len(shapes) == 1 else None


def cache_key(items: Sequence[Item], mpp: float) -> str:
    digest = hashlib.sha256()
    digest.update(f"{PREPROCESSING_VERSION}|{mpp:.6g}".encode())
    for item in items:
        stat = item.path.stat() if item.path.is_file() else None
        size = f"{stat.st_size}:{int(stat.st_mtime)}" if stat else "dir"
        digest.update(f"|{item.key()}|{item.scan_mpp}|{size}".encode())
    return digest.hexdigest()[:20]


def build_cache(
    items: Sequence[Item], mpp: float, cache_dir: str | Path, *, progress: Progress | None = None
) -> PixelCache:
    """The cache of ``items`` at ``mpp`` µm/px, reading the items only if it does not exist yet."""
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"{mpp:.4g}um-{cache_key(items, mpp)}"
    if (folder / "manifest.json").is_file():
        if progress:
            progress(len(items))
        return PixelCache(folder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        index = np.zeros((len(items), 3), dtype=np.int64)
        offset = 0
        with open(staging / "pixels.bin", "wb") as out:
            for i, item in enumerate(items):
                rgb = item.read(mpp)
                out.write(np.ascontiguousarray(rgb).tobytes())
                index[i] = (offset, rgb.shape[0], rgb.shape[1])
                offset += rgb.size
                if progress:
                    progress(1)
        np.save(staging / "index.npy", index)
        manifest = {
            "mpp": mpp,
            "preprocessing_version": PREPROCESSING_VERSION,
            "items": [item.key() for item in items],
        }
        (staging / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished the same cache first
            if not (folder / "manifest.json").is_file():
                raise
    except LowmagError:
        raise
    except OSError as error:
        raise LowmagError(f"{cache_dir}: could not write the pixel cache ({error}); check space and permissions") from error
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return PixelCache(folder)


def build_cache_with_progress(items: Sequence[Item], mpp: float, cache_dir: str | Path, description: str) -> PixelCache:
    """``build_cache`` with a progress bar (instant when the cache already exists)."""
    from tqdm import tqdm

    with tqdm(total=len(items), desc=description, unit="image", leave=False) as bar:
        return build_cache(items, mpp, cache_dir, progress=bar.update)


def channel_stats(cache: PixelCache, limit: int = 2000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0-1 scale) over the cached pixels, for the spec."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    step = max(1, len(cache) // limit)
    for i in range(0, len(cache), step):
        pixels = cache[i].reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return tuple(round(float(v), 5) for v in mean), tuple(round(float(v), 5) for v in std)
