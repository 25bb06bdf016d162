"""Calibration sets: real tissue at the model's µm/px, for INT8 ranges and parity checks.

INT8 quantization estimates each activation's range from the images it is shown, so those
images must look like what the deployed model sees: tissue (not glass), at the model's
µm/px, read by the one core reader (``lowmag.reader.read_at_mpp``), and drawn from many
slides rather than one. ``sample_calibration_set`` does that:

- Plain images small enough to be a model input (both sides at most ``patch_px`` at the
  target µm/px, e.g. 150 px Kather tiles) are read whole, exactly as a tile is classified.
  Near-blank ones (tissue below ``IMAGE_MIN_TISSUE``) are skipped.
- Slides and larger images are cut into ``patch_px`` squares on a grid over the tissue
  boxes of ``lowmag.tissue.locate_tissue``; a window counts when at least
  ``WINDOW_MIN_TISSUE`` of it is tissue.
- Sources take turns (round-robin, in an order shuffled by the seed), one accepted image
  per turn, so one big slide cannot dominate; each source's windows are visited in a
  seeded random order. The same arguments always give the same set.

The set is cached on disk under a key that hashes the source files (path, size, mtime),
the arguments and ``PREPROCESSING_VERSION``; ``manifest.json`` is written last and
atomically, so a half-written cache is never used.
"""

from __future__ import annotations

import contextlib
from collections import Counter
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lowmag.errors import CalibrationError, MissingMppError, SlideError
from lowmag.io import atomic_open, atomic_write_text, user_cache_dir
from lowmag.reader import PREPROCESSING_VERSION, Region, output_size, read_at_mpp
from lowmag.slide import PlainImageSlide, Slide, open_slide
from lowmag.tissue import TissueParams, locate_tissue, tissue_mask

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
#: A window cut from a slide counts when at least this fraction of it is tissue.
WINDOW_MIN_TISSUE = 0.5
#: A small image used whole counts above this: curated tiles include sparse classes
#: (fat, debris) that the model must see, so only near-blank ones (glass) are dropped.
IMAGE_MIN_TISSUE = 0.1
#: Below this many images, INT8 activation ranges are noticeably unstable.
MIN_RELIABLE_IMAGES = 300
#: Files a folder walk picks up: OpenSlide formats and plain images.
SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}  # always plain images: need image_mpp


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration and held-out images (uint8 RGB at the target µm/px) and what they are."""

    images: list[np.ndarray]
    holdout: list[np.ndarray]
    manifest: dict
    directory: Path


@dataclass
class _Source:
    """One slide, DICOM series folder or image; ``files`` are what the cache key hashes."""

    path: Path
    files: list[Path]
    kind: str
    slide: Slide | None = None
    windows: list[Region | None] = field(default_factory=list)
    opened: bool = False
    accepted: int = 0
    skipped_reason: str | None = None
    missing_mpp: bool = False


def default_cache_dir() -> Path:
    return user_cache_dir("calibration")


def sample_calibration_set(
    sources: Sequence[str | Path],
    target_mpp: float,
    *,
    size: int = 500,
    holdout: int = 0,
    patch_px: int = 224,
    image_mpp: float | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> CalibrationSet:
    """Draw (or load from cache) ``size`` calibration and ``holdout`` held-out images.

    ``sources`` are slide files, DICOM series folders, or folders searched recursively for
    slides and images. Files that cannot be opened or read are skipped with a warning; a
    source path that does not exist, plain images without ``image_mpp``, or no usable
    image at all raise ``CalibrationError``. Fewer than ``MIN_RELIABLE_IMAGES`` calibration
    images only log a warning.
    """
    target_mpp = float(target_mpp)
    if not (math.isfinite(target_mpp) and target_mpp > 0):
        raise CalibrationError(f"target µm/px must be a positive number, got {target_mpp!r}")
    if size < 0 or holdout < 0 or size + holdout < 1 or patch_px < 1:
        raise CalibrationError(
            f"need size >= 0, holdout >= 0, at least one image and patch_px >= 1 "
            f"(got {size}, {holdout}, {patch_px})"
        )
    found = _discover(sources, image_mpp)
    key = _cache_key(found, target_mpp, size, holdout, patch_px, image_mpp, seed)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / key[:16]
    cached = _load(folder, key)
    if cached is not None:
        logger.info("calibration set loaded from %s", folder)
        _warn_if_few(cached.manifest)
        return cached

    params = dict(target_mpp=target_mpp, patch_px=patch_px, image_mpp=image_mpp, seed=seed)
    drawn = _draw(found, size + holdout, progress=progress, **params)
    if not drawn:
        hint = ""
        if any(s.missing_mpp for s in found):
            hint = (" Plain images (PNG, JPEG, untiled TIFF) need their µm/px: export-student "
                    "--calibration-mpp X (image_mpp in Python).")
        raise CalibrationError(
            f"no usable calibration image in {', '.join(str(s) for s in sources)} "
            f"({len(found)} slide(s)/image(s) found): none holds enough tissue "
            f"(>= {WINDOW_MIN_TISSUE:.0%} of a {patch_px} px window at {target_mpp:g} µm/px, "
            f">= {IMAGE_MIN_TISSUE:.0%} of a small image) or none could be read (see the warnings).{hint} Fix: give folders of H&E "
            "slides or tiles with tissue, readable by `lowmag info`."
        )
    roles = _assign_roles(len(drawn), size, holdout, seed)
    manifest = _manifest(key, found, drawn, roles, size, holdout, **params)
    images = [d[2] for d, r in zip(drawn, roles) if r == "calibration"]
    held = [d[2] for d, r in zip(drawn, roles) if r == "holdout"]
    _save(folder, manifest, images, held)
    _warn_if_few(manifest)
    return CalibrationSet(images, held, manifest, folder)


def _discover(sources: Sequence[str | Path], image_mpp: float | None) -> list[_Source]:
    """The slides and images named by ``sources``, in a stable order, without opening them."""
    found: list[_Source] = []
    for source in sources:
        path = Path(source).absolute()  # manifests must not depend on the working folder
        if not path.exists():
            raise CalibrationError(f"{path}: calibration source not found. Fix: check the path.")
        found.extend(_walk(path) if path.is_dir() else [_Source(path, [path], _guess_kind(path))])
    unique: dict[Path, _Source] = {}
    for s in found:
        unique.setdefault(s.path.resolve(), s)
    found = list(unique.values())
    plain = [s.path for s in found if s.path.suffix.lower() in IMAGE_SUFFIXES]
    if plain and image_mpp is None:
        raise CalibrationError(
            f"{plain[0]}: a plain image ({len(plain)} in the sources) carries no trustworthy "
            "µm/px. Fix: pass their µm/px (export-student --calibration-mpp, image_mpp in Python), e.g. 0.495 for the Kather 2016 tiles."
        )
    return found


def _walk(folder: Path) -> list[_Source]:
    """Files of a folder tree; a folder holding only .dcm files is one DICOM series."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    if files and all(p.suffix.lower() == ".dcm" for p in files):
        out = [_Source(folder, files, "slide")]
    else:
        wanted = SLIDE_SUFFIXES | IMAGE_SUFFIXES
        out = [_Source(p, [p], _guess_kind(p)) for p in files if p.suffix.lower() in wanted]
    for sub in entries:
        if sub.is_dir():
            out.extend(_walk(sub))
    return out


def _guess_kind(path: Path) -> str:
    """'image' or 'slide' by suffix; a TIFF's kind is settled when it is opened."""
    return "image" if path.suffix.lower() in IMAGE_SUFFIXES else "slide"


def _cache_key(found: list[_Source], target_mpp: float, size: int, holdout: int,
               patch_px: int, image_mpp: float | None, seed: int) -> str:
    files = []
    for s in found:
        for f in s.files:
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    recipe = dict(
        version=MANIFEST_VERSION, files=files, target_mpp=target_mpp, size=size, holdout=holdout,
        patch_px=patch_px, image_mpp=image_mpp, seed=seed, preprocessing=PREPROCESSING_VERSION,
        thresholds=[WINDOW_MIN_TISSUE, IMAGE_MIN_TISSUE],
    )
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _draw(found: list[_Source], wanted: int, *, target_mpp: float, patch_px: int,
          image_mpp: float | None, seed: int, progress: bool) -> list[tuple[int, Region, np.ndarray, float]]:
    """Accepted (source index, level-0 region, pixels, tissue fraction), round-robin."""
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(found))]
    drawn: list[tuple[int, Region, np.ndarray, float]] = []
    bar = _progress_bar(wanted) if progress else contextlib.nullcontext()
    try:
        with bar as update:
            while order and len(drawn) < wanted:
                still = []
                for i in order:
                    if len(drawn) >= wanted:
                        break
                    item = _next_image(found[i], i, target_mpp, patch_px, image_mpp, seed)
                    if item is not None:
                        drawn.append(item)
                        still.append(i)
                        if update is not None:
                            update(1)
                order = still
    finally:
        for s in found:
            _close(s)
    for s in found:
        if not s.opened:
            s.skipped_reason = "not needed: enough images were drawn before its turn"
    return drawn


def _next_image(s: _Source, index: int, target_mpp: float, patch_px: int, image_mpp: float | None,
                seed: int) -> tuple[int, Region, np.ndarray, float] | None:
    """The source's next window (or whole image) with enough tissue; None when exhausted."""
    if not s.opened:
        s.opened = True
        try:
            s.slide = _open(s, image_mpp)
            rng = np.random.default_rng([seed, index])
            s.windows = _candidates(s.slide, s.kind, target_mpp, patch_px, rng)
        except SlideError as error:
            _skip(s, error)
            return None
    while s.windows and s.slide is not None:
        region = s.windows.pop()
        try:
            rgb = read_at_mpp(s.slide, target_mpp, region)
        except SlideError as error:
            _skip(s, error)
            return None
        fraction = _tissue_fraction(rgb, target_mpp)
        if fraction >= (IMAGE_MIN_TISSUE if region is None else WINDOW_MIN_TISSUE):
            s.accepted += 1
            info = s.slide.info
            return index, region or Region(0, 0, info.width, info.height), rgb, fraction
    if s.accepted == 0 and s.skipped_reason is None:
        s.skipped_reason = "no tissue: no window or image held enough tissue"
    _close(s)
    return None


def _tissue_fraction(rgb: np.ndarray, mpp: float) -> float:
    """Fraction of tissue, judged as ``locate_tissue`` does: at no finer than its minimum
    analysis µm/px (2 µm/px), where the mask's morphology is cheap (at 0.5 µm/px its
    24 µm closing costs ~0.3 s per 224 px window; box-averaged first, ~0.01 s)."""
    k = min(int(TissueParams().min_mpp // mpp), rgb.shape[0], rgb.shape[1])
    if k > 1:
        h, w = rgb.shape[0] // k, rgb.shape[1] // k
        rgb = rgb[: h * k, : w * k].reshape(h, k, w, k, 3).mean(axis=(1, 3)).astype(np.uint8)
        mpp *= k
    return float(tissue_mask(rgb, mpp).mean())


def _open(s: _Source, image_mpp: float | None) -> Slide:
    """Open a source; image_mpp applies to plain images only, never to slide pyramids."""
    if s.kind == "image":
        return open_slide(s.path, assume_mpp=image_mpp)
    try:
        return open_slide(s.path)
    except MissingMppError:
        if image_mpp is None:
            raise
        slide = open_slide(s.path, assume_mpp=image_mpp)
        if not isinstance(slide, PlainImageSlide):
            slide.close()
            raise
        s.kind = "image"
        return slide


def _candidates(slide: Slide, kind: str, target_mpp: float, patch_px: int,
                rng: np.random.Generator) -> list[Region | None]:
    """Regions to try, in the order they are tried (popped from the end); None = whole image."""
    if kind == "image" and max(output_size(slide, target_mpp)) <= patch_px:
        return [None]
    info = slide.info
    w0 = _level0_side(patch_px, target_mpp, info.mpp_x)
    h0 = _level0_side(patch_px, target_mpp, info.mpp_y)
    if w0 is None or h0 is None:
        raise SlideError(info.path, f"scanned at {info.mpp:.3g} µm/px, too coarse for {patch_px} px "
                         f"windows at {target_mpp:g} µm/px (they would be upsampled).")
    # One grid over the whole slide (centred), so windows never overlap across boxes.
    xs = _grid(info.width, w0)
    ys = _grid(info.height, h0)
    cells: set[tuple[int, int]] = set()
    for box in locate_tissue(slide):
        cols = [c for c, x in enumerate(xs) if x < box.x + box.width and x + w0 > box.x]
        rows = [r for r, y in enumerate(ys) if y < box.y + box.height and y + h0 > box.y]
        cells.update((r, c) for r in rows for c in cols)
    regions: list[Region | None] = [Region(xs[c], ys[r], w0, h0) for r, c in sorted(cells)]
    rng.shuffle(regions)  # type: ignore[arg-type]
    return regions


def _level0_side(patch_px: int, target_mpp: float, mpp: float) -> int | None:
    """Level-0 pixels that the reader turns into exactly ``patch_px`` target pixels."""
    guess = int(round(patch_px * target_mpp / mpp))
    for side in (guess, guess - 1, guess + 1):
        if side > 0 and max(1, int(round(side * mpp / target_mpp))) == patch_px:
            return side
    return None


def _grid(length: int, step: int) -> list[int]:
    """Window origins along one axis; one centred (padded) window if the axis is shorter."""
    n = length // step
    if n == 0:
        return [(length - step) // 2]
    start = (length - n * step) // 2
    return [start + i * step for i in range(n)]


def _skip(s: _Source, error: SlideError) -> None:
    # The message names the file; its fix speaks of `lowmag`'s --assume-mpp, which is
    # --calibration-mpp on export-student (plain images only; slides carry their own).
    logger.warning("skipping for calibration: %s", error)
    s.skipped_reason = error.reason
    s.missing_mpp = isinstance(error, MissingMppError)
    _close(s)


def _close(s: _Source) -> None:
    if s.slide is not None:
        s.slide.close()
        s.slide = None
    s.windows = []


def _assign_roles(n: int, size: int, holdout: int, seed: int) -> list[str]:
    """Pick the held-out images at random among those drawn (so every source can supply
    some); when fewer than asked were drawn, both roles shrink in proportion (keeping at
    least one held-out image if any was asked for and at least one calibration image)."""
    if size == 0:
        return ["holdout"] * n
    n_hold = holdout if n >= size + holdout else (n * holdout) // (size + holdout)
    n_hold = min(max(n_hold, 1 if holdout else 0), n - 1)
    picks = set(np.random.default_rng([seed, 1]).choice(n, size=n_hold, replace=False).tolist())
    return ["holdout" if i in picks else "calibration" for i in range(n)]


def _manifest(key: str, found: list[_Source], drawn: list, roles: list[str], size: int, holdout: int,
              *, target_mpp: float, patch_px: int, image_mpp: float | None, seed: int) -> dict:
    items = [
        {"source": str(found[i].path), "region": [r.x, r.y, r.width, r.height],
         "shape": list(rgb.shape[:2]), "tissue_fraction": round(fraction, 4), "role": role}
        for role_wanted in ("calibration", "holdout")
        for (i, r, rgb, fraction), role in zip(drawn, roles) if role == role_wanted
    ]
    per_source = Counter((i, role) for (i, *_), role in zip(drawn, roles))
    sources = []
    for i, s in enumerate(found):
        entry = {"path": str(s.path), "kind": s.kind, "n_calibration": per_source[i, "calibration"],
                 "n_holdout": per_source[i, "holdout"]}
        if s.skipped_reason:
            entry["skipped_reason"] = s.skipped_reason
        sources.append(entry)
    return {
        "version": MANIFEST_VERSION, "key": key,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target_mpp": target_mpp, "patch_px": patch_px, "image_mpp": image_mpp, "seed": seed,
        "preprocessing_version": PREPROCESSING_VERSION,
        "requested": {"size": size, "holdout": holdout},
        "counts": {"calibration": roles.count("calibration"), "holdout": roles.count("holdout")},
        "sources": sources, "items": items,
    }


def _save(folder: Path, manifest: dict, images: list[np.ndarray], held: list[np.ndarray]) -> None:
    """Pixels first, then the manifest (atomically): no manifest means no usable cache."""
    arrays = {f"calibration_{i:05d}": a for i, a in enumerate(images)}
    arrays.update({f"holdout_{i:05d}": a for i, a in enumerate(held)})
    with atomic_open(folder / "images.npz", "wb") as handle:
        np.savez(handle, **arrays)
    manifest["files"] = [{"name": "images.npz", "bytes": (folder / "images.npz").stat().st_size}]
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def _load(folder: Path, key: str) -> CalibrationSet | None:
    """The cached set, or None when it is absent, incomplete or not this key's."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("key") != key or manifest.get("version") != MANIFEST_VERSION:
            return None
        for entry in manifest["files"]:
            if (folder / entry["name"]).stat().st_size != entry["bytes"]:
                return None
        counts = manifest["counts"]
        with np.load(folder / "images.npz") as data:
            images = [data[f"calibration_{i:05d}"] for i in range(counts["calibration"])]
            held = [data[f"holdout_{i:05d}"] for i in range(counts["holdout"])]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("%s: calibration cache unusable (%s); rebuilding it", folder, error)
        return None
    return CalibrationSet(images, held, manifest, folder)


def _warn_if_few(manifest: dict) -> None:
    counts, requested = manifest["counts"], manifest["requested"]
    if counts["holdout"] < requested["holdout"]:
        logger.warning("only %d of the %d held-out images asked for could be drawn",
                       counts["holdout"], requested["holdout"])
    n = counts["calibration"]
    if n >= MIN_RELIABLE_IMAGES or requested["size"] == 0:  # size 0: parity images only
        return
    asked = requested["size"]
    why = (f"only {asked} were asked for" if n >= asked
           else f"{asked} were asked for but the sources hold no more tissue windows")
    logger.warning(
        "calibration set has %d images (%s): INT8 activation ranges estimated from fewer than %d "
        "images are unreliable and can cost accuracy; give more slides or tiles, or a larger size.",
        n, why, MIN_RELIABLE_IMAGES,
    )


@contextlib.contextmanager
def _progress_bar(total: int):
    import click

    with click.progressbar(length=total, label="calibration images", file=sys.stderr) as bar:
        yield bar.update
