"""Will TensorRT's ONNX parser take this graph? Checked with the ``onnx`` package only.

CI runs on CPU machines where TensorRT cannot be installed, so every exported graph (FP32
and Q/DQ INT8) is checked here against what onnx-tensorrt documents for TensorRT 10.x;
``cast_uint8_inputs_first`` fixes the one problem torch-exported graphs have. Passing is
necessary, not sufficient: only building an engine on a GPU proves a graph.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lowmag.errors import LowmagError

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

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
