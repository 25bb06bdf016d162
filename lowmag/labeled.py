"""Labeled image folders (one subfolder per class) and the items read from them, torch-free.

Training (``lowmag.train.data``), the export gate and ``edge-classify bench`` all read
labeled images through :func:`scan_image_folder` and :meth:`Item.read`, so a macro F1 from
any of them is computed on the same pixels.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lowmag.errors import LowmagError
from lowmag.reader import Region

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass(frozen=True)
class Item:
    """One image a model is trained or evaluated on: a file (or a level-0 ``region`` of it),
    its label (None when unlabeled) and its group."""

    path: Path
    label: int | None
    group: str
    region: Region | None = None
    scan_mpp: float | None = None  # µm/px of a plain image file; slides carry their own

    def key(self) -> str:
        r = self.region
        where = f"@{r.x},{r.y},{r.width},{r.height}" if r else ""
        return f"{self.path}{where}"

    def read(self, mpp: float) -> "np.ndarray":
        """The item's RGB pixels at ``mpp`` µm/px, resampled from full resolution (the
        paper's protocol, as in training), with the core reader."""
        from lowmag.reader import read_at_mpp
        from lowmag.slide import open_slide

        with open_slide(self.path, assume_mpp=self.scan_mpp) as slide:
            return read_at_mpp(slide, mpp, self.region, exact=True)


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise LowmagError(f"{root}: image folder not found; give a folder with one subfolder per class")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise LowmagError(
            f"{root}: found {len(names)} class subfolder(s); an image folder needs one "
            "subfolder per class (at least two), each holding that class's images"
        )
    return names


def scan_image_folder(
    root: str | Path,
    *,
    scan_mpp: float,
    classes: Sequence[str] | None = None,
    metadata: str | Path | None = None,
    group_by: Sequence[str] = (),
    crop_px: int | None = None,
    require_all_classes: bool = True,
) -> tuple[tuple[str, ...], list[Item]]:
    """Items of a folder laid out one subfolder per class (like Kather 2016).

    ``metadata`` is a CSV with a ``path`` column (relative to ``root``) and the columns in
    ``group_by`` (e.g. ``label, source_image``); without it each file is its own group.
    ``crop_px`` takes a centred square of that many scan pixels from each image.
    ``classes`` (e.g. a checkpoint's) fixes the label order; folders not in it are refused.
    """
    root = Path(root)
    found = _class_folders(root)
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        missing = sorted(set(classes) - set(found))
        if unknown:
            raise LowmagError(
                f"{root}: subfolders {unknown} are not classes of this model "
                f"({', '.join(classes)}); rename or remove them"
            )
        if missing and require_all_classes:
            log.warning("%s: no subfolder for classes %s", root, missing)
    groups = _read_groups(root, metadata, group_by) if metadata else {}
    items: list[Item] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                continue
            rel = path.relative_to(root).as_posix()
            if metadata and rel not in groups:
                raise LowmagError(f"{metadata}: no row for {rel}; every image needs its group")
            region = _centre_crop(path, crop_px) if crop_px else None
            items.append(Item(path, label, groups.get(rel, rel), region, scan_mpp))
    if not items:
        raise LowmagError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    return tuple(classes), items


def _read_groups(root: Path, metadata: str | Path, group_by: Sequence[str]) -> dict[str, str]:
    path = Path(metadata)
    if not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise LowmagError(f"{path}: metadata CSV not found")
    if not group_by:
        raise LowmagError(f"{path}: say which columns define a group (group_by)")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        absent = [c for c in ("path", *group_by) if c not in columns]
        if absent:
            raise LowmagError(f"{path}: missing column(s) {absent}; it has {columns}")
        return {row["path"]: "|".join(row[c] for c in group_by) for row in reader}


def _centre_crop(path: Path, crop_px: int) -> Region:
    import pyvips

    header = pyvips.Image.new_from_file(str(path), revalidate=True)
    if header.width < crop_px or header.height < crop_px:
        raise LowmagError(
            f"{path}: {header.width}x{header.height} px is smaller than the {crop_px} px crop; "
            "lower crop_px or remove the image"
        )
    return Region((header.width - crop_px) // 2, (header.height - crop_px) // 2, crop_px, crop_px)
