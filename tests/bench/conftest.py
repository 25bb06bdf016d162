"""Slides for the micro-benchmarks: the real CMU-1 region when present, and a synthetic
4096x3072 pyramidal TIFF at 0.5 µm/px so ``make bench`` measures something anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowmag.synthetic import make_synthetic_slide

LARGE_SYNTHETIC_SIZE = (4096, 3072)
LARGE_SYNTHETIC_MPP = 0.5

#: Benchmark slide names -> path under ../shared/data/slides (None: the synthetic slide).
SLIDES = {
    "cmu1-svs": "aperio/CMU-1-Small-Region.svs",
    "cmu1-pyramid-tif": "generic-tiff/CMU-1-Small-Region-pyramid.tif",
    "synthetic-4096x3072": None,
}


@pytest.fixture(scope="session")
def large_synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4096x3072 JPEG-tiled pyramidal TIFF at 0.5 µm/px with two pieces of tissue."""
    path = tmp_path_factory.mktemp("bench-slides") / "synthetic-4096x3072.tif"
    return make_synthetic_slide(path, *LARGE_SYNTHETIC_SIZE, mpp=LARGE_SYNTHETIC_MPP, seed=6)


def bench_slide_path(request: pytest.FixtureRequest, name: str) -> Path:
    """The file behind a benchmark slide name; real slides skip when ../shared/data is absent."""
    relative = SLIDES[name]
    if relative is None:
        return request.getfixturevalue("large_synthetic_slide")
    path = request.getfixturevalue("slides_dir") / relative
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path
