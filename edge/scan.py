"""What counts as a slide in a scanner's output folder, and when it is complete.

A *slide unit* is what one slide occupies on disk:

- a single file (``.svs``, ``.tif``, ``.ndpi``...);
- MIRAX: ``NAME.mrxs`` plus its ``NAME/`` folder of ``.dat`` files;
- DICOM WSI: a folder holding the ``.dcm`` instances of one series (a ``.dcm`` lying
  directly in the watched folder is taken as a slide of its own).

Names a scanner or a copy tool uses while writing are never slides: dot-files and
dot-folders, ``~`` backups, ``.tmp``, ``.part``, ``.filepart``, ``.crdownload``,
``.partial``. Symlinked files are followed only when they resolve inside the watched
folder; symlinked folders are never walked (a slide must not be found twice, nor a
loop followed). Nothing is ever executed or imported from the folder. A unit is complete when its *signature*
(the size and mtime of every file in it) has not changed for a settle time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

logger = logging.getLogger(__name__)

#: File suffixes that are slides by themselves (OpenSlide formats and generic TIFF).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".svslide", ".bif", ".qptiff", ".mrxs"}
)
DICOM_SUFFIX = ".dcm"
TEMPORARY_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".filepart", ".crdownload", ".download", ".swp")

#: A file's (relative name, size, mtime_ns); a unit's signature is a sorted tuple of these.
Signature = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class SlideUnit:
    """One slide on disk: ``path`` is what ``open_slide`` takes; ``kind`` says its layout."""

    path: Path
    kind: str  # "file", "mrxs", "dicom-folder"
    root: Path

    @property
    def relative(self) -> str:
        """The unit's path relative to the folder it was found in (names its outputs)."""
        try:
            return self.path.relative_to(self.root).as_posix()
        except ValueError:
            return self.path.name

    def files(self) -> list[Path]:
        """Every file that belongs to the slide (for signatures, hashes and quarantine)."""
        if self.kind == "file":
            return [self.path]
        if self.kind == "mrxs":
            folder = self.path.with_suffix("")
            extra = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
            return [self.path, *extra]
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() == DICOM_SUFFIX)

    def signature(self) -> Signature | None:
        """Sizes and mtimes of its files; None while it has none (e.g. mid-rename)."""
        entries = []
        try:
            files = self.files()
        except (FileNotFoundError, NotADirectoryError):
            return None  # its folder went away (moved to the quarantine, renamed)
        for path in files:
            try:
                stat = path.stat()
            except FileNotFoundError:
                return None
            entries.append((path.relative_to(self.path.parent).as_posix(), stat.st_size, stat.st_mtime_ns))
        return tuple(sorted(entries)) or None


def is_temporary(name: str) -> bool:
    """Names written while copying or scanning, never slides (case-insensitive)."""
    lower = name.lower()
    return lower.startswith(".") or lower.endswith("~") or lower.endswith(TEMPORARY_SUFFIXES)


def size_of(signature: Signature) -> int:
    return sum(size for _, size, _ in signature)


def mtime_of(signature: Signature) -> int:
    return max(mtime for _, _, mtime in signature)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def find_units(root: Path, exclude: Iterable[Path] = (), under: Path | None = None) -> Iterator[SlideUnit]:
    """Every slide unit under ``root`` (recursively, or only below its subfolder ``under``).

    ``exclude`` folders (the output folder when it sits inside the scan folder) are skipped.
    """
    root = Path(root)
    excluded = {Path(p).resolve() for p in exclude}
    start = Path(under) if under is not None else root
    if start != root and (not _inside(start, root) or any(is_temporary(p) for p in start.relative_to(root).parts)):
        return
    if any(folder.resolve() in excluded for folder in [start, *start.parents] if _inside(folder, root)):
        return  # e.g. a subfolder of the quarantine, created when a slide is moved there
    yield from _walk(start, root, excluded)


def _walk(folder: Path, root: Path, excluded: set[Path]) -> Iterator[SlideUnit]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        logger.warning("cannot list %s (%s); it is skipped this time", folder, error)
        return
    names = {e.name for e in entries}
    has_dicom = False
    for entry in entries:
        if is_temporary(entry.name):
            continue
        path = Path(entry.path)
        if entry.is_symlink() and not _inside(path, root):
            logger.warning("%s is a symlink out of the watched folder; it is not followed", path)
            continue
        if entry.is_dir(follow_symlinks=False):
            if path.resolve() in excluded:
                continue
            if (entry.name + ".mrxs") in names:
                continue  # a MIRAX data folder, part of the .mrxs beside it
            yield from _walk(path, root, excluded)
            continue
        suffix = Path(entry.name).suffix.lower()
        if suffix == DICOM_SUFFIX:
            if folder == root:
                yield SlideUnit(path, "file", root)
            else:
                has_dicom = True
        elif suffix in SLIDE_SUFFIXES and entry.is_file():
            yield SlideUnit(path, "mrxs" if suffix == ".mrxs" else "file", root)
    if has_dicom:
        yield SlideUnit(folder, "dicom-folder", root)


def unit_for(path: Path, root: Path, exclude: Iterable[Path] = ()) -> SlideUnit | None:
    """The slide unit a changed file belongs to (None when it belongs to none)."""
    path = Path(path)
    root = Path(root)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return None
    if not parts or any(is_temporary(part) for part in parts):
        return None
    excluded = {Path(p).resolve() for p in exclude}
    if any(parent.resolve() in excluded for parent in [path, *path.parents] if _inside(parent, root)):
        return None
    # A file inside a MIRAX data folder belongs to the .mrxs beside that folder.
    for parent in path.parents:
        if parent == root:
            break
        mrxs = parent.with_name(parent.name + ".mrxs")
        if mrxs.is_file():
            return SlideUnit(mrxs, "mrxs", root)
    if not _inside(path, root):  # a symlink, or a folder on its path, leads out of the watched folder
        return None
    suffix = path.suffix.lower()
    if suffix == DICOM_SUFFIX:
        return SlideUnit(path, "file", root) if path.parent == root else SlideUnit(path.parent, "dicom-folder", root)
    if suffix in SLIDE_SUFFIXES:
        return SlideUnit(path, "mrxs" if suffix == ".mrxs" else "file", root)
    return None
