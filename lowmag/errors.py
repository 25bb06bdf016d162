"""The small exception hierarchy every lowmag stage raises.

Each message names the file involved and what the user can do about it; CLIs turn
any ``LowmagError`` into a one-line error and exit status 1.
"""

from __future__ import annotations

from pathlib import Path

from lowmag.names import shown


def without_path(message: str, path: str | Path) -> str:
    """``message`` without the leading ``PATH: `` these errors start with (for lines that already name it)."""
    prefix = f"{shown(path)}: "
    return message[len(prefix):] if message.startswith(prefix) else message


class LowmagError(Exception):
    """Base of every error lowmag raises on purpose (bad input, refused files)."""


class SlideError(LowmagError):
    """A slide or image that cannot be used; ``path`` names it."""

    def __init__(self, path: str | Path, reason: str, fix: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.fix = fix
        message = f"{shown(self.path)}: {reason}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)


class UnsupportedSlideError(SlideError):
    """Neither OpenSlide nor libvips can read the file."""


class SlideReadError(SlideError):
    """The file was recognised but reading pixels or metadata from it failed."""


class MissingMppError(SlideError):
    """The file carries no physical pixel size (µm/px)."""


class ImplausibleMppError(SlideError):
    """The file's µm/px is outside what a slide scanner produces (e.g. 72-dpi tags)."""


class SlideTooLargeError(SlideError):
    """Reading the requested region would exceed a configured pixel budget."""


class Interrupted(LowmagError):
    """A stop was asked for while a slide was being read; nothing was written for it."""


class CalibrationError(LowmagError):
    """No usable calibration set: missing sources, plain images without µm/px, no tissue."""


class ResolutionError(LowmagError, ValueError):
    """A magnification or µm/px string that cannot be understood."""


class SpecError(LowmagError):
    """A ``lowmag.json`` model spec that is malformed, of the wrong version, or unmet."""

    def __init__(self, path: str | Path | None, problems: list[str] | str) -> None:
        self.path = Path(path) if path is not None else None
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f"{self.path}: " if self.path is not None else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            message = f"{where}{len(self.problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)


class ArtifactHashError(SpecError):
    """A file in a bundle or checkpoint does not match the sha256 its spec records."""


class TensorRTUnavailableError(LowmagError):
    """The ``tensorrt`` package is not importable here (it only installs on NVIDIA GPU hosts)."""

    def __init__(self, detail: str | None = None) -> None:
        message = (
            "TensorRT is not installed here. Its wheels come from NVIDIA's package index and "
            "need an NVIDIA GPU host: pip install 'lowmag[tensorrt]' --extra-index-url "
            "https://pypi.nvidia.com"
        )
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class EngineMismatchError(LowmagError):
    """A bundle's TensorRT engine was built for another TensorRT version or GPU."""

    def __init__(self, engine: str | Path, differences: list[str]) -> None:
        self.engine = Path(engine)
        self.differences = list(differences)
        listed = "\n".join(f"  - {d}" for d in self.differences)
        super().__init__(
            f"{self.engine}: this TensorRT engine cannot run on this machine:\n{listed}\n"
            "Fix: pass --rebuild-engine (prepare_engine(..., rebuild=True)) to build an engine for "
            "this machine from the bundle's ONNX into the local engine cache, or re-export the "
            "bundle with --target tensorrt on this GPU."
        )
