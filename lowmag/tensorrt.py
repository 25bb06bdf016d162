"""TensorRT for lowmag bundles: will TensorRT take this ONNX, build an engine, may it run here.

- ``check_tensorrt_onnx`` reads a graph with the ``onnx`` package only, so CI on the CPU
  machines learns whether TensorRT's ONNX parser will accept a bundle before anyone owns a
  GPU; ``cast_uint8_inputs_first`` fixes the one problem torch-exported graphs have.
- ``build_engine`` builds an engine with the official TensorRT Python API (imported only
  inside the functions that need it) and writes ``engine.json`` beside it.
- An engine runs only with the TensorRT version and on the GPU model it was built for
  ("by default, TensorRT engines are compatible only with the version of TensorRT used to
  build them"; without hardware-compatibility mode "engines are not portable across
  different GPU architectures": docs.nvidia.com/deeplearning/tensorrt/latest/
  getting-started/support-matrix.html). ``engine.json`` records both; ``engine_mismatches``
  compares it with ``current_environment``; ``prepare_engine`` returns the bundle's engine,
  refuses it, or builds one into a machine-local cache, never into the hash-checked bundle.

Torch-free and importable without ``onnx`` or ``tensorrt``: the edge runner uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from lowmag.bundle import INPUT_NAME
from lowmag.errors import EngineMismatchError, LowmagError, TensorRTUnavailableError
from lowmag.io import atomic_open, atomic_write_text, sha256_file

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_FILENAME = "model.engine"
SIDECAR_FILENAME = "engine.json"
#: The ONNX an engine of each precision is built from (int8: the Q/DQ model).
ONNX_FILENAMES = {"fp32": "model.onnx", "fp16": "model.onnx", "int8": "model.int8.onnx"}
ENVIRONMENT_FIELDS = ("tensorrt_version", "cuda_version", "gpu_name", "compute_capability", "driver_version")
SIDECAR_FIELDS = (*ENVIRONMENT_FIELDS, "precision", "profile", "onnx_sha256", "engine_sha256", "built_at")

# ---------------------------------------------------------------------------------------
# What TensorRT's ONNX parser accepts, from onnx-tensorrt's support matrix
# https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md as of TensorRT 10.15
# ("supports operators in the inclusive range of opset 9 to opset 24"; the TensorRT 10.0
# page says "opset 9 to opset 20"). Rows marked N there are left out. The 10.x release that
# added an operator is from docs/Changelog.md of that repository; every other operator is
# taken to be there since 10.0 (not checked against the 10.0 page, which we could not read).
_OPSETS_DOCUMENTED = {(10, 0): (9, 20), (10, 15): (9, 24)}
_ADDED_AFTER_10_0 = {
    "DeformConv": (10, 1), "BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4),
    "STFT": (10, 5), "Attention": (10, 14), "RMSNormalization": (10, 15), "RotaryEmbedding": (10, 15),
    "TensorScatter": (10, 15),
}
TENSORRT_ONNX_OPS: dict[str, tuple[int, int]] = {op: (10, 0) for op in """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
    GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
    Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
    Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
    Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split()} | _ADDED_AFTER_10_0
# Restrictions the same page states for operators a ResNet export contains.
_AXES_MUST_BE_CONSTANT = {"Squeeze", "Unsqueeze", *(op for op in TENSORRT_ONNX_OPS if op.startswith("Reduce"))}
_POOLS = {"MaxPool", "AveragePool", "LpPool"}  # "dilations must be empty or all ones"
#: Network input types. "UINT8 is only supported as network input or output tensor types",
#: and then it must feed a Cast directly (see cast_uint8_inputs_first).
_INPUT_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL", "UINT8")
#: Cast's documented types; DOUBLE has "limited support" (cast down to FLOAT) and passes.
_CAST_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "UINT8", "BOOL", "DOUBLE")


def check_tensorrt_onnx(model: onnx.ModelProto | str | Path, min_trt: str = "10.0") -> list[str]:
    """Problems TensorRT ``min_trt`` (or a newer 10.x) would have parsing ``model``; [] if none.

    Checks what the parser documents: the default-domain opset; every node's operator,
    including If/Loop/Scan bodies and local functions; custom domains (read only as plugins,
    and lowmag ships none); input types, and uint8 inputs that feed anything but a Cast
    (refused even for Transpose or Shape); Q/DQ nodes (int8, zero point 0, per-tensor or
    per-channel scales > 0); and per-operator rules (constant ``axes``, 2-D/3-D pooling
    without dilation or MaxPool indices). Passing is necessary, not sufficient: only
    building an engine on a GPU proves a graph.
    """
    import onnx

    version = _parse_trt_version(min_trt)
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    types, constants = _tensor_types(model), _constant_values(model)
    functions = {(f.domain, f.name) for f in model.functions}
    nodes = list(_walk_nodes(model))
    problems = _check_opset(model, version) + _check_inputs(model, nodes)
    for where, node in nodes:
        problems += _check_node(where, node, version, functions, types, constants)
    return problems


def cast_uint8_inputs_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose uint8 inputs feed one Cast(to float) and nothing else.

    torch's exporter writes ``pixels -> Transpose -> Cast`` and ``Shape(pixels)`` for the
    dynamic batch, but TensorRT takes a uint8 input only straight into a Cast ("All UINT8
    inputs must directly feed into a cast layer in TensorRT. No other layers support UINT8
    inputs, even just data-movement ops like reshape / transpose": NVIDIA/TensorRT issue
    3985; the Shape operator's documented types leave out uint8 too). Casting first and
    transposing the float tensor gives bit-identical results (the old Cast becomes
    float-to-float), so every runtime can share the rewritten graph. Top-level readers only.
    """
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    graph = fixed.graph
    initializers = {init.name for init in graph.initializer}
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= {value.name for value in graph.input}
    for value in graph.input:
        if value.name in initializers or value.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
            continue
        readers = [node for node in graph.node if value.name in node.input and not _is_float_cast(node)]
        if not readers:
            continue
        cast_name = _unused_name(f"{value.name}_float", taken)
        for node in readers:
            node.input[:] = [cast_name if name == value.name else name for name in node.input]
        graph.node.insert(0, onnx.helper.make_node(
            "Cast", [value.name], [cast_name], name=f"{cast_name}_cast", to=onnx.TensorProto.FLOAT))
    # What the rerouted readers produce is float now: drop stale uint8 annotations.
    keep = [v for v in graph.value_info if v.type.tensor_type.elem_type != onnx.TensorProto.UINT8]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return fixed


def _parse_trt_version(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)*\s*", str(text))
    if not match:
        raise LowmagError(f"TensorRT version {text!r} is not MAJOR.MINOR, e.g. 10.0")
    version = (int(match.group(1)), int(match.group(2)))
    if version < (10, 0):
        raise LowmagError(f"TensorRT {text}: lowmag's compatibility table covers TensorRT 10.0 and newer")
    return version


def _walk_nodes(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.NodeProto]]:
    """(location, node) for every node: the graph, nested subgraphs, local functions."""
    import onnx

    def walk(nodes: Any, where: str) -> Iterator[tuple[str, onnx.NodeProto]]:
        for node in nodes:
            yield where, node
            for attr in node.attribute:
                bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for body in bodies:
                    yield from walk(body.node, f"{where}{node.op_type} {node.name!r} > {attr.name}: ")

    yield from walk(model.graph.node, "")
    for function in model.functions:
        yield from walk(function.node, f"function {function.domain}::{function.name}: ")


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX shape inference can type (best effort)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError) as error:  # ValueError: over 2 GB
        log.debug("shape inference failed (%s); checking with declared types only", error)
        inferred = model
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def _constant_values(model: onnx.ModelProto) -> dict[str, Any]:
    """Initializers and Constant-node outputs (anywhere) as numpy arrays."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for _, node in _walk_nodes(model):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _check_opset(model: onnx.ModelProto, version: tuple[int, int]) -> list[str]:
    low, high = _OPSETS_DOCUMENTED[max(v for v in _OPSETS_DOCUMENTED if v <= version)]
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not opsets:
        return ["the model imports no default-domain (ai.onnx) opset; TensorRT parses standard ONNX"]
    if not low <= opsets[0] <= high:
        return [f"default-domain opset {opsets[0]} is outside opsets {low}-{high}, the range TensorRT "
                f"{version[0]}.{version[1]} parses (onnx-tensorrt operators.md); export within that range"]
    return []


def _check_inputs(model: onnx.ModelProto, nodes: list[tuple[str, onnx.NodeProto]]) -> list[str]:
    import onnx

    problems = []
    initializers = {init.name for init in model.graph.initializer}
    allowed = {getattr(onnx.TensorProto, name) for name in _INPUT_TYPES}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
            problems.append(f"input {value.name!r} is not a tensor of known rank, which TensorRT needs")
            continue
        if tensor.elem_type not in allowed:
            problems.append(f"input {value.name!r} is {_type_name(tensor.elem_type)}; TensorRT network "
                            f"inputs must be one of {', '.join(_INPUT_TYPES)}")
        readers = [f"{node.op_type} {node.name!r}" for _, node in nodes
                   if value.name in node.input and not _is_float_cast(node)]
        if tensor.elem_type == onnx.TensorProto.UINT8 and readers:
            problems.append(
                f"uint8 input {value.name!r} is read by {', '.join(readers)}; TensorRT accepts a uint8 "
                "input only when it feeds a Cast to float directly (no other layer takes uint8, not even "
                "Transpose or Shape). Fix: lowmag.tensorrt.cast_uint8_inputs_first(model) before saving")
    return problems


def _check_node(where: str, node: onnx.NodeProto, version: tuple[int, int], functions: set[tuple[str, str]],
                types: dict[str, int], constants: dict[str, Any]) -> list[str]:
    import onnx

    at, op = f"{where}node {node.name!r} ({node.op_type})", node.op_type
    if node.domain not in ("", "ai.onnx"):
        if (node.domain, op) in functions:
            return []  # a local function: its body is checked node by node
        return [f"{at} is in custom domain {node.domain!r}; TensorRT's parser reads such nodes only as "
                "plugins and lowmag ships none: export with standard ONNX operators"]
    since = TENSORRT_ONNX_OPS.get(op)
    if since is None:
        return [f"{at}: {op} is not in TensorRT's ONNX operator support matrix (onnx-tensorrt operators.md)"]
    if since > version:
        return [f"{at}: TensorRT's parser supports {op} from {since[0]}.{since[1]} on, "
                f"newer than {version[0]}.{version[1]}"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    problems = []
    axes = node.input[1] if op in _AXES_MUST_BE_CONSTANT and len(node.input) > 1 else ""
    if axes and axes not in constants:
        problems.append(f"{at}: its axes input must be an initializer or Constant for TensorRT")
    if op in _POOLS:
        if len(attrs.get("kernel_shape", ())) not in (2, 3):
            problems.append(f"{at}: TensorRT pools in 2-D or 3-D only")
        if any(d != 1 for d in attrs.get("dilations", ())):
            problems.append(f"{at}: TensorRT needs pooling dilations empty or all ones")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            problems.append(f"{at}: TensorRT does not produce MaxPool's Indices output")
    if op == "Cast" and attrs.get("to") not in {getattr(onnx.TensorProto, name) for name in _CAST_TYPES}:
        problems.append(f"{at}: TensorRT cannot cast to {_type_name(attrs.get('to', 0))}")
    if op == "Constant" and set(attrs) & {"sparse_value", "value_string", "value_strings"}:
        problems.append(f"{at}: TensorRT does not take sparse or string constants")
    if op in ("QuantizeLinear", "DequantizeLinear"):
        problems += _check_qdq(at, node, attrs, types, constants)
    return problems


def _check_qdq(at: str, node: onnx.NodeProto, attrs: dict[str, Any], types: dict[str, int],
               constants: dict[str, Any]) -> list[str]:
    """TensorRT quantizes symmetrically: "zeroPt must only contain zero-valued coefficients";
    "The scale value must be a scalar for per-tensor quantization, a 1D tensor for
    per-channel ... All scale coefficients must have strictly positive values"
    (IQuantizeLayer, TensorRT 10 C++ API). DequantizeLinear takes INT8, FP8, FP4 and INT4
    (operators.md); the lowmag recipe is int8."""
    import numpy as np
    import onnx

    problems = []
    x, scale = node.input[0], node.input[1]
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "QuantizeLinear":  # ONNX's default quantized type is uint8
        qtype = types.get(zero, 0) if zero else attrs.get("output_dtype", 0) or onnx.TensorProto.UINT8
    else:
        qtype = types.get(x, 0) or (types.get(zero, 0) if zero else 0)
    if not qtype and zero in constants:
        qtype = onnx.helper.np_dtype_to_tensor_dtype(constants[zero].dtype)
    if qtype and qtype != onnx.TensorProto.INT8:
        fix = {onnx.TensorProto.INT32: " (a quantized bias: TensorRT dequantizes only int8/fp8/int4/fp4; "
                                       "quantize with onnxruntime extra_options={'QuantizeBias': False})",
               onnx.TensorProto.UINT8: " (asymmetric uint8; quantize with QuantType.QInt8 and "
                                       "ActivationSymmetric/WeightSymmetric=True)"}.get(qtype, "")
        problems.append(f"{at}: quantized type is {_type_name(qtype)}; TensorRT Q/DQ here must be int8{fix}")
    if zero is not None and zero not in constants:
        problems.append(f"{at}: zero point {zero!r} is computed at run time; TensorRT needs a constant 0")
    elif zero is not None and np.any(constants[zero] != 0):
        values = sorted({int(v) for v in np.unique(constants[zero]) if v != 0})[:4]
        problems.append(f"{at}: zero point {zero!r} holds {values}; TensorRT supports only symmetric "
                        "quantization (zero point 0)")
    if scale in constants:
        values = np.asarray(constants[scale])
        if values.ndim > 1:
            problems.append(f"{at}: scale {scale!r} has shape {values.shape}; int8 needs per-tensor (scalar) "
                            "or per-channel (1-D) scales")
        if values.size and not np.all(values > 0):
            problems.append(f"{at}: scale {scale!r} has values <= 0; TensorRT needs strictly positive scales")
        if values.ndim == 1 and values.size > 1 and x in constants:
            axis, shape = attrs.get("axis", 1), np.shape(constants[x])
            if not -len(shape) <= axis < len(shape) or shape[axis] != values.size:
                problems.append(f"{at}: {values.size} per-channel scales do not match axis {axis} of "
                                f"{x!r} {shape}")
    return problems


def _is_float_cast(node: onnx.NodeProto) -> bool:
    import onnx

    if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return False
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return to in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _type_name(elem: int) -> str:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(elem)
    except ValueError:
        return f"type {elem}"


def _unused_name(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


# ---------------------------------------------------------------------------------------
# Optimization profile: the input shapes an engine accepts.

@dataclass(frozen=True)
class ProfileShapes:
    """Smallest, tuned-for and largest NHWC ``pixels`` shapes of one optimization profile.

    TensorRT's dynamic shapes need, per input, the range an engine must serve; it tunes
    its kernels for ``opt`` and reserves memory for ``max``.
    """

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        problems = []
        for name in ("min", "opt", "max"):
            shape = getattr(self, name)
            try:
                dims = tuple(operator.index(d) for d in shape)
            except TypeError:
                raise LowmagError(f"TensorRT profile: {name} shape must be 4 integers (N, H, W, 3), "
                                  f"got {shape!r}") from None
            if len(dims) != 4 or min(dims) < 1:
                problems.append(f"{name} shape must be 4 positive integers (N, H, W, 3), got {dims}")
            elif dims[3] != 3:
                problems.append(f"{name} shape must have 3 (RGB) channels last, got {dims}")
            object.__setattr__(self, name, dims)
        if not problems:
            for axis, label in enumerate(("batch", "height", "width")):
                if not self.min[axis] <= self.opt[axis] <= self.max[axis]:
                    problems.append(f"{label} must satisfy min <= opt <= max, got "
                                    f"{self.min[axis]}, {self.opt[axis]}, {self.max[axis]}")
        if problems:
            raise LowmagError("TensorRT profile: " + "; ".join(problems))

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileShapes:
        if not isinstance(data, Mapping) or set(data) != {"min", "opt", "max"}:
            raise LowmagError(f"TensorRT profile must be an object with min, opt and max, got {data!r}")
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))

    def __str__(self) -> str:
        return ":".join("x".join(map(str, shape)) for shape in (self.min, self.opt, self.max))


def default_profile(target_mpp: float, *, max_batch: int = 8, min_side_px: int = 16,
                    typical_um: float = 1500.0, max_um: float = 8000.0) -> ProfileShapes:
    """A profile sized from tissue, not from pixels.

    A student reads slides at its own µm/px, so how many pixels a piece spans depends on
    the model: at 2 µm/px a typical 1.5 mm biopsy is 750 px. ``min`` is one
    ``min_side_px`` square, the smallest input the exported graph is traced for (16 px,
    e.g. a 150 px tile at 8x fewer pixels), left unrounded; ``opt`` is one ``typical_um`` piece at batch 1, since pieces differ in size
    and are classified one per call; ``max`` is ``max_batch`` pieces of ``max_um`` (a large
    resection fragment). ``opt`` and ``max`` sides round up to a multiple of 32. ``max`` also sets the memory
    the engine reserves: the ResNet stem alone holds 64 x N x H x W bytes in fp32, 8 GB
    for 8 x 4000 x 4000 px, so lower ``max_batch`` or ``max_um`` at fine µm/px.
    """
    if not (isinstance(target_mpp, (int, float)) and math.isfinite(target_mpp) and target_mpp > 0):
        raise LowmagError(f"target µm/px must be a positive number, got {target_mpp!r}")
    if max_batch < 1 or min_side_px < 1:
        raise LowmagError(f"max_batch and min_side_px must be >= 1, got {max_batch}, {min_side_px}")
    if not 0 < typical_um <= max_um:
        raise LowmagError(f"need 0 < typical_um <= max_um, got {typical_um}, {max_um}")

    def side(px: float) -> int:
        return max(32, 32 * math.ceil(px / 32 - 1e-9))

    low = min_side_px  # the smallest piece the exported graph takes (onnx_graph.MIN_SIDE)
    typical = max(low, side(typical_um / target_mpp))
    high = max(typical, side(max_um / target_mpp))
    stem_gb = 64 * max_batch * high * high / 1e9
    if stem_gb > 8:
        log.warning("TensorRT profile max %dx%dx%dx3 at %g µm/px: the ResNet stem alone needs ~%.0f GB; "
                    "consider a smaller max_batch or max_um", max_batch, high, high, target_mpp, stem_gb)
    return ProfileShapes((1, low, low, 3), (1, typical, typical, 3), (max_batch, high, high, 3))


def parse_profile(text: str) -> ProfileShapes:
    """``MIN:OPT:MAX`` NHWC shapes, e.g. ``1x64x64x3:4x512x512x3:8x2048x2048x3`` (a CLI option)."""
    example = "e.g. 1x32x32x3:1x768x768x3:8x4000x4000x3"
    parts = str(text).strip().split(":")
    if len(parts) != 3:
        raise LowmagError(f"TensorRT profile {text!r}: expected three NxHxWx3 shapes MIN:OPT:MAX, {example}")
    shapes = []
    for label, part in zip(("min", "opt", "max"), parts):
        dims = part.strip().lower().split("x")
        if len(dims) != 4 or not all(d.strip().isdigit() for d in dims):
            raise LowmagError(f"TensorRT profile {text!r}: {label} shape {part!r} is not NxHxWx3, {example}")
        shapes.append(tuple(int(d) for d in dims))
    return ProfileShapes(*shapes)


# ---------------------------------------------------------------------------------------
# The machine: which TensorRT and GPU an engine is built with or would run on.

def current_environment() -> dict[str, str | None]:
    """TensorRT version and GPU identity of this machine; None for whatever is not found.

    The GPU is nvidia-smi's first (or the first of CUDA_VISIBLE_DEVICES). ``cuda_version``
    is the CUDA runtime's when cuda-python is installed, else the newest CUDA the driver
    supports (nvidia-smi's header). Never raises.
    """
    env: dict[str, str | None] = dict.fromkeys(ENVIRONMENT_FIELDS)
    try:
        import tensorrt as trt

        env["tensorrt_version"] = str(trt.__version__)
    except (ImportError, OSError) as error:  # OSError: the wheel is there, its libraries are not
        log.debug("tensorrt not importable: %s", error)
    env.update(_nvidia_smi_gpu())
    env["cuda_version"] = _cuda_runtime_version() or env["cuda_version"]
    return env


def _nvidia_smi_gpu() -> dict[str, str | None]:
    found: dict[str, str | None] = dict.fromkeys(ENVIRONMENT_FIELDS[1:])
    smi = shutil.which("nvidia-smi")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible is not None else None
    if smi is None or (first is not None and (not first or first.startswith("-"))):
        return found  # no tool, or CUDA told to see no GPU
    select = [f"--id={first}"] if first else []
    for fields in (("name", "compute_cap", "driver_version"), ("name", "driver_version")):  # old drivers
        out = _run([smi, *select, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"])
        values = [v.strip() for v in out.strip().splitlines()[0].split(",")] if out and out.strip() else []
        if len(values) == len(fields):
            found.update(gpu_name=values[0], driver_version=values[-1])
            found["compute_capability"] = values[1] if len(fields) == 3 else None
            break
    match = re.search(r"CUDA Version:\s*([\d.]+)", _run([smi]) or "")
    found["cuda_version"] = match.group(1) if match else None
    return found


def _run(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.debug("%s failed: %s", command[0], error)
        return None
    return result.stdout if result.returncode == 0 else None


def _cuda_runtime_version() -> str | None:
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        status, version = cudart.cudaRuntimeGetVersion()
    except (ImportError, OSError, RuntimeError, AttributeError) as error:
        log.debug("CUDA runtime version unavailable: %s", error)
        return None
    return f"{version // 1000}.{(version % 1000) // 10}" if int(status) == 0 else None


def engine_mismatches(sidecar: Mapping[str, Any], environment: Mapping[str, Any]) -> list[str]:
    """Why an engine described by ``sidecar`` cannot run in ``environment``; [] if it can.

    An engine needs exactly its TensorRT version and the same GPU (name and compute
    capability); driver and CUDA versions may differ. Not knowing a value, here or in the
    sidecar, counts as a difference.
    """
    checks = (
        ("tensorrt_version", "TensorRT", "TensorRT is not importable here"),
        ("gpu_name", "GPU", "no NVIDIA GPU found (nvidia-smi missing or failing)"),
        ("compute_capability", "GPU compute capability", "nvidia-smi reports no compute capability"),
    )
    problems = []
    for key, what, missing_here in checks:
        built, here = sidecar.get(key), environment.get(key)
        if not built:
            problems.append(f"{SIDECAR_FILENAME} does not record the {what} the engine was built with")
        elif not here:
            problems.append(f"engine built with {what} {built}, but {missing_here}")
        elif str(built) != str(here):
            problems.append(f"engine built with {what} {built}, this machine has {here}")
    return problems


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """A validated ``engine.json``; raises ``LowmagError`` naming the file and the fix."""
    path = Path(path)
    fix = "rebuild the engine (--rebuild-engine) or re-export the bundle"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LowmagError(f"{path}: not a readable engine sidecar ({error}); {fix}") from None
    if not isinstance(data, dict):
        raise LowmagError(f"{path}: must be a JSON object; {fix}")
    problems = [f"missing {k}" for k in SIDECAR_FIELDS if k not in data]
    problems += [f"unknown key {k!r}" for k in data if k not in SIDECAR_FIELDS]
    if data.get("precision") not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {data.get('precision')!r}")
    if problems:
        raise LowmagError(f"{path}: " + "; ".join(problems) + f"; {fix}")
    ProfileShapes.from_dict(data["profile"])
    return data


# ---------------------------------------------------------------------------------------
# Building engines.

def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as error:
        raise TensorRTUnavailableError(str(error)) from error
    return trt


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str, profile: ProfileShapes,
                 workspace_gib: float = 2.0) -> dict[str, Any]:
    """Build a TensorRT engine from ``onnx_path``; write it and ``engine.json`` beside it.

    fp32 and fp16 take the FP32 ONNX; fp16 is the FP16 builder flag on a weakly typed
    network (deprecated in TensorRT 10.12, removed in 11: there this raises), and fp32
    turns TF32 off so that it means fp32. int8 takes the Q/DQ ONNX and builds a strongly
    typed network with no precision flags, as TensorRT documents for explicit quantization
    ("Use explicit quantization with Strong Typing. Precision-control build flags are not
    required and should not be specified"); layers without Q/DQ then run in the ONNX's own
    type, FP32. The deprecated IInt8Calibrator is never used. Returns the sidecar written.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise LowmagError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(profile, ProfileShapes):
        raise LowmagError(f"profile must be a ProfileShapes, got {type(profile).__name__}")
    if not workspace_gib > 0:
        raise LowmagError(f"workspace_gib must be > 0, got {workspace_gib}")
    if not onnx_path.is_file():
        raise LowmagError(f"{onnx_path}: ONNX model not found")
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Networks are always explicit-batch in TensorRT 10 (EXPLICIT_BATCH is deprecated, ignored).
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(strongly_typed if precision == "int8" else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser) + _precheck(onnx_path, trt)
        raise LowmagError(f"{onnx_path}: TensorRT {trt.__version__} could not parse the model:\n"
                          + "\n".join(f"  - {e}" for e in errors))
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if list(inputs) != [INPUT_NAME] or len(inputs[INPUT_NAME]) != 4:
        raise LowmagError(f"{onnx_path}: expected one 4-D input {INPUT_NAME!r} (N, H, W, 3), got {inputs}; "
                          "export the model with export-student")
    qdq = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    quantized = any(network.get_layer(i).type in qdq for i in range(network.num_layers))
    if (precision == "int8") != quantized:
        raise LowmagError(f"{onnx_path}: {'has no' if precision == 'int8' else 'has'} Q/DQ nodes but the "
                          f"precision is {precision}; int8 engines are built from {ONNX_FILENAMES['int8']}, "
                          f"fp32 and fp16 ones from {ONNX_FILENAMES['fp32']}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise LowmagError(f"TensorRT {trt.__version__} has no FP16 builder flag (it is strongly typed "
                              "only); build fp16 engines with TensorRT 10.x")
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    shapes = builder.create_optimization_profile()
    shapes.set_shape(INPUT_NAME, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(shapes)

    log.info("building a %s engine with TensorRT %s from %s, profile %s", precision, trt.__version__,
             onnx_path, profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LowmagError(f"{onnx_path}: TensorRT {trt.__version__} failed to build a {precision} engine "
                          f"for profile {profile} (see its messages above); a smaller max shape or a "
                          "larger workspace_gib may help")
    with atomic_open(engine_path, "wb") as handle:
        handle.write(memoryview(serialized))
    sidecar = {**current_environment(), "tensorrt_version": str(trt.__version__), "precision": precision,
               "profile": profile.as_dict(), "onnx_sha256": sha256_file(onnx_path),
               "engine_sha256": sha256_file(engine_path),
               "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(engine_path.parent / SIDECAR_FILENAME, json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _parser_errors(parser: Any) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        name = error.node_name() if hasattr(error, "node_name") else ""
        op = error.node_operator() if hasattr(error, "node_operator") else ""
        where = f"node {error.node()} {name!r} ({op}): " if error.node() >= 0 else ""
        errors.append(f"{where}{error.desc()} [{error.code()}]")
    return errors


def _precheck(onnx_path: Path, trt: Any) -> list[str]:
    """lowmag's own findings, to explain a parser failure (when ``onnx`` is installed)."""
    try:
        problems = check_tensorrt_onnx(onnx_path, min_trt=str(trt.__version__))
    except (ImportError, LowmagError):
        return []
    return [f"lowmag's check also finds: {p}" for p in problems]


# ---------------------------------------------------------------------------------------
# Using a bundle's engine, or one built for this machine.

def engine_cache_dir() -> Path:
    """``$LOWMAG_CACHE_DIR/engines``, else ``~/.cache/lowmag/engines``."""
    root = os.environ.get("LOWMAG_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lowmag") / "engines"


def prepare_engine(bundle_dir: str | Path, *, rebuild: bool = False, cache_dir: str | Path | None = None,
                   environment: Mapping[str, Any] | None = None, precision: str | None = None,
                   profile: ProfileShapes | None = None) -> Path:
    """The engine file to deserialize for the bundle in ``bundle_dir``; call it after the
    bundle's hashes are verified.

    The bundle's own ``model.engine`` when its ``engine.json`` matches this machine;
    otherwise ``EngineMismatchError`` naming each difference, unless ``rebuild``: then an
    engine is built from the bundle's ONNX (``model.onnx``, or ``model.int8.onnx`` for
    int8) into ``cache_dir`` (default ``engine_cache_dir()``), in a folder keyed by the
    ONNX sha256, TensorRT version, compute capability, precision and a digest of GPU name
    and profile, and reused while it still matches. Files in the bundle are never written.
    Precision and profile come from the bundle's ``engine.json``; for a bundle exported
    without an engine, pass them (e.g. ``default_profile(spec.target_mpp)``).
    """
    bundle_dir = Path(bundle_dir)
    env = dict(current_environment() if environment is None else environment)
    engine, sidecar_path = bundle_dir / ENGINE_FILENAME, bundle_dir / SIDECAR_FILENAME
    if sidecar_path.is_file():
        sidecar = read_sidecar(sidecar_path)
        recorded = {"precision": sidecar["precision"], "profile": ProfileShapes.from_dict(sidecar["profile"])}
        asked = {"precision": precision, "profile": profile}
        clashes = [f"{k} {v} (the bundle's is {recorded[k]})" for k, v in asked.items()
                   if v is not None and v != recorded[k]]
        if clashes:
            raise LowmagError(f"{sidecar_path}: asked for {', '.join(clashes)}; leave them unset")
        precision, profile = recorded["precision"], recorded["profile"]
        differences = engine_mismatches(sidecar, env)
        if not engine.is_file():
            differences.append(f"{ENGINE_FILENAME} is missing from the bundle")
        elif not differences and sha256_file(engine) != sidecar["engine_sha256"]:
            differences.append(f"{ENGINE_FILENAME} does not match the engine_sha256 in {SIDECAR_FILENAME}")
        if not differences:
            return engine
    else:
        differences = [f"the bundle has no TensorRT engine ({SIDECAR_FILENAME} missing)"]
    if not rebuild:
        raise EngineMismatchError(engine, differences)
    if precision not in PRECISIONS or profile is None:
        raise LowmagError(f"{bundle_dir}: has no {SIDECAR_FILENAME}, so building an engine needs a precision "
                          f"({', '.join(PRECISIONS)}) and a profile: pass both")
    onnx_path = bundle_dir / ONNX_FILENAMES[precision]
    if not onnx_path.is_file():
        raise LowmagError(f"{onnx_path}: not found; {precision} engines are built from it. Re-export the bundle")
    log.info("the bundle's engine is unusable here (%s); using the engine cache", "; ".join(differences))
    cache_root = Path(cache_dir) if cache_dir else engine_cache_dir()
    return _cached_engine(onnx_path, precision, profile, env, cache_root)


def _cached_engine(onnx_path: Path, precision: str, profile: ProfileShapes, env: Mapping[str, Any],
                   cache_root: Path) -> Path:
    if not env.get("tensorrt_version"):
        raise TensorRTUnavailableError(f"needed to build an engine from {onnx_path}")
    if not env.get("gpu_name") or not env.get("compute_capability"):
        raise LowmagError(f"{onnx_path}: no NVIDIA GPU found (nvidia-smi); engines are built on the GPU that "
                          "runs them")
    onnx_sha = sha256_file(onnx_path)
    digest = hashlib.sha256(json.dumps([env["gpu_name"], profile.as_dict()]).encode()).hexdigest()[:8]
    key = f"{onnx_sha[:16]}-trt{env['tensorrt_version']}-sm{env['compute_capability']}-{precision}-{digest}"
    folder = cache_root / re.sub(r"[^A-Za-z0-9._-]", "_", key)
    engine, sidecar_path = folder / ENGINE_FILENAME, folder / SIDECAR_FILENAME
    if engine.is_file() and sidecar_path.is_file():
        try:
            cached = read_sidecar(sidecar_path)
        except LowmagError as error:
            log.warning("rebuilding a cached engine with a broken sidecar: %s", error)
        else:
            same_build = (cached["onnx_sha256"] == onnx_sha and cached["precision"] == precision
                          and ProfileShapes.from_dict(cached["profile"]) == profile)
            intact = sha256_file(engine) == cached["engine_sha256"]
            if same_build and intact and not engine_mismatches(cached, env):
                log.info("reusing the cached TensorRT engine %s", engine)
                return engine
    sidecar = build_engine(onnx_path, engine, precision=precision, profile=profile)
    built_elsewhere = engine_mismatches(sidecar, env)
    if built_elsewhere:  # e.g. CUDA_VISIBLE_DEVICES chose another GPU than `environment` describes
        raise EngineMismatchError(engine, built_elsewhere)
    return engine
