"""``read_at_mpp`` from the pyramid vs from level 0 (``exact=True``), and the pyramid check.

Reads are measured on a slide that is already open and verified, as in the edge runner
after its first read; ``verify_pyramid`` (run once per opened slide) is measured on its
own, on a freshly opened slide each round. Each group holds the pyramid and the level-0
read of one slide at one µm/px side by side.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from lowmag.reader import choose_level, output_size, read_at_mpp, verify_pyramid
from lowmag.slide import Slide, open_slide
from tests.bench.conftest import bench_slide_path

pytestmark = pytest.mark.benchmark

PYRAMIDAL = ("cmu1-pyramid-tif", "synthetic-4096x3072")


@pytest.fixture(scope="module")
def verified_slides(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Slide]]:
    """Open slides by name, each verified once before any read is timed."""
    opened: dict[str, Slide] = {}

    def get(name: str) -> Slide:
        if name not in opened:
            slide = open_slide(bench_slide_path(request, name))
            verify_pyramid(slide)
            opened[name] = slide
        return opened[name]

    yield get
    for slide in opened.values():
        slide.close()


@pytest.mark.parametrize("mpp", [2.0, 8.0], ids=["2um-5x", "8um-1.25x"])
@pytest.mark.parametrize("path", ["pyramid", "level-0"])
@pytest.mark.parametrize("name", PYRAMIDAL)
def test_read_at_mpp(benchmark, verified_slides, name: str, path: str, mpp: float) -> None:
    slide = verified_slides(name)
    exact = path == "level-0"
    benchmark.group = f"read {name} at {mpp:g} um/px"
    benchmark.extra_info.update(slide=name, path=path, target_mpp=mpp,
                                level=0 if exact else choose_level(slide, mpp),
                                output_px=list(output_size(slide, mpp)))
    pixels = benchmark(read_at_mpp, slide, mpp, exact=exact)
    assert pixels.shape[:2] == output_size(slide, mpp)[::-1]


@pytest.mark.parametrize("name", PYRAMIDAL + ("fullsize-20x15mm", "fullsize-30x22mm"))
def test_verify_pyramid(benchmark, request: pytest.FixtureRequest, name: str) -> None:
    """The once-per-slide check, all of it: every coarse level compared with a finer one on
    three windows (a read checks only the levels it may use: test_bench_tissue)."""
    path = bench_slide_path(request, name)
    benchmark.group = "pyramid check (once per opened slide)"
    benchmark.extra_info.update(slide=name)
    benchmark.pedantic(verify_pyramid, setup=lambda: ((open_slide(path),), {}),
                       teardown=lambda slide: slide.close(), rounds=3)
