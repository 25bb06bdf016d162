"""Training data: what the items are, how they are split, and where they come from.

An :class:`Item` is one image the models see: a whole image file, a centre crop of one, or
a tissue piece of a slide. Every item carries a *group* (tiles cut from one source crop,
pieces of one slide) so that splits never put correlated images on both sides.
Pixels are produced by the core reader (``lowmag.reader.read_at_mpp``) and cached on disk
by :mod:`lowmag.train.cache`; this module is torch-free.
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from lowmag.errors import LowmagError
from lowmag.reader import Region

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass(frozen=True)
class Item:
    """One training image: a file (or a level-0 ``region`` of it), its label and group."""

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


def scan_slide_list(
    csv_path: str | Path, *, classes: Sequence[str] | None = None, assume_mpp: float | None = None
) -> tuple[tuple[str, ...], dict[str, list[Item]]]:
    """Tissue pieces of the slides listed in a CSV with columns ``slide,label,split``.

    ``label`` may be empty for unlabeled (auxiliary) slides. Each tissue piece found by
    ``lowmag.tissue.locate_tissue`` is one item; a slide is one group. Returns the classes
    and the items per split name.
    """
    from lowmag.slide import open_slide
    from lowmag.tissue import locate_tissue

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LowmagError(f"{csv_path}: slide list not found")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        absent = [c for c in ("slide", "label", "split") if c not in (reader.fieldnames or [])]
        if absent:
            raise LowmagError(f"{csv_path}: missing column(s) {absent}; expected slide,label,split")
        rows = list(reader)
    names = sorted({r["label"] for r in rows if r["label"]}) if classes is None else list(classes)
    index = {name: i for i, name in enumerate(names)}
    splits: dict[str, list[Item]] = defaultdict(list)
    for row in rows:
        slide_path = Path(row["slide"])
        if not slide_path.is_absolute():
            slide_path = csv_path.parent / slide_path
        if row["label"] and row["label"] not in index:
            raise LowmagError(f"{csv_path}: label {row['label']!r} of {slide_path} is not one of {names}")
        label = index[row["label"]] if row["label"] else None
        with open_slide(slide_path, assume_mpp=assume_mpp) as slide:
            boxes = locate_tissue(slide)
        if not boxes:
            log.warning("%s: no tissue found; the slide is skipped", slide_path)
        for box in boxes:
            splits[row["split"]].append(Item(slide_path, label, str(slide_path), box.region, assume_mpp))
    return tuple(names), dict(splits)


def split_by_group(
    items: Sequence[Item], fractions: Mapping[str, float], seed: int
) -> dict[str, list[Item]]:
    """Split items into named parts by group, stratified by label, never splitting a group.

    Within each class the groups are shuffled (seeded) and dealt so that every part gets at
    least one group when the class has enough of them (parts in the order given), then each
    further group goes to the part furthest below its share of that class's items.
    """
    if not fractions or any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise LowmagError(f"split fractions must be non-negative and not all zero, got {dict(fractions)}")
    total = sum(fractions.values())
    shares = {name: f / total for name, f in fractions.items()}
    by_group: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_group[item.group].append(item)
    by_label: dict[int | None, list[str]] = defaultdict(list)
    for group, members in sorted(by_group.items()):
        label = Counter(m.label for m in members).most_common(1)[0][0]
        by_label[label].append(group)
    rng = random.Random(seed)
    parts: dict[str, list[Item]] = {name: [] for name in fractions}
    for label in sorted(by_label, key=lambda v: (v is None, v)):
        groups = by_label[label]
        rng.shuffle(groups)
        class_total = sum(len(by_group[g]) for g in groups)
        counts = {name: 0 for name in fractions}
        wanted = [name for name in fractions if shares[name] > 0]
        for i, group in enumerate(groups):
            if i < len(wanted):
                part = wanted[i]
            else:
                part = max(wanted, key=lambda n: shares[n] * class_total - counts[n])
            counts[part] += len(by_group[group])
            parts[part].extend(by_group[group])
    return parts


def describe(items: Iterable[Item], classes: Sequence[str]) -> dict[str, object]:
    """Counts per class and number of groups, for logs and provenance."""
    items = list(items)
    per_class = Counter(classes[i.label] if i.label is not None else "(unlabeled)" for i in items)
    return {"items": len(items), "groups": len({i.group for i in items}), "per_class": dict(sorted(per_class.items()))}
