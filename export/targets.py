"""One function per export target, as a table: what files each writes and how to run them.

Every builder starts from the FP32 ONNX graph (``onnx_graph.export_onnx``) and returns a
``Built``: the bundle files by role, the runtime settings the gate must run with (and the
edge runner will), what quantization was done, and a session to run the gate on.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lowmag.errors import LowmagError
from lowmag.runtimes import Session, open_model

logger = logging.getLogger(__name__)

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
#: OpenVINO on CPUs with bf16 units runs bf16 unless told otherwise: FP32 and INT8 bundles
#: record the f32 hint (INT8 layers stay int8), FP16 bundles leave the device its fast path.
OPENVINO_CONFIG = {
    "fp32": {"INFERENCE_PRECISION_HINT": "f32"},
    "fp16": {},
    "int8": {"INFERENCE_PRECISION_HINT": "f32"},
}


@dataclass
class Built:
    files: dict[str, str]
    runtime: dict[str, Any]
    session: Callable[[], Session]
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildInputs:
    """What a builder may need besides the FP32 graph."""

    precision: str
    calibration: Sequence[np.ndarray] = ()
    calibration_method: str = "minmax"
    int8_activations: str = "auto"  # auto: uint8 for ONNX Runtime, int8 for TensorRT
    threads: int | None = None
    target_mpp: float = 1.0
    profile: Any = None  # lowmag.tensorrt.ProfileShapes for TensorRT
    nncf_preset: str = "performance"  # OpenVINO INT8


def _int8_onnx(work: Path, fp32: Path, inputs: BuildInputs, activations: str) -> tuple[Path, dict[str, Any]]:
    from lowmag.calibration.quantize import quantize_onnx_qdq

    out = work / ONNX_FILES["int8"]
    info = quantize_onnx_qdq(fp32, out, inputs.calibration, inputs.calibration_method, activations)
    return out, info


def build_onnx(work: Path, fp32: Path, inputs: BuildInputs) -> Built:
    """ONNX for ONNX Runtime: FP32 as exported, FP16 weights/activations, or Q/DQ INT8."""
    quantization = None
    name = ONNX_FILES[inputs.precision]
    if inputs.precision == "fp32":
        shutil.copyfile(fp32, work / name)
    elif inputs.precision == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # Inputs stay uint8 and logits float32; normalisation statistics stay float32
        # (InstanceNormalization in fp16 loses the variance of flat tissue).
        model = convert_float_to_float16(
            onnx.load(str(fp32)), keep_io_types=True, op_block_list=["InstanceNormalization"]
        )
        _drop_duplicate_casts(model)
        onnx.save(model, str(work / name))
        quantization = {"tool": "onnxruntime.transformers.float16", "kept_fp32": ["InstanceNormalization"]}
    else:
        activations = "uint8" if inputs.int8_activations == "auto" else inputs.int8_activations
        _, quantization = _int8_onnx(work, fp32, inputs, activations)
    settings = {"threads": inputs.threads}
    return Built(
        files={"model": name},
        runtime={"onnxruntime": {}},
        session=lambda: open_model(work / name, "onnxruntime", threads=inputs.threads),
        quantization=quantization,
        extra=settings,
    )


def _drop_duplicate_casts(model) -> None:
    """The converter adds one Cast per blocked node after each float16 input, named after
    that input, so a constant shared by several InstanceNormalization nodes gets identical
    casts defining the same tensor twice, which ONNX Runtime refuses. Keep the first."""
    defined: set[tuple[str, ...]] = set()
    keep = []
    for node in model.graph.node:
        key = tuple(node.output)
        if node.op_type == "Cast" and key in defined:
            continue
        defined.add(key)
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def build_openvino(work: Path, fp32: Path, inputs: BuildInputs) -> Built:
    """OpenVINO IR converted from the ONNX graph; INT8 by NNCF post-training quantization."""
    import openvino as ov

    model = ov.convert_model(str(fp32))
    quantization = None
    if inputs.precision == "int8":
        from lowmag.calibration.quantize import quantize_openvino_nncf

        model, quantization = quantize_openvino_nncf(model, inputs.calibration, inputs.nncf_preset)
    elif inputs.precision == "fp16":
        quantization = {"tool": "openvino.save_model(compress_to_fp16=True)", "weights": "fp16"}
    ov.save_model(model, str(work / "model.xml"), compress_to_fp16=inputs.precision == "fp16")
    config = dict(OPENVINO_CONFIG[inputs.precision])
    return Built(
        files={"model": "model.xml", "weights": "model.bin"},
        runtime={"openvino": {"config": config}},
        session=lambda: open_model(work / "model.xml", "openvino", threads=inputs.threads,
                                   settings={"config": config}),
        quantization=quantization,
    )


def build_tensorrt(work: Path, fp32: Path, inputs: BuildInputs) -> Built:
    """A TensorRT engine from the ONNX graph (INT8: explicit Q/DQ), with its sidecar.

    Never run on the project's machines (TensorRT does not install there): see README.
    """
    from lowmag.tensorrt import build_engine, default_profile

    quantization = None
    if inputs.precision == "int8":
        if inputs.int8_activations == "uint8":
            raise LowmagError("TensorRT's explicit quantization needs int8 symmetric activations; "
                              "drop --int8-activations uint8 for --target tensorrt.")
        onnx_path, quantization = _int8_onnx(work, fp32, inputs, "int8")
    else:
        onnx_path = work / ONNX_FILES["fp32"]
        shutil.copyfile(fp32, onnx_path)
    profile = inputs.profile or default_profile(inputs.target_mpp)
    sidecar = build_engine(onnx_path, work / "model.engine", precision=inputs.precision, profile=profile)
    return Built(
        files={"model": "model.engine", "onnx": onnx_path.name, "sidecar": "engine.json"},
        runtime={"tensorrt": {"profile": sidecar.get("profile")}},
        session=lambda: TensorRTSession(work / "model.engine"),
        quantization=quantization,
        extra={"engine": sidecar},
    )


BUILDERS: dict[str, Callable[[Path, Path, BuildInputs], Built]] = {
    "onnx": build_onnx,
    "openvino": build_openvino,
    "tensorrt": build_tensorrt,
}


class TensorRTSession:
    """Runs a serialized engine for the gate, with torch CUDA tensors as I/O buffers.

    Export hosts have torch with CUDA; the edge runner uses its own torch-free runner.
    Written against the TensorRT 10 Python API (named tensors, execute_async_v3); never run here.
    """

    backend = "tensorrt"

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt
        import torch

        self.torch = torch
        logger_ = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger_)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(pixels)).cuda()
        self.context.set_input_shape("pixels", tuple(x.shape))
        self.context.set_tensor_address("pixels", x.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {name: value.cpu().numpy() for name, value in outputs.items()}
