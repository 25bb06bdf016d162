"""Magnification in the paper's notation, µm/px, and conversions between them.

lowmag follows DiPalma et al.: **10x = 1 µm/px**, so a magnification ``m`` means
``10 / m`` µm/px (20x = 0.5, 5x = 2, 1.25x = 8, 0.625x = 16 µm/px). This matches the
usual scanner convention (a "20x" Aperio scan is about 0.5 µm/px) closely enough that
the objective power a slide reports is informative, but lowmag always works from the
slide's measured µm/px, never from its objective power.

A resolution can be written three ways (``Resolution.parse``):

- ``"1.25x"``: magnification in the paper's notation (8 µm/px);
- ``"8um"``, ``"8mpp"`` or ``"8µm"``: µm/px directly;
- ``"scan/4"``: relative to the slide's own scan, here 4 times coarser than level 0
  (``"scan"`` alone is the scan resolution itself).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from lowmag.errors import ResolutionError

#: µm/px at magnification 1x in the paper's notation (10x = 1 µm/px).
MPP_AT_1X = 10.0

#: Level-0 µm/px outside this range does not come from a slide scanner
#: (72-dpi image tags give 352.8 µm/px, for example) and is refused unless overridden.
PLAUSIBLE_MPP_RANGE = (0.1, 20.0)

Unit = Literal["mag", "mpp", "scan"]

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_PATTERNS: tuple[tuple[re.Pattern[str], Unit], ...] = (
    (re.compile(rf"^{_NUMBER}\s*x$", re.IGNORECASE), "mag"),
    (re.compile(rf"^{_NUMBER}\s*(?:um|µm|μm|mpp)(?:/px)?$", re.IGNORECASE), "mpp"),
    (re.compile(rf"^scan\s*/\s*{_NUMBER}$", re.IGNORECASE), "scan"),
)


def magnification_to_mpp(magnification: float) -> float:
    """µm/px of a magnification in the paper's notation (1.25 -> 8.0)."""
    if not magnification > 0 or not math.isfinite(magnification):
        raise ResolutionError(f"magnification must be a positive number, got {magnification!r}")
    return MPP_AT_1X / magnification


def mpp_to_magnification(mpp: float) -> float:
    """Magnification in the paper's notation of a µm/px (8.0 -> 1.25)."""
    if not mpp > 0 or not math.isfinite(mpp):
        raise ResolutionError(f"µm/px must be a positive number, got {mpp!r}")
    return MPP_AT_1X / mpp


def format_magnification(mpp: float) -> str:
    """Human label of a µm/px in the paper's notation: 8.0 -> '1.25x', 0.495 -> '20.2x'."""
    mag = mpp_to_magnification(mpp)
    for digits in (0, 1, 2, 3):
        if abs(round(mag, digits) - mag) < 5e-4 * max(mag, 1e-9):
            return f"{round(mag, digits):.{digits}f}x"
    return f"{mag:.3g}x"


def is_plausible_mpp(mpp: float) -> bool:
    """Whether a level-0 µm/px could come from a slide scanner or microscope camera."""
    low, high = PLAUSIBLE_MPP_RANGE
    return math.isfinite(mpp) and low <= mpp <= high


@dataclass(frozen=True)
class Resolution:
    """A target resolution with its unit: ``mag`` (paper notation), ``mpp`` or ``scan``."""

    value: float
    unit: Unit

    def __post_init__(self) -> None:
        if self.unit not in ("mag", "mpp", "scan"):
            raise ResolutionError(f"unknown resolution unit {self.unit!r}; use mag, mpp or scan")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise ResolutionError(f"resolution must be a positive number, got {self.value!r}")

    @classmethod
    def parse(cls, text: str) -> "Resolution":
        """Parse '1.25x', '8um', '8mpp' or 'scan/4' (see the module docstring)."""
        cleaned = str(text).strip()
        if cleaned.lower() == "scan":
            return cls(1.0, "scan")
        for pattern, unit in _PATTERNS:
            match = pattern.match(cleaned)
            if match:
                value = float(match.group(1))
                if value <= 0:
                    break
                return cls(value, unit)
        raise ResolutionError(
            f"cannot read resolution {text!r}: write a magnification in the paper's notation "
            "('1.25x', where 10x = 1 µm/px), µm/px ('8um' or '8mpp'), or a factor relative "
            "to the scan ('scan/4')"
        )

    def to_mpp(self, scan_mpp: float | None = None) -> float:
        """µm/px of this resolution; ``scan`` units need the slide's level-0 µm/px."""
        if self.unit == "mpp":
            return float(self.value)
        if self.unit == "mag":
            return magnification_to_mpp(self.value)
        if scan_mpp is None:
            raise ResolutionError("a resolution relative to the scan needs the slide's µm/px")
        return float(scan_mpp) * float(self.value)

    def __str__(self) -> str:
        if self.unit == "mag":
            return f"{self.value:g}x"
        if self.unit == "mpp":
            return f"{self.value:g}um"
        return "scan" if self.value == 1 else f"scan/{self.value:g}"
