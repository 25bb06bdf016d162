"""Small file helpers shared by every stage: atomic writes and content hashes.

Outputs are written to a temporary file in the destination folder, flushed to disk
and renamed into place, so a crash never leaves a half-written file under the final
name and an existing file is only ever replaced whole.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator


def current_umask() -> int:
    """The process umask (read without changing it for longer than a moment)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Temporary files of atomic writes: ``.lowmag-XXXXXXXX.tmp`` beside the final file.
TEMP_PREFIX = ".lowmag-"

#: mkstemp creates files readable by their owner only; final files get the usual mode.
_FILE_MODE = 0o666 & ~current_umask()


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = "b" in mode
    # A short name of its own: ".<name>.XXXX.tmp" would pass the 255-byte limit for long names.
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp_name, _FILE_MODE)
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def user_cache_dir(name: str) -> Path:
    """``$LOWMAG_CACHE_DIR/<name>``, else ``~/.cache/lowmag/<name>``: machine-local caches."""
    root = os.environ.get("LOWMAG_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lowmag") / name


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_fd(fd: int, should_stop: Callable[[], bool] = lambda: False, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of an open file from its start; returns early (any value) once ``should_stop``."""
    digest = hashlib.sha256()
    offset = 0
    while not should_stop():
        chunk = os.pread(fd, chunk_size, offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()
