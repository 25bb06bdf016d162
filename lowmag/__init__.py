"""lowmag: resolution-distilled histology classifiers for slide-scanner workstations.

The core (this package) is torch-free: opening slides, reading them at a target
µm/px, locating tissue, and the ``lowmag.json`` model spec. The stages live in
``lowmag.train``, ``lowmag.calibration``, ``lowmag.export`` and ``lowmag.edge``.

Public names are imported lazily so that ``import lowmag`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LowmagError": "lowmag.errors",
    "SlideError": "lowmag.errors",
    "MissingMppError": "lowmag.errors",
    "ImplausibleMppError": "lowmag.errors",
    "UnsupportedSlideError": "lowmag.errors",
    "SpecError": "lowmag.errors",
    "Resolution": "lowmag.resolution",
    "magnification_to_mpp": "lowmag.resolution",
    "mpp_to_magnification": "lowmag.resolution",
    "open_slide": "lowmag.slide",
    "Slide": "lowmag.slide",
    "SlideInfo": "lowmag.slide",
    "read_at_mpp": "lowmag.reader",
    "Region": "lowmag.reader",
    "PREPROCESSING_VERSION": "lowmag.reader",
    "locate_tissue": "lowmag.tissue",
    "TissueBox": "lowmag.tissue",
    "TissueParams": "lowmag.tissue",
    "ModelSpec": "lowmag.spec",
    "read_spec": "lowmag.spec",
    "write_spec": "lowmag.spec",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowmag' has no attribute {name!r}")
    return getattr(import_module(module), name)
