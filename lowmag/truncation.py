"""Is a file cut short? A TIFF's header says where its directories and pixels are; a copy
that stopped early leaves them pointing past the end. Used to explain a refusal (an empty
or truncated file is not "an unknown format")."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

#: Tags whose values are offsets (with their byte counts) into the file.
_OFFSET_TAGS = {273: 279, 324: 325}  # StripOffsets/StripByteCounts, TileOffsets/TileByteCounts
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_TYPE_CODES = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}
#: Bounds on the work one check may do (a hostile header could ask for hours of it): past
#: them the check says nothing rather than something slow.
_MAX_DIRECTORIES = 1_000
_MAX_ENTRIES = 100_000
_MAX_VALUES = 4_000_000


def truncation_problem(path: str | Path) -> str | None:
    """Why the file looks empty or truncated, or None when it does not (or cannot tell)."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "is empty (0 bytes)"
        with open(path, "rb") as handle:
            return _tiff_problem(handle, size)
    except _Truncated as cut:
        return _cut(size, cut.needed)
    except (OSError, struct.error, ValueError):
        return None


class _Truncated(Exception):
    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


def _tiff_problem(handle, size: int) -> str | None:
    head = handle.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 8:
        return None
    magic = struct.unpack(order + "H", head[2:4])[0]
    if magic == 42:
        big, offset = False, struct.unpack(order + "I", head[4:8])[0]
    elif magic == 43 and len(head) >= 16:
        big, offset = True, struct.unpack(order + "Q", head[8:16])[0]
    else:
        return None
    count_fmt, entry_size, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    seen = set()
    entries_read = 0
    for _ in range(_MAX_DIRECTORIES):
        if offset == 0 or offset in seen:
            return None
        seen.add(offset)
        if offset + struct.calcsize(count_fmt) > size:
            return _cut(size, offset)
        handle.seek(offset)
        count = struct.unpack(order + count_fmt, handle.read(struct.calcsize(count_fmt)))[0]
        entries_read += count
        if entries_read > _MAX_ENTRIES:
            return None
        end = offset + struct.calcsize(count_fmt) + count * entry_size + struct.calcsize(next_fmt)
        if end > size:
            return _cut(size, end)
        entries = handle.read(count * entry_size)
        values = {}
        for i in range(count):
            entry = entries[i * entry_size:(i + 1) * entry_size]
            if big:
                tag, kind, n = struct.unpack(order + "HHQ", entry[:12])
                field = entry[12:20]
            else:
                tag, kind, n = struct.unpack(order + "HHI", entry[:8])
                field = entry[8:12]
            if tag in _OFFSET_TAGS or tag in _OFFSET_TAGS.values():
                values[tag] = _read_values(handle, order, kind, n, field, big, size)
        for offsets_tag, counts_tag in _OFFSET_TAGS.items():
            offsets, counts = values.get(offsets_tag), values.get(counts_tag)
            if offsets is not None and counts is not None and len(offsets) == len(counts) and len(offsets):
                last = int((offsets + counts).max())
                if last > size:
                    return _cut(size, last)
        offset = struct.unpack(order + next_fmt, handle.read(struct.calcsize(next_fmt)))[0]
    return None


def _read_values(handle, order: str, kind: int, n: int, field: bytes, big: bool, size: int) -> np.ndarray | None:
    code = _TYPE_CODES.get(kind)
    if code is None:
        return None
    if n > _MAX_VALUES:
        return None
    nbytes = _TYPE_SIZES[kind] * n
    if nbytes <= len(field):
        data = field[:nbytes]
    else:
        where = struct.unpack(order + ("Q" if big else "I"), field)[0]
        if where + nbytes > size:
            raise _Truncated(where + nbytes)  # the array itself is cut off
        position = handle.tell()
        handle.seek(where)
        data = handle.read(nbytes)
        handle.seek(position)
    return np.frombuffer(data, dtype=np.dtype(order + code)).astype(np.uint64)


def _cut(size: int, needed: int) -> str:
    return f"is truncated: it ends at byte {size:,} but its header points to byte {needed:,}"
