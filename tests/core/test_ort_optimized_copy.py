"""ONNX Runtime sessions loaded from this machine's optimised copy of a model answer exactly
as sessions that optimise it themselves, and a missing, damaged or unwritable copy never
stops a session (issue 15, peak memory)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from lowmag.bundle import INPUT_NAME, LOGITS_NAME
from lowmag.runtimes import OnnxRuntimeSession

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def conv_net(path: Path) -> Path:
    """uint8 NHWC pixels -> two convolutions (16 and 32 channels: enough for ONNX Runtime's
    blocked-layout transforms) -> global pooling -> 4 logits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.1, (16, 3, 3, 3)), "b1": rng.normal(0, 0.1, 16),
        "w2": rng.normal(0, 0.1, (32, 16, 3, 3)), "b2": rng.normal(0, 0.1, 32),
        "fc": rng.normal(0, 0.1, (32, 4)), "fb": rng.normal(0, 0.1, 4),
        "scale": np.array([1 / 255.0]),
    }
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "scale"], ["s"]),
        helper.make_node("Transpose", ["s"], ["x"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["v"]),
        helper.make_node("Gemm", ["v", "fc", "fb"], [LOGITS_NAME]),
    ]
    graph = helper.make_graph(
        nodes, "conv_net",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["n", "h", "w", 3])],
        [helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def model(tmp_path):
    return conv_net(tmp_path / "net.onnx")


def logits(session: OnnxRuntimeSession) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [session.run(rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8))[LOGITS_NAME]
            for h, w in ((16, 16), (37, 90), (128, 64))]


def test_the_optimised_copy_is_made_once_and_answers_exactly_as_the_model(model, tmp_path):
    cache = tmp_path / "cache"
    plain = logits(OnnxRuntimeSession(model, threads=1))
    first = OnnxRuntimeSession(model, threads=1, optimized_cache=cache)
    copy = first.optimized_from
    assert copy is not None and copy.parent == cache and copy.is_file()
    assert [p.name for p in cache.iterdir()] == [copy.name]  # no partial file left
    made = copy.stat().st_mtime_ns
    second = OnnxRuntimeSession(model, threads=1, optimized_cache=cache)
    assert second.optimized_from == copy and copy.stat().st_mtime_ns == made  # loaded, not made again
    for a, b, c in zip(plain, logits(first), logits(second)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
        np.testing.assert_allclose(c, a, rtol=0, atol=1e-6)
    # The copy carries ONNX Runtime's own ops where it changed the layout: it is the optimised graph.
    assert onnx.load(str(copy)).graph.node != onnx.load(str(model)).graph.node


def test_another_model_gets_its_own_copy(model, tmp_path):
    cache = tmp_path / "cache"
    OnnxRuntimeSession(model, threads=1, optimized_cache=cache)
    (tmp_path / "other").mkdir()
    other = conv_net(tmp_path / "other" / "net.onnx")  # the same name, other weights
    data = onnx.load(str(other))
    data.graph.initializer[0].raw_data = bytes(len(data.graph.initializer[0].raw_data))  # other weights
    onnx.save(data, str(other))
    OnnxRuntimeSession(other, threads=1, optimized_cache=cache)
    assert len(list(cache.iterdir())) == 2


def test_a_damaged_copy_is_made_again(model, tmp_path, caplog):
    cache = tmp_path / "cache"
    copy = OnnxRuntimeSession(model, threads=1, optimized_cache=cache).optimized_from
    copy.write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING, logger="lowmag.runtimes"):
        again = OnnxRuntimeSession(model, threads=1, optimized_cache=cache)
    assert "does not load" in caplog.text and again.optimized_from == copy
    for a, b in zip(logits(OnnxRuntimeSession(model, threads=1)), logits(again)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def test_a_cache_that_cannot_be_written_falls_back_to_the_model(model, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="lowmag.runtimes"):
        session = OnnxRuntimeSession(model, threads=1, optimized_cache=blocker / "cache")
    assert session.optimized_from is None and "loading the model as it is" in caplog.text
    for a, b in zip(logits(OnnxRuntimeSession(model, threads=1)), logits(session)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def test_edge_classify_makes_the_copy_once_and_answers_the_same_with_or_without_it(tmp_path):
    import json

    from lowmag.synthetic import Blob, make_synthetic_slide
    from tests.edge.conftest import edge
    from tests.models import make_bundle

    slide = make_synthetic_slide(tmp_path / "s.tif", 1024, 768, mpp=0.5, blobs=[Blob(300, 380, 200, 250)])
    bundle = make_bundle(tmp_path / "bundle", "onnx", temperature=2.0)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    answers = []
    for i, cache in enumerate([tmp_path / "cache", tmp_path / "cache", blocker]):
        out = tmp_path / f"out{i}"
        done = edge("run", str(slide), "--model", str(bundle), "--out", str(out), "--threads", "1",
                    env={"LOWMAG_CACHE_DIR": str(cache)})
        assert done.returncode == 0, done.stderr
        answers.append(json.loads((out / "results" / "s.tif.json").read_text())["result"]["probabilities"])
        if i < 2:
            assert len(list((cache / "onnxruntime").glob("*.onnx"))) == 1
    assert "no optimised copy" in done.stderr  # the unwritable cache: said, and classified anyway
    assert answers[0] == answers[1] == answers[2]
