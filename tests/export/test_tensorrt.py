"""lowmag.tensorrt: TensorRT compatibility of real exported graphs, profiles, engine reuse.

The compatibility checks run on a real student graph exported the way the exporter does
(dynamo, opset 18, uint8 NHWC in, Transpose -> Cast -> Sub/Div in the graph) and on its
ONNX Runtime Q/DQ INT8 quantization. Engine building needs TensorRT and a GPU; only the
``gpu``-marked test builds real engines, and ``prepare_engine`` is tested with a stand-in
``build_engine`` (the one fake in this file).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lowmag import tensorrt as lt  # noqa: E402
from lowmag.errors import EngineMismatchError, LowmagError, TensorRTUnavailableError  # noqa: E402
from lowmag.tensorrt import (  # noqa: E402
    ProfileShapes,
    build_engine,
    cast_uint8_inputs_first,
    check_tensorrt_onnx,
    current_environment,
    default_profile,
    engine_mismatches,
    parse_profile,
    prepare_engine,
)

MEAN, STD = (0.7, 0.55, 0.7), (0.15, 0.2, 0.15)


@dataclass(frozen=True)
class Graphs:
    exported: Path  # as torch exports it: pixels -> Transpose -> Cast, and Shape(pixels)
    fp32: Path  # after cast_uint8_inputs_first
    int8: Path  # ORT static Q/DQ, symmetric int8, per-channel weights, float biases
    folder: Path


def _calibration(n: int = 4):
    rng = np.random.default_rng(0)
    images = iter([{"pixels": rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)} for _ in range(n)])

    class Reader:
        def get_next(self):
            return next(images, None)

    return Reader()


def quantize(fp32: Path, out: Path, **overrides) -> Path:
    """The brief's ORT recipe (QDQ, int8 symmetric, per-channel, Conv/Gemm/MatMul)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    options = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                   per_channel=True, op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                   extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    options.update(overrides)
    quantize_static(str(fp32), str(out), _calibration(), **options)
    return out


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Graphs:
    """A resnet18 student (3 classes) exported like export-student does; ~20 s, once."""
    import torch

    from lowmag.train.models import build_model

    class Student(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model("resnet18", 3).eval()
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255.0)

        def forward(self, pixels):
            x = (pixels.permute(0, 3, 1, 2).to(torch.float32) - self.mean) / self.std
            fmap = self.model.forward_features(x)
            return self.model.forward_head(fmap), fmap

    folder = tmp_path_factory.mktemp("trt-graphs")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        example = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
        dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("height", min=32),
                2: torch.export.Dim("width", min=32)}
        exported = folder / "exported.onnx"
        torch.onnx.export(Student().eval(), (example,), str(exported), dynamo=True, opset_version=18,
                          input_names=["pixels"], output_names=["logits", "features"],
                          dynamic_shapes={"pixels": dims}, verbose=False)
    finally:
        torch.set_num_threads(threads)
    fp32 = folder / "model.onnx"
    onnx.save(cast_uint8_inputs_first(onnx.load(str(exported))), str(fp32))
    int8 = quantize(fp32, folder / "model.int8.onnx",
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    return Graphs(exported, fp32, int8, folder)


def _run(path: Path, pixels: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})


def _rewrite(path: Path, out: Path, change) -> Path:
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(out))
    return out


def _initializer(model, name: str):
    return next(i for i in model.graph.initializer if i.name == name)


def _set(model, name: str, values: np.ndarray) -> None:
    _initializer(model, name).CopyFrom(onnx.numpy_helper.from_array(values, name))


# ---------------------------------------------------------------------------------------
# Compatibility of real graphs


def test_the_graph_as_torch_exports_it_is_refused_for_its_uint8_input(graphs):
    ops = [n.op_type for n in onnx.load(str(graphs.exported)).graph.node]
    assert ops.index("Transpose") < ops.index("Cast"), "the exporter's order this test is about"
    problems = check_tensorrt_onnx(graphs.exported)
    assert len(problems) == 1
    assert "uint8 input 'pixels'" in problems[0]
    assert "Transpose" in problems[0] and "Shape" in problems[0]
    assert "cast_uint8_inputs_first" in problems[0]


def test_casting_first_passes_and_computes_the_same_outputs(graphs):
    assert check_tensorrt_onnx(graphs.fp32) == []
    readers = [n.op_type for n in onnx.load(str(graphs.fp32)).graph.node if "pixels" in n.input]
    assert readers == ["Cast"]
    pixels = np.random.default_rng(3).integers(0, 256, (2, 96, 64, 3), dtype=np.uint8)
    for before, after in zip(_run(graphs.exported, pixels), _run(graphs.fp32, pixels)):
        np.testing.assert_array_equal(before, after)


def test_the_int8_qdq_graph_passes(graphs):
    model = onnx.load(str(graphs.int8))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert check_tensorrt_onnx(model) == []
    assert check_tensorrt_onnx(graphs.int8, min_trt="10.15") == []


def test_ort_quantized_biases_are_refused_with_the_option_that_avoids_them(graphs, tmp_path):
    default_bias = quantize(graphs.fp32, tmp_path / "bias.onnx")  # QuantizeBias left at ORT's default
    problems = check_tensorrt_onnx(default_bias)
    assert problems and all("INT32" in p and "QuantizeBias" in p for p in problems)
    assert any("fc.bias" in p for p in problems)


def test_asymmetric_uint8_quantization_is_refused(graphs, tmp_path):
    from onnxruntime.quantization import QuantType

    asymmetric = quantize(graphs.fp32, tmp_path / "uint8.onnx", activation_type=QuantType.QUInt8,
                          extra_options={"QuantizeBias": False})
    problems = check_tensorrt_onnx(asymmetric)
    assert any("UINT8" in p for p in problems)
    assert any("zero point" in p and "symmetric" in p for p in problems)


@pytest.mark.parametrize("change, expected", [
    ("zero_point", "zero point"),
    ("negative_scale", "strictly positive"),
    ("block_scale", "per-tensor (scalar) or per-channel (1-D)"),
    ("short_scale", "per-channel scales do not match axis 0"),
])
def test_qdq_parameters_trt_cannot_take_are_reported(graphs, tmp_path, change, expected):
    def mutate(model):
        dq = next(n for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized"))
        scale = onnx.numpy_helper.to_array(_initializer(model, dq.input[1]))
        if change == "zero_point":
            _set(model, dq.input[2], np.full(scale.shape, 3, dtype=np.int8))
        elif change == "negative_scale":
            _set(model, dq.input[1], -scale)
        elif change == "block_scale":
            _set(model, dq.input[1], scale.reshape(-1, 1))
        else:
            _set(model, dq.input[1], scale[:-1])

    problems = check_tensorrt_onnx(_rewrite(graphs.int8, tmp_path / "bad.onnx", mutate))
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------
# Compatibility of hand-made graphs: operators, domains, opsets, per-op restrictions


def _graph(nodes, inputs, outputs, opset: int = 18, initializers=(), value_type=onnx.TensorProto.FLOAT):
    helper = onnx.helper
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(name, value_type, [1, 3, 8, 8]) for name in inputs],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
        initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_custom_domain_and_unlisted_operators_are_refused():
    helper = onnx.helper
    model = _graph([helper.make_node("FancyNorm", ["x"], ["y"], domain="com.example", name="fancy"),
                    helper.make_node("Unique", ["y"], ["z"], name="uniq")], ["x"], ["z"])
    problems = check_tensorrt_onnx(model)
    assert len(problems) == 2
    assert "custom domain 'com.example'" in problems[0] and "'fancy'" in problems[0]
    assert "Unique is not in TensorRT's ONNX operator support matrix" in problems[1]


def test_operators_inside_subgraphs_are_checked():
    helper = onnx.helper
    then_branch = helper.make_graph([helper.make_node("Det", ["x"], ["d"], name="det")], "then", [],
                                    [helper.make_tensor_value_info("d", onnx.TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "else", [],
                                    [helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None)])
    cond = helper.make_tensor("cond", onnx.TensorProto.BOOL, [], [True])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch, name="branch")
    problems = check_tensorrt_onnx(_graph([node], ["x"], ["y"], initializers=[cond]))
    assert len(problems) == 1
    assert "If 'branch' > then_branch" in problems[0] and "Det" in problems[0]


def test_opsets_and_operators_are_judged_against_the_minimum_tensorrt():
    helper = onnx.helper
    model = _graph([helper.make_node("Relu", ["x"], ["y"])], ["x"], ["y"], opset=22)
    assert "outside opsets 9-20" in check_tensorrt_onnx(model, min_trt="10.0")[0]
    assert check_tensorrt_onnx(model, min_trt="10.15") == []
    deform = _graph([helper.make_node("DeformConv", ["x", "w", "o"], ["y"], name="dc")], ["x", "w", "o"], ["y"],
                    opset=19)
    assert "from 10.1 on" in check_tensorrt_onnx(deform, min_trt="10.0")[0]
    assert check_tensorrt_onnx(deform, min_trt="10.1") == []
    for bad in ("9.2", "ten", ""):
        with pytest.raises(LowmagError):
            check_tensorrt_onnx(model, min_trt=bad)


def test_documented_per_operator_restrictions():
    helper = onnx.helper
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p", "idx"], kernel_shape=[3, 3], dilations=[2, 2], name="pool"),
        helper.make_node("ReduceMean", ["p", "axes"], ["m"], name="mean"),  # axes from a graph input
        helper.make_node("Cast", ["m"], ["y"], to=onnx.TensorProto.INT8, name="cast"),
    ]
    model = _graph(nodes, ["x", "axes"], ["y"])
    problems = "\n".join(check_tensorrt_onnx(model))
    assert "dilations empty or all ones" in problems
    assert "Indices output" in problems
    assert "'mean' (ReduceMean): its axes input must be an initializer or Constant" in problems
    assert "cannot cast to INT8" in problems


def test_unsupported_input_types_are_refused():
    helper = onnx.helper
    model = _graph([helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.FLOAT)], ["x"], ["y"],
                   value_type=onnx.TensorProto.UINT16)
    assert "input 'x' is UINT16" in check_tensorrt_onnx(model)[0]


# ---------------------------------------------------------------------------------------
# Optimization profiles


def test_profile_shapes_are_validated():
    profile = ProfileShapes((1, 32, 32, 3), (1, 768, 768, 3), (8, 4000, 4000, 3))
    assert profile.as_dict() == {"min": [1, 32, 32, 3], "opt": [1, 768, 768, 3], "max": [8, 4000, 4000, 3]}
    assert ProfileShapes.from_dict(json.loads(json.dumps(profile.as_dict()))) == profile
    numpy_dims = ProfileShapes(*(np.array(s) for s in ((1, 32, 32, 3), (1, 64, 64, 3), (2, 64, 64, 3))))
    assert numpy_dims.max == (2, 64, 64, 3)
    for shapes, message in [
        (((1, 32, 32, 4), (1, 64, 64, 4), (2, 64, 64, 4)), "3 (RGB) channels last"),
        (((1, 64, 64, 3), (1, 32, 32, 3), (2, 64, 64, 3)), "height must satisfy min <= opt <= max"),
        (((1, 32, 32, 3), (4, 64, 64, 3), (2, 64, 64, 3)), "batch must satisfy"),
        (((1, 32, 32), (1, 64, 64, 3), (2, 64, 64, 3)), "4 positive integers"),
        (((0, 32, 32, 3), (1, 64, 64, 3), (2, 64, 64, 3)), "4 positive integers"),
        (((1, 32.5, 32, 3), (1, 64, 64, 3), (2, 64, 64, 3)), "4 integers"),
    ]:
        with pytest.raises(LowmagError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ProfileShapes(*shapes)


def test_default_profile_follows_tissue_size_at_the_model_resolution():
    # 2 µm/px: a 1.5 mm piece is 750 px -> 768; 8 mm is 4000 px (already a multiple of 32).
    assert default_profile(2.0) == ProfileShapes((1, 16, 16, 3), (1, 768, 768, 3), (8, 4000, 4000, 3))
    assert default_profile(1.0, max_batch=2) == ProfileShapes((1, 16, 16, 3), (1, 1504, 1504, 3), (2, 8000, 8000, 3))
    assert default_profile(8.0).opt == (1, 192, 192, 3) and default_profile(8.0).max == (8, 1024, 1024, 3)
    # Coarse µm/px: a typical piece is smaller than the smallest side, which wins.
    assert default_profile(200.0) == ProfileShapes((1, 16, 16, 3), (1, 32, 32, 3), (8, 64, 64, 3))
    assert default_profile(2.0, min_side_px=40).min == (1, 40, 40, 3)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(LowmagError, match="positive"):
            default_profile(bad)
    with pytest.raises(LowmagError):
        default_profile(2.0, typical_um=9000.0, max_um=8000.0)
    with pytest.raises(LowmagError):
        default_profile(2.0, max_batch=0)


def test_parse_profile_round_trips_and_names_what_is_wrong():
    text = "1x64x64x3:4x512x512x3:8x2048x2048x3"
    profile = parse_profile(text)
    assert profile == ProfileShapes((1, 64, 64, 3), (4, 512, 512, 3), (8, 2048, 2048, 3))
    assert str(profile) == text and parse_profile(str(default_profile(2.0))) == default_profile(2.0)
    assert parse_profile(" 1X64X64X3 : 1x64x64x3:1x64x64x3 ").min == (1, 64, 64, 3)
    for bad, message in [
        ("1x64x64x3:8x2048x2048x3", "expected three"),
        ("1x64x64:4x512x512x3:8x2048x2048x3", "min shape '1x64x64'"),
        ("1x64x64x3:4xabcx512x3:8x2048x2048x3", "opt shape"),
        ("1x64x64x3:4x512x512x3:8x-1x2048x3", "max shape"),
        ("1x64x64x4:4x512x512x4:8x2048x2048x4", "channels"),
        ("8x64x64x3:4x512x512x3:8x2048x2048x3", "batch must satisfy"),
    ]:
        with pytest.raises(LowmagError, match=message):
            parse_profile(bad)


# ---------------------------------------------------------------------------------------
# Environment and engine identity

H100 = {"tensorrt_version": "10.9.0.34", "cuda_version": "12.8", "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0", "driver_version": "570.124.06"}


def _sidecar(**changes) -> dict:
    profile = ProfileShapes((1, 32, 32, 3), (1, 768, 768, 3), (8, 4000, 4000, 3))
    return {**H100, "precision": "int8", "profile": profile.as_dict(), "onnx_sha256": "0" * 64,
            "engine_sha256": "0" * 64, "built_at": "2026-01-01T00:00:00+00:00", **changes}


def test_current_environment_never_fails_and_says_none_when_nothing_is_there(monkeypatch, tmp_path):
    env = current_environment()
    assert set(env) == set(lt.ENVIRONMENT_FIELDS)
    if shutil.which("nvidia-smi"):
        assert env["gpu_name"] and env["driver_version"]
    if importlib.util.find_spec("tensorrt") is None:
        assert env["tensorrt_version"] is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi to be found
    bare = current_environment()
    assert bare["gpu_name"] is None and bare["compute_capability"] is None and bare["driver_version"] is None


def test_engine_mismatches_names_each_difference():
    assert engine_mismatches(_sidecar(), H100) == []
    assert engine_mismatches(_sidecar(), {**H100, "driver_version": "575.0", "cuda_version": "12.9"}) == []
    other = {**H100, "tensorrt_version": "10.11.0.33", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
    problems = engine_mismatches(_sidecar(), other)
    assert problems == [
        "engine built with TensorRT 10.9.0.34, this machine has 10.11.0.33",
        "engine built with GPU NVIDIA H100 80GB HBM3, this machine has NVIDIA L4",
        "engine built with GPU compute capability 9.0, this machine has 8.9",
    ]
    same_arch = engine_mismatches(_sidecar(), {**H100, "gpu_name": "NVIDIA H100 PCIe"})
    assert same_arch == ["engine built with GPU NVIDIA H100 80GB HBM3, this machine has NVIDIA H100 PCIe"]
    nothing_here = engine_mismatches(_sidecar(), dict.fromkeys(lt.ENVIRONMENT_FIELDS))
    assert len(nothing_here) == 3 and "TensorRT is not importable here" in nothing_here[0]
    assert "no NVIDIA GPU found" in nothing_here[1]
    unrecorded = engine_mismatches(_sidecar(compute_capability=None), H100)
    assert unrecorded == ["engine.json does not record the GPU compute capability the engine was built with"]


# ---------------------------------------------------------------------------------------
# Using, refusing or rebuilding a bundle's engine


@pytest.fixture
def bundle(graphs, tmp_path) -> Path:
    """An int8 TensorRT bundle exported on an H100 (engine bytes stand in for a real plan)."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    shutil.copy(graphs.fp32, folder / "model.onnx")
    shutil.copy(graphs.int8, folder / "model.int8.onnx")
    (folder / "model.engine").write_bytes(b"h100 engine")
    sidecar = _sidecar(onnx_sha256=_sha(folder / "model.int8.onnx"), engine_sha256=_sha(folder / "model.engine"))
    (folder / "engine.json").write_text(json.dumps(sidecar))
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict:
    return {p.name: (_sha(p), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


class FakeBuild:
    """Stands in for build_engine (the real one needs TensorRT and a GPU): writes an engine
    and its engine.json as if built on ``environment``, and records each call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.environment: dict = {}

    def __call__(self, onnx_path, engine_path, *, precision, profile, workspace_gib=2.0) -> dict:
        onnx_path, engine_path = Path(onnx_path), Path(engine_path)
        self.calls.append({"onnx": onnx_path, "engine": engine_path, "precision": precision, "profile": profile})
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        engine_path.write_bytes(f"engine {len(self.calls)} for {self.environment['gpu_name']}".encode())
        sidecar = {**self.environment, "precision": precision, "profile": profile.as_dict(),
                   "onnx_sha256": _sha(onnx_path), "engine_sha256": _sha(engine_path),
                   "built_at": "2026-02-01T00:00:00+00:00"}
        (engine_path.parent / "engine.json").write_text(json.dumps(sidecar))
        return sidecar


@pytest.fixture
def builds(monkeypatch) -> FakeBuild:
    fake = FakeBuild()
    monkeypatch.setattr(lt, "build_engine", fake)
    return fake


L4 = {**H100, "tensorrt_version": "10.11.0.33", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}


def test_a_matching_engine_is_used_from_the_bundle(bundle, builds, tmp_path):
    assert prepare_engine(bundle, environment=H100, cache_dir=tmp_path / "cache") == bundle / "model.engine"
    assert builds.calls == [] and not (tmp_path / "cache").exists()


def test_an_engine_for_another_machine_is_refused_naming_each_difference(bundle, builds, tmp_path):
    with pytest.raises(EngineMismatchError) as caught:
        prepare_engine(bundle, environment=L4, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert "TensorRT 10.9.0.34, this machine has 10.11.0.33" in message
    assert "NVIDIA L4" in message and "8.9" in message
    assert "--rebuild-engine" in message and "re-export" in message
    assert len(caught.value.differences) == 3 and builds.calls == []


def test_a_tampered_engine_is_not_used(bundle, builds, tmp_path):
    (bundle / "model.engine").write_bytes(b"something else")
    with pytest.raises(EngineMismatchError, match="engine_sha256"):
        prepare_engine(bundle, environment=H100, cache_dir=tmp_path / "cache")


def test_rebuild_builds_into_the_cache_from_the_bundle_onnx_and_then_reuses_it(bundle, builds, tmp_path):
    cache = tmp_path / "cache"
    before = _snapshot(bundle)
    builds.environment = L4
    first = prepare_engine(bundle, rebuild=True, environment=L4, cache_dir=cache)
    assert len(builds.calls) == 1
    call = builds.calls[0]
    assert call["onnx"] == bundle / "model.int8.onnx" and call["precision"] == "int8"
    assert call["profile"] == ProfileShapes.from_dict(_sidecar()["profile"])
    assert first == call["engine"] and first.is_relative_to(cache) and first.name == "model.engine"
    assert _sha(bundle / "model.int8.onnx")[:16] in first.parent.name and "sm8.9" in first.parent.name
    assert _snapshot(bundle) == before, "the bundle's files must never change"

    again = prepare_engine(bundle, rebuild=True, environment=L4, cache_dir=cache)
    assert again == first and len(builds.calls) == 1, "a matching cached engine is reused"
    assert _snapshot(bundle) == before

    newer = {**L4, "tensorrt_version": "10.12.0.36"}
    builds.environment = newer
    third = prepare_engine(bundle, rebuild=True, environment=newer, cache_dir=cache)
    assert len(builds.calls) == 2 and third != first and first.is_file()


def test_a_tampered_cached_engine_is_rebuilt(bundle, builds, tmp_path):
    builds.environment = L4
    engine = prepare_engine(bundle, rebuild=True, environment=L4, cache_dir=tmp_path / "cache")
    engine.write_bytes(b"corrupt")
    assert prepare_engine(bundle, rebuild=True, environment=L4, cache_dir=tmp_path / "cache") == engine
    assert len(builds.calls) == 2


def test_a_bundle_without_an_engine_needs_precision_and_profile_to_build(bundle, builds, tmp_path, monkeypatch):
    for name in ("model.engine", "engine.json"):
        (bundle / name).unlink()
    with pytest.raises(EngineMismatchError, match="no TensorRT engine"):
        prepare_engine(bundle, environment=L4, cache_dir=tmp_path / "cache")
    with pytest.raises(LowmagError, match="pass both"):
        prepare_engine(bundle, rebuild=True, environment=L4, cache_dir=tmp_path / "cache")
    monkeypatch.setenv("LOWMAG_CACHE_DIR", str(tmp_path / "lowmag-cache"))
    builds.environment = L4
    engine = prepare_engine(bundle, rebuild=True, environment=L4, precision="fp16", profile=default_profile(2.0))
    assert builds.calls[0]["onnx"] == bundle / "model.onnx" and builds.calls[0]["precision"] == "fp16"
    assert engine.is_relative_to(tmp_path / "lowmag-cache" / "engines")


def test_rebuilding_needs_tensorrt_and_a_gpu(bundle, builds, tmp_path):
    no_trt = {**L4, "tensorrt_version": None}
    with pytest.raises(TensorRTUnavailableError, match="pypi.nvidia.com"):
        prepare_engine(bundle, rebuild=True, environment=no_trt, cache_dir=tmp_path / "cache")
    no_gpu = {**L4, "gpu_name": None, "compute_capability": None}
    with pytest.raises(LowmagError, match="no NVIDIA GPU"):
        prepare_engine(bundle, rebuild=True, environment=no_gpu, cache_dir=tmp_path / "cache")
    assert builds.calls == []


def test_precision_or_profile_that_contradict_the_bundle_are_refused(bundle, builds, tmp_path):
    with pytest.raises(LowmagError, match="precision fp32"):
        prepare_engine(bundle, rebuild=True, environment=L4, cache_dir=tmp_path / "cache", precision="fp32")


def test_a_broken_sidecar_names_the_file(bundle, builds, tmp_path):
    (bundle / "engine.json").write_text(json.dumps({**_sidecar(), "extra": 1, "precision": "int4"}))
    with pytest.raises(LowmagError, match=r"engine\.json: .*unknown key 'extra'.*precision must be one of"):
        prepare_engine(bundle, environment=H100, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------
# Building engines


def test_build_engine_checks_its_arguments_before_needing_tensorrt(graphs, tmp_path):
    profile = default_profile(2.0)
    with pytest.raises(LowmagError, match="precision must be one of"):
        build_engine(graphs.fp32, tmp_path / "e" / "model.engine", precision="int4", profile=profile)
    with pytest.raises(LowmagError, match="ProfileShapes"):
        build_engine(graphs.fp32, tmp_path / "e" / "model.engine", precision="fp32", profile="1x32x32x3")
    with pytest.raises(LowmagError, match="not found"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "e" / "model.engine", precision="fp32", profile=profile)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_engine_without_tensorrt_says_how_to_install_it(graphs, tmp_path):
    install = r"pip install 'lowmag\[tensorrt\]' --extra-index-url https://pypi\.nvidia\.com"
    with pytest.raises(TensorRTUnavailableError, match=install):
        build_engine(graphs.fp32, tmp_path / "e" / "model.engine", precision="fp32", profile=default_profile(2.0))
    assert not (tmp_path / "e").exists()


@pytest.mark.gpu
def test_builds_fp32_fp16_int8_engines_and_runs_one(graphs, tmp_path):
    # Never runs on the project's CPU machines: it needs an NVIDIA GPU and the tensorrt
    # wheel, which only installs from NVIDIA's index. Run it on a GPU host with
    # `pip install 'lowmag[tensorrt]' --extra-index-url https://pypi.nvidia.com`.
    trt = pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    profile = ProfileShapes((1, 32, 32, 3), (1, 64, 64, 3), (2, 128, 128, 3))
    here = current_environment()
    for precision, source in (("fp32", graphs.fp32), ("fp16", graphs.fp32), ("int8", graphs.int8)):
        engine = tmp_path / precision / "model.engine"
        sidecar = build_engine(source, engine, precision=precision, profile=profile)
        assert engine.is_file() and json.loads((engine.parent / "engine.json").read_text()) == sidecar
        assert sidecar["engine_sha256"] == _sha(engine) and sidecar["onnx_sha256"] == _sha(source)
        assert sidecar["precision"] == precision and engine_mismatches(sidecar, here) == []

    pixels = np.random.default_rng(5).integers(0, 256, (2, 96, 64, 3), dtype=np.uint8)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((tmp_path / "fp32" / "model.engine").read_bytes())
    context = engine.create_execution_context()
    device_pixels = torch.from_numpy(pixels).cuda()
    context.set_input_shape("pixels", tuple(pixels.shape))
    context.set_tensor_address("pixels", device_pixels.data_ptr())
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            assert engine.get_tensor_dtype(name) == trt.float32
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    expected_logits, expected_features = _run(graphs.fp32, pixels)
    np.testing.assert_allclose(outputs["logits"].cpu().numpy(), expected_logits, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(outputs["features"].cpu().numpy(), expected_features, rtol=1e-3, atol=1e-3)
