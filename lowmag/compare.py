"""How much reading from the pyramid differs from the paper's level-0 protocol.

The paper resampled every image from the original resolution; lowmag reads from the
nearest finer pyramid level, which is far faster on real slides. This module
measures the difference on a given slide so it can be documented and re-checked.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from lowmag.reader import choose_level, read_at_mpp, verify_pyramid
from lowmag.resolution import Resolution
from lowmag.slide import Slide


@dataclass(frozen=True)
class PathComparison:
    slide: str
    target: str
    target_mpp: float
    width: int
    height: int
    level: int
    mean_abs_diff: float
    p99_abs_diff: float
    psnr_db: float
    pyramid_seconds: float
    exact_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_read_paths(slide: Slide, targets: Sequence[Resolution]) -> list[PathComparison]:
    """Read the whole slide at each target both ways; report differences (0-255 scale)."""
    verify_pyramid(slide)
    results = []
    for target in targets:
        mpp = target.to_mpp(slide.info.mpp)
        start = time.perf_counter()
        pyramid = read_at_mpp(slide, mpp)
        middle = time.perf_counter()
        exact = read_at_mpp(slide, mpp, exact=True)
        end = time.perf_counter()
        diff = np.abs(pyramid.astype(np.float32) - exact.astype(np.float32))
        mse = float((diff**2).mean())
        results.append(
            PathComparison(
                slide=slide.info.path,
                target=str(target),
                target_mpp=mpp,
                width=pyramid.shape[1],
                height=pyramid.shape[0],
                level=choose_level(slide, mpp),
                mean_abs_diff=float(diff.mean()),
                p99_abs_diff=float(np.percentile(diff, 99)),
                psnr_db=math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse),
                pyramid_seconds=middle - start,
                exact_seconds=end - middle,
            )
        )
    return results
