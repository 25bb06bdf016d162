"""Tissue localisation: ``locate_tissue`` on a slide already open and verified (the overview
read, then the mask), and the pipeline's whole tissue stage on a freshly opened slide (the
pyramid check of the levels the overview may use, the overview, the mask), full-size slides
included.
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


@pytest.mark.parametrize("name", list(SLIDES))
def test_tissue_stage_on_a_fresh_slide(benchmark, request: pytest.FixtureRequest, name: str) -> None:
    """What the edge pipeline's ``tissue`` stage costs per slide (issue 15's target: <= 0.3 s
    on a full slide)."""
    from lowmag.tissue import find_tissue

    path = bench_slide_path(request, name)
    benchmark.group = "tissue stage (fresh slide: pyramid check + overview + mask)"
    benchmark.extra_info.update(slide=name)
    finding = benchmark.pedantic(find_tissue, setup=lambda: ((open_slide(path),), {}), rounds=3)
    assert finding.boxes, f"no tissue found on {name}"
