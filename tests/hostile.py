"""Files a hostile or careless user drops in a scan folder, built from scratch for the tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def write_huge_header_tiff(path: Path, width: int = 1_000_000, height: int = 1_000_000, tile: int = 4096,
                           mpp: float = 0.5) -> Path:
    """A small tiled TIFF (about 480 kB for 10^6 x 10^6) declaring a gigantic image.

    Every tile points at the same deflated white tile, so the file is tiny while its
    header claims ``width`` x ``height`` RGB pixels at ``mpp`` µm/px (resolution tags in
    pixels per centimetre, which OpenSlide reads as µm/px).
    """
    across, down = -(-width // tile), -(-height // tile)
    count = across * down
    blob = zlib.compress(b"\xff" * (tile * tile * 3), 9)
    entries = [  # (tag, type, count, value or offset placeholder)
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, "bits"), (259, 3, 1, 8), (262, 3, 1, 2),
        (277, 3, 1, 3), (282, 5, 1, "xres"), (283, 5, 1, "yres"), (284, 3, 1, 1), (296, 3, 1, 3),
        (322, 3, 1, tile), (323, 3, 1, tile), (324, 4, count, "offsets"), (325, 4, count, "counts"),
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    data_start = ifd_offset + ifd_size
    bits_at = data_start
    xres_at = bits_at + 6
    yres_at = xres_at + 8
    offsets_at = yres_at + 8
    counts_at = offsets_at + 4 * count
    blob_at = counts_at + 4 * count
    places = {"bits": bits_at, "xres": xres_at, "yres": yres_at, "offsets": offsets_at, "counts": counts_at}
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset))
    out += struct.pack("<H", len(entries))
    for tag, kind, n, value in entries:
        field = places[value] if isinstance(value, str) else value
        if kind == 3 and n == 1:
            out += struct.pack("<HHIHH", tag, kind, n, field, 0)
        else:
            out += struct.pack("<HHII", tag, kind, n, field)
    out += struct.pack("<I", 0)
    per_cm = round(10_000 / mpp)
    out += struct.pack("<HHH", 8, 8, 8) + struct.pack("<II", per_cm, 1) + struct.pack("<II", per_cm, 1)
    out += struct.pack(f"<{count}I", *([blob_at] * count)) + struct.pack(f"<{count}I", *([len(blob)] * count))
    out += blob
    path.write_bytes(bytes(out))
    return path
