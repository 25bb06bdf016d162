"""File names are bytes: how lowmag shows them, stores them and keeps them one line long.

On Linux a name is any bytes but ``/`` and NUL: not always UTF-8 (a Latin-1 ``caf\\xe9.svs``
copied from an old share), sometimes with a newline or a tab. Python hands such names
around as ``str`` with lone surrogates (``surrogateescape``), which SQLite, JSON and UTF-8
log files refuse. So:

- ``raw(path)`` is the exact bytes, for keys and for opening the file again;
- ``shown(path)`` is one printable line for people (logs, CSV, JSON, ``status``): valid
  UTF-8 stays as it is; an undecodable byte becomes ``\\xNN``, a control character
  ``\\n``, ``\\t``, ``\\r`` or ``\\xNN``/``\\uNNNN``, and a backslash ``\\\\``, so two
  different names never show the same;
- ``printable(text)`` does the same to a message (an error text quoting a name), leaving
  backslashes alone.
"""

from __future__ import annotations

import os
from pathlib import Path

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def raw(path: str | bytes | os.PathLike) -> bytes:
    """The name's exact bytes (what the kernel stores)."""
    return os.fsencode(path)


def from_raw(data: bytes) -> Path:
    """A Path from exact bytes (undecodable bytes become surrogates, as ``os`` does)."""
    return Path(os.fsdecode(bytes(data)))


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape carries it
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: object, backslashes: bool = False) -> str:
    """``text`` as one printable line: control characters and undecodable bytes escaped."""
    value = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    if value.isprintable() and not (backslashes and "\\" in value):
        return value
    out = []
    for char in value:
        if char == "\\" and backslashes:
            out.append("\\\\")
        elif char.isprintable() and not 0xD800 <= ord(char) <= 0xDFFF:
            out.append(char)
        else:
            out.append(_escape(char))
    return "".join(out)


def shown(path: str | bytes | os.PathLike) -> str:
    """A path as people see it: one line, printable, unambiguous (see the module doc)."""
    return printable(os.fsdecode(path), backslashes=True)
