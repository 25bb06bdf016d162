"""Tissue localisation: ``locate_tissue`` on a slide already open and verified (the overview
read, then the mask), and the pipeline's whole tissue stage on a freshly opened slide (the
overview and the mask, the pyramid check of the levels they and the model use beside them),
full-size slides included.
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
    on a full slide): the pyramid check of the levels a 1.25x student (7.92 µm/px) and the
    overview need runs on a second handle beside the overview and the mask, as there."""
    from lowmag.tissue import find_tissue_checked_beside

    path = bench_slide_path(request, name)
    benchmark.group = "tissue stage (fresh slide: pyramid check + overview + mask)"
    benchmark.extra_info.update(slide=name, check_up_to_mpp=7.92)
    finding = benchmark.pedantic(find_tissue_checked_beside,
                                 setup=lambda: ((open_slide(path), lambda: open_slide(path), 7.92), {}), rounds=3)
    assert finding.boxes, f"no tissue found on {name}"
