"""GFLOPs counted from the exported graph (torch-free) agree with distill-train's count."""

from __future__ import annotations

import pytest

from lowmag.edge.flops import model_gflops


def test_onnx_graph_count_matches_the_training_count(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from lowmag.export.onnx_graph import StudentGraph, export_onnx
    from lowmag.spec import ModelSpec, Normalization, new_provenance
    from lowmag.train.flops import forward_gflops
    from lowmag.train.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 4)
    spec = ModelSpec(classes=("a", "b", "c", "d"), target_mpp=1.0, architecture="resnet18",
                     normalization=Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
                     provenance=new_provenance())
    graph = StudentGraph(model, spec)
    path = export_onnx(graph, tmp_path / "model.onnx")
    for height, width in ((72, 72), (150, 230)):
        expected = forward_gflops(model, height, width)
        assert model_gflops(str(path), height, width) == pytest.approx(expected, rel=1e-3)
    # ResNet-18 at 224 px: the well-known 1.8 GFLOPs.
    assert model_gflops(str(path), 224, 224) == pytest.approx(1.82, abs=0.02)


def test_the_test_bundle_counts_its_single_matrix_product(tmp_path):
    pytest.importorskip("onnx")
    from tests.models import make_bundle

    bundle = make_bundle(tmp_path / "b")
    assert model_gflops(str(bundle / "model.onnx"), 64, 64) == pytest.approx(3 * 2 / 1e9)
