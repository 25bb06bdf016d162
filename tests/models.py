"""Tiny real models for tests that need a runnable bundle without training one.

``mean_colour_onnx`` is a genuine ONNX graph with the exported students' interface
(uint8 NHWC ``pixels`` in, float ``logits`` out): mean colour per image, times a matrix,
plus a bias. ``make_bundle`` wraps it in a bundle with a real ``lowmag.json`` (spec,
export section, sha256 of every file), as export-student writes them, for any target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from lowmag.spec import ModelSpec, Normalization, new_provenance, write_spec

#: Class 0 ("pink") wins where red exceeds green by more than 40 (stained tissue),
#: class 1 ("glass") on grey and white.
PINK_GLASS_WEIGHTS = np.array([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.0]], np.float32)
PINK_GLASS_BIAS = np.array([0.0, 4.0], np.float32)


def mean_colour_onnx(path: Path, weights: np.ndarray, bias: np.ndarray | None = None) -> Path:
    import onnx
    from onnx import TensorProto as tp
    from onnx import helper, numpy_helper

    classes = weights.shape[1]
    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=tp.FLOAT),
             helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
             helper.make_node("MatMul", ["mean", "weights"], ["scores" if bias is not None else "logits"])]
    initializers = [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
                    numpy_helper.from_array(weights.astype(np.float32), "weights")]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["scores", "bias"], ["logits"]))
        initializers.append(numpy_helper.from_array(bias.astype(np.float32), "bias"))
    graph = helper.make_graph(nodes, "mean_colour",
                              [helper.make_tensor_value_info("pixels", tp.UINT8, ["N", "H", "W", 3])],
                              [helper.make_tensor_value_info("logits", tp.FLOAT, ["N", classes])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what opset 18 needs; newer onnx writes IRs older runtimes refuse
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_bundle(directory: Path, target: str = "onnx", target_mpp: float = 2.0, temperature: float = 1.0,
                classes: Sequence[str] = ("pink", "glass"), weights: np.ndarray = PINK_GLASS_WEIGHTS,
                bias: np.ndarray | None = PINK_GLASS_BIAS, fingerprint: dict | None = None) -> Path:
    """A bundle folder for ``target`` (onnx, openvino, or tensorrt with a placeholder engine);
    ``fingerprint``: a training-data fingerprint (``lowmag.fingerprint``) for its spec."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = mean_colour_onnx(directory / "model.onnx", weights, bias)
    if target == "onnx":
        files, runtime = {"model": "model.onnx"}, {"onnxruntime": {}}
    elif target == "openvino":
        import openvino as ov

        ov.save_model(ov.convert_model(str(onnx_path)), str(directory / "model.xml"))
        onnx_path.unlink()
        files = {"model": "model.xml", "weights": "model.bin"}
        runtime = {"openvino": {"config": {"INFERENCE_PRECISION_HINT": "f32"}}}
    elif target == "tensorrt":
        (directory / "model.engine").write_bytes(b"not an engine: built on a GPU host")
        (directory / "engine.json").write_text(json.dumps({"tensorrt": "10.0", "precision": "fp32"}))
        files = {"model": "model.engine", "onnx": "model.onnx", "sidecar": "engine.json"}
        runtime = {"tensorrt": {}}
    else:
        raise ValueError(target)
    spec = ModelSpec(
        classes=tuple(classes), target_mpp=target_mpp,
        normalization=Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        architecture="mean-colour", provenance=new_provenance(config={"test": True}), temperature=temperature,
        export={"target": target, "files": files, "runtime": runtime,
                "inputs": {"name": "pixels", "dtype": "uint8", "layout": "NHWC RGB"}, "outputs": ["logits"]},
        fingerprint=fingerprint or {},
    )
    write_spec(spec.with_artifacts(directory, sorted(files.values())), directory)
    return directory
