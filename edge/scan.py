"""What counts as a slide in a scanner's output folder, and when it is complete.

A *slide unit* is what one slide occupies on disk:

- a single file (``.svs``, ``.tif``, ``.ndpi``...);
- MIRAX: ``NAME.mrxs`` plus its ``NAME/`` folder of ``.dat`` files;
- DICOM WSI: a folder holding the instances of one series, ``.dcm`` files or files with
  no extension that are DICOM (``DICM`` at byte 128); one lying directly in the watched
  folder is taken as a slide of its own.

Every other entry is *skipped*, and says why (``SlideUnit.skip_reason``): the watcher
records it once, so a watched folder never swallows a file silently. Exceptions, by
design: names a scanner or a copy tool uses while writing (dot-files and dot-folders,
``~`` backups, ``.tmp``, ``.part``, ``.filepart``, ``.crdownload``, ``.partial``) and the
output and quarantine folders.

Links: a folder that is a symbolic link is never walked (a slide must not be found twice,
nor a loop followed); it is skipped with that reason. A file that is a link is looked at
through its target only when the target lies inside the watched folder (``check_files``,
which the runner calls again right before reading). A link out is a unit like any other
and is refused by the runner once, with its reason. Nothing is ever executed or imported
from the folder.

A unit is complete when its *signature* has not changed for a settle time: per file its
name, size, mtime, inode and ctime (``lstat``, or the target's ``stat`` for a link inside).
The ctime changes with every write, even one that restores the old mtime, and cannot be
set by any tool, so a rewrite with the same size and mtime is still noticed.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from lowmag.errors import UnsupportedSlideError
from lowmag.names import printable, shown

logger = logging.getLogger(__name__)

#: File suffixes that are slides by themselves (OpenSlide formats and generic TIFF).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".svslide", ".bif", ".qptiff", ".mrxs"}
)
DICOM_SUFFIX = ".dcm"
#: Names that may be DICOM instances without saying so; their first bytes decide.
_MAYBE_DICOM_SUFFIXES = ("", ".dicom", ".dic")


def _maybe_dicom(name: str) -> bool:
    """No extension, .dicom/.dic, or a UID as the name (``1.2.840.10008.99``)."""
    suffix = _suffix(name)
    return suffix in _MAYBE_DICOM_SUFFIXES or suffix[1:].isdigit()
TEMPORARY_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".filepart", ".crdownload", ".download", ".swp")

#: Formats a lab may drop in the folder that OpenSlide cannot read, with the fix.
_KNOWN_UNREADABLE = {
    ".vsi": "an Olympus/Evident VSI slide, which OpenSlide cannot read. Fix: export it from the scanner "
            "software as OME-TIFF or pyramidal TIFF into the watched folder.",
    ".czi": "a Zeiss CZI slide, which OpenSlide cannot read. Fix: export it from ZEN as pyramidal TIFF.",
    ".isyntax": "a Philips iSyntax slide, which OpenSlide cannot read. Fix: export it as pyramidal TIFF "
                "or DICOM WSI.",
    ".ome.zarr": "an OME-Zarr image, which OpenSlide cannot read. Fix: convert it to pyramidal TIFF.",
}

#: One file's (name relative to the unit's folder, size, mtime_ns, inode, ctime_ns).
FileStat = tuple[str, int, int, int, int]
#: A unit's signature: its files' FileStats, sorted.
Signature = tuple[FileStat, ...]


@dataclass(frozen=True)
class SlideUnit:
    """One slide (or one skipped entry) on disk.

    ``path`` is ``root / relative`` and is what ``open_slide`` takes; ``root`` is the
    watched folder, resolved; ``kind`` is ``file``, ``mrxs``, ``dicom-folder`` or
    ``skipped``; ``reason`` says why a skipped entry is no slide (when it is cheap to
    know at scan time, else ``skip_reason`` finds it).
    """

    path: Path
    kind: str
    root: Path
    reason: str = field(default="", compare=False)

    @property
    def relative(self) -> str:
        """The unit's path relative to the folder it was found in (names its outputs)."""
        try:
            return self.path.relative_to(self.root).as_posix()
        except ValueError:
            return self.path.name

    @property
    def skipped(self) -> bool:
        return self.kind == "skipped"

    def files(self) -> list[Path]:
        """Every file that belongs to the slide (for signatures, hashes and quarantine).

        Links are listed, not followed (``check_files`` decides what they may lead to).
        """
        if self.kind in ("file", "skipped"):
            return [self.path]
        if self.kind == "mrxs":
            folder = self.path.with_suffix("")
            extra = []
            for top, dirs, names in os.walk(folder):  # never into linked folders
                dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(top, d)))
                extra.extend(Path(top) / n for n in sorted(names))
            return [self.path, *extra]
        with os.scandir(self.path) as entries:
            return sorted(Path(e.path) for e in entries if _is_dicom_entry(e))

    def signature(self) -> Signature | None:
        """Name, size, mtime, inode and ctime of each file; None while it has none (mid-rename)."""
        entries = []
        try:
            files = self.files()
        except (FileNotFoundError, NotADirectoryError):
            return None  # its folder went away (moved to the quarantine, renamed)
        base = self.path.parent
        for path in files:
            try:
                info = _look(path, self.root)
            except FileNotFoundError:
                return None
            except OSError:
                if self.skipped:  # an entry that cannot even be stat-ed is recorded as it is
                    return ((path.name, -1, -1, -1, -1),)
                raise
            entries.append((path.relative_to(base).as_posix(), info.st_size, info.st_mtime_ns, info.st_ino,
                            info.st_ctime_ns))
        return tuple(sorted(entries)) or None

    def skip_reason(self) -> str:
        """Why this entry is not a slide (reads its first bytes when the name does not say)."""
        return self.reason or _sniffed_reason(self.path)


def _look(path: Path, root: Path) -> os.stat_result:
    """``lstat``, or the target's ``stat`` for a link that stays inside ``root``."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) and _inside(path, root):
        try:
            return os.stat(path)
        except OSError:
            return info
    return info


def is_temporary(name: str) -> bool:
    """Names written while copying or scanning, never slides (case-insensitive)."""
    lower = name.lower()
    return lower.startswith(".") or lower.endswith("~") or lower.endswith(TEMPORARY_SUFFIXES)


def size_of(signature: Signature) -> int:
    return sum(entry[1] for entry in signature)


def mtime_of(signature: Signature) -> int:
    return max(entry[2] for entry in signature)


def _inside(path: Path, root: Path) -> bool:
    """``path``, with every link in it resolved, lies within ``root`` (already resolved)."""
    try:
        Path(os.path.realpath(path, strict=True)).relative_to(root)
        return True
    except (ValueError, OSError):  # outside, broken, or a loop
        return False


def _suffix(name: str) -> str:
    lower = name.lower()
    if lower.endswith(".ome.zarr"):
        return ".ome.zarr"
    return os.path.splitext(lower)[1]


def _head(path: str | Path, size: int = 132) -> bytes:
    """The first bytes of a file, never blocking (a FIFO swapped in) and never through a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _is_dicom_file(path: str | Path) -> bool:
    """DICOM Part 10: the 4 bytes ``DICM`` after a 128-byte preamble."""
    try:
        head = _head(path)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _is_dicom_entry(entry: os.DirEntry) -> bool:
    """A DICOM instance in a series folder: ``.dcm`` (any file type: the runner checks), or a
    regular file with no extension that carries the DICOM signature."""
    suffix = _suffix(entry.name)
    if is_temporary(entry.name):
        return False
    if suffix == DICOM_SUFFIX:
        return not entry.is_dir(follow_symlinks=False)
    return _maybe_dicom(entry.name) and entry.is_file(follow_symlinks=False) and _is_dicom_file(entry.path)


def _kind_of_file(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _sniffed_reason(path: Path) -> str:
    """The reason an entry that is no slide by its name is skipped, from its first bytes."""
    try:
        head = _head(os.path.realpath(path))  # a link here leads inside the watched folder
    except OSError as error:
        return f"it cannot be read ({error.strerror or error})."
    suffix = printable(_suffix(path.name)) or "no extension"
    if len(head) == 132 and head[128:] == b"DICM":
        return ("a DICOM file outside a series folder or with an extension DICOM series do not use. Fix: put "
                "the series' instances in a folder of their own, named .dcm or without extension.")
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return (f"a TIFF file whose name does not say so ({suffix}). Fix: rename it to .tif if it is a slide.")
    return f"not a slide format the watcher reads ({suffix})."


def find_units(root: Path, exclude: Iterable[Path] = (), under: Path | None = None,
               root_dicom: str = "files") -> Iterator[SlideUnit]:
    """Every slide unit and skipped entry under ``root`` (or only below its subfolder ``under``).

    ``root`` is resolved first. ``exclude`` folders (the output folder when it sits inside
    the scan folder) are skipped. DICOM instances lying directly in ``root`` are slides of
    their own (``root_dicom="files"``), or together one series (``"series"``, for
    ``edge-classify run SERIES_FOLDER``).
    """
    root = Path(os.path.realpath(root))
    excluded = {Path(os.path.realpath(p)) for p in exclude}
    start = root if under is None else Path(under)
    if start != root:
        try:
            parts = start.relative_to(root).parts
        except ValueError:
            return
        if any(is_temporary(p) for p in parts) or not _real_folder_below(start, root):
            return
    if any(Path(os.path.realpath(folder)) in excluded for folder in [start, *start.parents]):
        return  # e.g. a subfolder of the quarantine, created when a slide is moved there
    yield from _walk(start, root, excluded, root_dicom)


def _real_folder_below(folder: Path, root: Path) -> bool:
    """No component of ``folder`` below ``root`` is a link (linked folders are never walked)."""
    current = folder
    while current != root:
        if current.is_symlink() or not current.is_dir():
            return False
        current = current.parent
    return True


#: Folders nested deeper than this below the watched folder are not searched (recorded as
#: skipped): a hostile tree thousands of levels deep must not exhaust the stack or the time.
MAX_DEPTH = 32


def _walk(start: Path, root: Path, excluded: set[Path], root_dicom: str) -> Iterator[SlideUnit]:
    """Depth-first over folders (iteratively: any depth is safe), sorted by name."""
    base_depth = len(start.relative_to(root).parts)
    stack = [start]
    while stack:
        folder = stack.pop()
        depth = base_depth + len(folder.relative_to(start).parts)
        subfolders = []
        yield from _folder_units(folder, root, excluded, root_dicom, subfolders)
        for sub in reversed(subfolders):
            if depth + 1 > MAX_DEPTH:
                yield SlideUnit(sub, "skipped", root, f"a folder nested more than {MAX_DEPTH} levels deep is not "
                                "searched. Fix: move its slides closer to the watched folder.")
            else:
                stack.append(sub)


def _folder_units(folder: Path, root: Path, excluded: set[Path], root_dicom: str,
                  subfolders: list[Path]) -> Iterator[SlideUnit]:
    """The units of one folder's own entries; its subfolders to walk are appended to ``subfolders``."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as error:
        logger.warning("cannot list %s (%s); it is skipped this time", shown(folder), error.strerror or error)
        return
    names = {e.name for e in entries}
    series = {e.name for e in entries if _is_dicom_entry(e)}
    as_series = bool(series) and (folder != root or root_dicom == "series")
    for entry in entries:
        if is_temporary(entry.name):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                if Path(os.path.realpath(path)) in excluded:
                    continue
                if (entry.name + ".mrxs") in names or _vsi_data_folder(entry.name, names):
                    continue  # the data folder of the .mrxs/.vsi beside it
                subfolders.append(path)
                continue
            if as_series and entry.name in series:
                continue
            yield entry_unit(path, root, entry, in_series=as_series)
        except FileNotFoundError:
            continue  # renamed or removed since the folder was listed
        except OSError as error:  # e.g. a folder one may list but not enter
            yield SlideUnit(path, "skipped", root, f"it cannot be read ({error.strerror or error}). Fix: give "
                            "the watcher's user read access.")
    if as_series:  # the series in root itself (run SERIES_FOLDER) is named from the folder above
        yield SlideUnit(folder, "dicom-folder", root if folder != root else root.parent)


def _vsi_data_folder(name: str, names: set[str]) -> bool:
    return name.startswith("_") and name.endswith("_") and len(name) > 2 and (name[1:-1] + ".vsi") in names


def entry_unit(path: Path, root: Path, entry: os.DirEntry | None = None, in_series: bool = False) -> SlideUnit:
    """The unit of one non-folder entry: a slide file, or skipped with its reason."""
    info = entry.stat(follow_symlinks=False) if entry is not None else os.lstat(path)
    suffix = _suffix(path.name)
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            return SlideUnit(path, "skipped", root, "a broken symbolic link (or a link loop).")
        if stat.S_ISDIR(target.st_mode):
            return SlideUnit(path, "skipped", root, "a symbolic link to a folder; linked folders are not "
                             "walked. Fix: move or copy the slide into the watched folder.")
        if not _inside(path, root):
            if suffix not in SLIDE_SUFFIXES and suffix != DICOM_SUFFIX:
                return SlideUnit(path, "skipped", root, "a symbolic link out of the watched folder.")
        elif not stat.S_ISREG(target.st_mode):
            return SlideUnit(path, "skipped", root, f"a symbolic link to {_kind_of_file(target.st_mode)}.")
    elif not stat.S_ISREG(info.st_mode):
        return SlideUnit(path, "skipped", root, f"{_kind_of_file(info.st_mode)}, not a slide file.")
    if suffix in SLIDE_SUFFIXES:
        return SlideUnit(path, "mrxs" if suffix == ".mrxs" else "file", root)
    if not in_series and (suffix == DICOM_SUFFIX or (_maybe_dicom(path.name) and stat.S_ISREG(info.st_mode)
                                                     and _is_dicom_file(path))):
        return SlideUnit(path, "file", root)
    if suffix in _KNOWN_UNREADABLE:
        return SlideUnit(path, "skipped", root, _KNOWN_UNREADABLE[suffix])
    if in_series:
        return SlideUnit(path, "skipped", root, "not a DICOM instance, in a DICOM series folder.")
    return SlideUnit(path, "skipped", root)


def unit_for(path: Path, root: Path, exclude: Iterable[Path] = ()) -> SlideUnit | None:
    """The unit a changed file belongs to (None when it belongs to none, or is a folder)."""
    path = Path(path)
    root = Path(os.path.realpath(root))
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return None
    if not parts or any(is_temporary(part) for part in parts):
        return None
    excluded = {Path(os.path.realpath(p)) for p in exclude}
    if any(Path(os.path.realpath(parent)) in excluded for parent in [path, *path.parents][:len(parts)]):
        return None
    # A file inside a MIRAX (VSI) data folder belongs to the .mrxs (.vsi) beside that folder.
    for parent in list(path.parents)[:len(parts) - 1]:
        mrxs = parent.with_name(parent.name + ".mrxs")
        if os.path.lexists(mrxs):
            return SlideUnit(mrxs, "mrxs", root)
        if _vsi_data_folder(parent.name, {parent.name[1:-1] + ".vsi"}) and \
                os.path.lexists(parent.with_name(parent.name[1:-1] + ".vsi")):
            return entry_unit(parent.with_name(parent.name[1:-1] + ".vsi"), root)
    if not _real_folder_below(path.parent, root):
        return None  # inside a linked folder: not ours (the link itself is recorded as skipped)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return _gone_unit(path, root)
    if stat.S_ISDIR(info.st_mode):
        return None
    in_series = path.parent != root and _folder_is_series(path.parent)
    if in_series and _is_dicom_name_or_file(path):
        return SlideUnit(path.parent, "dicom-folder", root)
    try:
        return entry_unit(path, root, in_series=in_series)
    except FileNotFoundError:
        return _gone_unit(path, root)


def _gone_unit(path: Path, root: Path) -> SlideUnit | None:
    """The unit a vanished file belonged to (its candidate is then dropped or re-settled)."""
    suffix = _suffix(path.name)
    if suffix == DICOM_SUFFIX and path.parent != root:
        return SlideUnit(path.parent, "dicom-folder", root)
    if suffix in SLIDE_SUFFIXES or suffix == DICOM_SUFFIX:
        return SlideUnit(path, "mrxs" if suffix == ".mrxs" else "file", root)
    return None


def _folder_is_series(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(_is_dicom_entry(e) for e in entries)
    except OSError:
        return False


def _is_dicom_name_or_file(path: Path) -> bool:
    suffix = _suffix(path.name)
    return suffix == DICOM_SUFFIX or (_maybe_dicom(path.name) and path.is_file() and not path.is_symlink()
                                      and _is_dicom_file(path))


@dataclass(frozen=True)
class CheckedFile:
    """A file of a slide as ``check_files`` found it: where it really is, and which inode."""

    path: Path
    real: Path
    device: int
    inode: int


def check_files(unit: SlideUnit) -> list[CheckedFile]:
    """Resolve every file of ``unit`` once and check it may be read; raise if not.

    A link must lead inside the watched folder, and every file must be a regular file
    (a FIFO would block the reader for ever, a device is no slide). The runner calls this
    right before reading and reads through ``real``; afterwards ``same_files`` tells
    whether the files are still the ones checked.
    """
    folder = unit.path if unit.kind == "dicom-folder" else unit.path.parent
    if not _inside(folder, unit.root):
        raise UnsupportedSlideError(unit.path, f"leads out of the watched folder {shown(unit.root)} (a folder "
                                    "on its path was replaced by a symbolic link); it is not read.",
                                    "move the slide itself into the watched folder.")
    checked = []
    for path in unit.files():
        try:
            real = Path(os.path.realpath(path, strict=True))
            info = os.stat(real)
        except FileNotFoundError:
            raise UnsupportedSlideError(path, "disappeared, or is a broken symbolic link.",
                                        "nothing to do if it was moved away on purpose.") from None
        except OSError as error:
            raise UnsupportedSlideError(path, f"cannot be resolved ({error.strerror or error}).",
                                        "check the file's permissions and links.") from None
        try:
            real.relative_to(unit.root)
        except ValueError:
            raise UnsupportedSlideError(path, f"is a symbolic link to {shown(real)}, outside the watched folder "
                                        f"{shown(unit.root)}; links out are never read.",
                                        "copy the slide into the watched folder instead of linking it.") from None
        if not stat.S_ISREG(info.st_mode):
            raise UnsupportedSlideError(path, f"is {_kind_of_file(info.st_mode)}, not a slide file.",
                                        "write slides as regular files.")
        checked.append(CheckedFile(path, real, info.st_dev, info.st_ino))
    if not checked:
        raise UnsupportedSlideError(unit.path, "holds no slide files.", "nothing to do if it was emptied on purpose.")
    if unit.kind == "dicom-folder":
        _vet_folder(unit.path, unit.root, "DICOM series folder")
    elif unit.kind == "mrxs" and unit.path.with_suffix("").is_dir():
        _vet_folder(unit.path.with_suffix(""), unit.root, "MIRAX data folder")
    return checked


def _vet_folder(folder: Path, root: Path, what: str) -> None:
    """OpenSlide opens every entry of a DICOM series folder, not only the instances (and
    MIRAX reads what its index names): each entry must be a regular file or a folder, and a
    link must stay inside the watched folder. A FIFO would block the reader for ever."""
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError as error:
        raise UnsupportedSlideError(folder, f"cannot be listed ({error.strerror or error}).",
                                    "check the folder's permissions.") from None
    for entry in entries:
        path = Path(entry.path)
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                if not _inside(path, root):
                    raise UnsupportedSlideError(
                        folder, f"holds {shown(entry.name)}, a symbolic link out of the watched folder {shown(root)}; "
                        f"OpenSlide reads every file of a {what}, so it is not read.",
                        "remove the link, or copy what it points to into the folder.")
                mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue  # gone, or a broken link OpenSlide cannot open either
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsupportedSlideError(folder, f"holds {shown(entry.name)}, {_kind_of_file(mode)}; OpenSlide opens "
                                        f"every file of a {what} and would block on it.",
                                        "remove it from the folder.")


def same_files(checked: list[CheckedFile]) -> bool:
    """The checked files are still where they were, and are still the same inodes."""
    for item in checked:
        try:
            info = os.stat(item.real, follow_symlinks=False)
        except OSError:
            return False
        if (info.st_dev, info.st_ino) != (item.device, item.inode) or not stat.S_ISREG(info.st_mode):
            return False
    return True
