"""Slides for the micro-benchmarks: the real CMU-1 region when present, a synthetic
4096x3072 pyramidal TIFF at 0.5 µm/px so ``make bench`` measures something anywhere, and
full-size slides (20 x 15 mm, 30 x 22.5 mm) of real tissue (``lowmag.fullsize``), made once
into .bench/slides from the CMU-1 region (../shared/data or the demo's copy) and the Kather
tiles when present: the fixed costs only show at the size labs scan."""

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
    "fullsize-20x15mm": "fullsize",
    "fullsize-30x22mm": "fullsize",
}
ROOT = Path(__file__).resolve().parents[2]
FULLSIZE_DIR = ROOT / ".bench" / "slides"


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
    if relative == "fullsize":
        return request.getfixturevalue("fullsize_slides")[name]
    path = request.getfixturevalue("slides_dir") / relative
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def fullsize_slides() -> dict[str, Path]:
    """The full-size slides by benchmark name (made on first use, about a minute)."""
    from lowmag.fullsize import bench_slides

    shared = ROOT.parent / "shared" / "data"
    sources = [shared / "slides" / "aperio" / "CMU-1-Small-Region.svs", ROOT / ".demo" / "CMU-1-Small-Region.svs"]
    tissue = next((p for p in sources if p.exists()), None)
    if tissue is None:
        pytest.skip("no real slide to build full-size slides from (run make demo, or put ../shared/data beside)")
    tiles = shared / "kather2016"
    paths = bench_slides(FULLSIZE_DIR, tissue, tiles if (tiles / "tiles.csv").exists() else None)
    return {p.stem: p for p in paths}
