"""The outputs of one slide (thumbnail PNG with its boxes, GeoJSON, JSON), on a full-size slide
with dozens of pieces: issue 15 asks that they never cost more than inference on a big slide."""

from __future__ import annotations

import numpy as np
import pytest

from lowmag.edge.backends import choose_backend
from lowmag.edge.pipeline import PieceResult, SlideClassification, Timer, shrink_to
from lowmag.edge.results import write_slide_outputs
from lowmag.slide import open_slide
from lowmag.tissue import find_tissue
from tests.bench.conftest import bench_slide_path
from tests.models import make_bundle

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize("name", ["cmu1-pyramid-tif", "fullsize-30x22mm"])
def test_write_outputs(benchmark, request: pytest.FixtureRequest, tmp_path, name: str) -> None:
    from lowmag.bundle import load_bundle

    bundle = load_bundle(make_bundle(tmp_path / "bundle", "onnx"))
    with open_slide(bench_slide_path(request, name)) as slide:
        finding = find_tissue(slide)
        info = slide.info
    rng = np.random.default_rng(0)
    pieces = [PieceResult(box, (box.width // 4, box.height // 4), 1, rng.dirichlet([1.0, 1.0]))
              for box in finding.boxes]
    result = SlideClassification(
        path=tmp_path / name, info=info, sha256="0" * 64, size_bytes=1, files=1, pieces=pieces,
        probabilities=np.mean([p.probabilities for p in pieces], axis=0), needs_review=False, timer=Timer(),
        thumbnail=shrink_to(finding.overview, 1024), classes=tuple(bundle.spec.classes))
    benchmark.group = "outputs of one slide (thumbnail PNG, GeoJSON, JSON)"
    benchmark.extra_info.update(slide=name, pieces=len(pieces))
    document = benchmark(write_slide_outputs, tmp_path / "out", name, result, bundle, choose_backend(bundle),
                         None, 0.6)
    assert len(document["tissue"]) == len(pieces)
