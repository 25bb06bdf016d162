"""``locate_tissue``: the overview read at about 2 µm/px or coarser, then the mask.

Measured on a slide already open and verified (the pyramid check is in test_bench_read).
"""

from __future__ import annotations

import pytest

from lowmag.reader import verify_pyramid
from lowmag.slide import open_slide
from lowmag.tissue import analysis_mpp, locate_tissue
from tests.bench.conftest import SLIDES, bench_slide_path

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize("name", list(SLIDES))
def test_locate_tissue(benchmark, request: pytest.FixtureRequest, name: str) -> None:
    with open_slide(bench_slide_path(request, name)) as slide:
        verify_pyramid(slide)
        benchmark.group = "locate_tissue"
        benchmark.extra_info.update(slide=name, analysis_mpp=analysis_mpp(slide))
        boxes = benchmark(locate_tissue, slide)
        benchmark.extra_info["pieces"] = len(boxes)
    assert boxes, f"no tissue found on {name}"
