"""Training data: what the items are, how they are split, and where they come from.

An :class:`~lowmag.labeled.Item` is one image the models see: a whole image file, a centre
crop of one (class folders: :mod:`lowmag.labeled`), or a tissue piece of a slide. Every
item carries a *group* (tiles cut from one source crop, pieces of one slide) so that splits
never put correlated images on both sides.
Pixels are produced by the core reader (``lowmag.reader.read_at_mpp``) and cached on disk
by :mod:`lowmag.train.cache`; this module is torch-free.
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from lowmag.errors import LowmagError
from lowmag.labeled import Item

log = logging.getLogger(__name__)


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
