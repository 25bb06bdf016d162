"""The torch-free TensorRT runner: refusals without TensorRT, its logic against stand-ins
for ``tensorrt`` and cuda-python's ``cudart`` (host memory posing as device memory), and,
on a GPU host, a real engine checked against ONNX Runtime."""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from lowmag import tensorrt_runtime
from lowmag.errors import TensorRTUnavailableError
from lowmag.tensorrt_runtime import (
    TensorRTEngineSession, TensorRTRuntimeError, tensorrt_runtime_available,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
WEIGHTS = np.arange(15, dtype=np.float32).reshape(3, 5) / 10 - 0.7


def reference(pixels: np.ndarray, weights: np.ndarray = WEIGHTS) -> np.ndarray:
    """What the test graph computes: mean colour per image, times a matrix."""
    return pixels.astype(np.float32).mean(axis=(1, 2)) @ weights


def pixels_of(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# Without TensorRT (the project's CPU machines).

@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_session_is_refused_and_the_probe_says_no(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not used")
    with pytest.raises(TensorRTUnavailableError, match=r"pip install 'lowmag\[tensorrt\]'"):
        TensorRTEngineSession(engine)
    assert tensorrt_runtime_available() is False


def test_importing_and_probing_does_not_import_torch():
    code = ("import sys; import lowmag.tensorrt_runtime as m; m.tensorrt_runtime_available(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------
# Stand-ins with the TensorRT 10 and cuda-python call conventions: every cudart function
# returns (cudaError_t, *values); "device" pointers are addresses of numpy blocks.

class FakeCudart:
    cudaError_t = enum.Enum("cudaError_t", "cudaSuccess cudaErrorMemoryAllocation cudaErrorNoDevice")
    cudaMemcpyKind = enum.Enum("cudaMemcpyKind", "cudaMemcpyHostToDevice cudaMemcpyDeviceToHost")

    def __init__(self, devices: int = 1) -> None:
        self.devices, self.fail = devices, None
        self.memory: dict[int, np.ndarray] = {}
        self.streams: set = set()
        self.mallocs: list[int] = []

    def _result(self, name: str, *values):
        if name == self.fail:
            return (self.cudaError_t.cudaErrorMemoryAllocation, *[None] * len(values))
        return (self.cudaError_t.cudaSuccess, *values)

    def cudaGetDeviceCount(self):
        return (self.cudaError_t.cudaSuccess, self.devices) if self.devices else (self.cudaError_t.cudaErrorNoDevice, 0)

    def cudaSetDevice(self, device):
        return self._result("cudaSetDevice")

    def cudaStreamCreate(self):
        stream = FakeStream(0x1000 + len(self.mallocs) + len(self.streams))
        self.streams.add(int(stream))
        return self._result("cudaStreamCreate", stream)

    def cudaStreamDestroy(self, stream):
        self.streams.remove(int(stream))
        return self._result("cudaStreamDestroy")

    def cudaStreamSynchronize(self, stream):
        return self._result("cudaStreamSynchronize")

    def cudaMalloc(self, nbytes):
        if self.fail == "cudaMalloc":
            return self._result("cudaMalloc", None)
        block = np.zeros(nbytes, np.uint8)
        self.memory[block.ctypes.data] = block
        self.mallocs.append(nbytes)
        return self._result("cudaMalloc", block.ctypes.data)

    def cudaFree(self, pointer):
        del self.memory[pointer]
        return self._result("cudaFree")

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert int(stream) in self.streams and isinstance(kind, self.cudaMemcpyKind)
        ctypes.memmove(dst, src, nbytes)
        return self._result("cudaMemcpyAsync")


class FakeStream(int):
    """cuda-python's cudaStream_t converts to the handle TensorRT takes with int()."""


PROFILE = ((1, 8, 8, 3), (1, 16, 16, 3), (4, 64, 64, 3))


def fake_tensorrt(input_type: str = "UINT8") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    trt.DataType = enum.Enum("DataType", "FLOAT HALF UINT8 BF16")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})

    class Context:
        def __init__(self) -> None:
            self.shape, self.addresses = None, {}

        def set_input_shape(self, name, shape):
            within = all(lo <= s <= hi for lo, s, hi in zip(PROFILE[0], shape, PROFILE[2]))
            self.shape = tuple(shape) if within else None
            return within

        def get_tensor_shape(self, name):
            return (self.shape[0], WEIGHTS.shape[1])

        def set_tensor_address(self, name, pointer):
            self.addresses[name] = pointer

        def execute_async_v3(self, stream_handle):
            assert type(stream_handle) is int
            count = int(np.prod(self.shape))
            pixels = np.frombuffer(ctypes.string_at(self.addresses["pixels"], count), np.uint8)
            logits = np.ascontiguousarray(reference(pixels.reshape(self.shape)), np.float32)
            ctypes.memmove(self.addresses["logits"], logits.ctypes.data, logits.nbytes)
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("pixels", "logits")[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "pixels" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType[input_type] if name == "pixels" else trt.DataType.FLOAT

        def get_tensor_profile_shape(self, name, profile):
            return PROFILE

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine() if blob == b"fake engine" else None

    trt.Runtime = Runtime
    return trt


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """Install the stand-ins; returns (cudart, engine path)."""
    cudart = FakeCudart()
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = cudart, bindings
    for name, module in {"tensorrt": fake_tensorrt(), "cuda": cuda, "cuda.bindings": bindings}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(tensorrt_runtime, "_trt_logger", None)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"fake engine")
    return cudart, engine


def test_runs_batches_of_any_shape_in_the_profile_and_grows_buffers_only_when_needed(fakes):
    cudart, engine = fakes
    assert tensorrt_runtime_available()
    with TensorRTEngineSession(engine) as session:
        assert session.output_names == ("logits",) and session.settings["tensorrt_version"] == "10.99.0"
        for seed, shape in enumerate([(2, 32, 24, 3), (1, 8, 8, 3), (4, 64, 64, 3), (3, 16, 40, 3)]):
            pixels = pixels_of(shape, seed)
            logits = session.run(pixels)["logits"]
            assert logits.dtype == np.float32 and logits.shape == (shape[0], 5)
            np.testing.assert_allclose(logits, reference(pixels), rtol=1e-6)
        # the input buffer grew twice (first and largest batch), the output buffer likewise
        assert sorted(cudart.mallocs) == sorted([2 * 32 * 24 * 3, 4 * 64 * 64 * 3, 2 * 5 * 4, 4 * 5 * 4])
        assert len(cudart.memory) == 2
    assert cudart.memory == {} and cudart.streams == set()
    with pytest.raises(TensorRTRuntimeError, match="closed"):
        session.run(pixels_of((1, 8, 8, 3)))
    session.close()  # idempotent


def test_shapes_outside_the_profile_and_non_pixel_input_are_refused(fakes):
    _, engine = fakes
    with TensorRTEngineSession(engine) as session:
        with pytest.raises(TensorRTRuntimeError, match=r"outside the engine's profile \(1, 8, 8, 3\) .. \(4, 64, 64, 3\)"):
            session.run(pixels_of((5, 16, 16, 3)))
        with pytest.raises(ValueError, match="uint8"):
            session.run(np.zeros((1, 16, 16, 3), np.float32))


def test_cuda_errors_and_unloadable_engines_name_the_engine_file(fakes, monkeypatch):
    cudart, engine = fakes
    cudart.fail = "cudaMalloc"
    session = TensorRTEngineSession(engine)
    with pytest.raises(TensorRTRuntimeError, match=rf"{engine.name}: cudaMalloc failed .* cudaErrorMemoryAllocation"):
        session.run(pixels_of((1, 16, 16, 3)))
    session.close()
    assert cudart.streams == set()
    cudart.fail = None
    engine.write_bytes(b"built for another GPU")
    with pytest.raises(TensorRTRuntimeError, match="could not load this engine.*--rebuild-engine"):
        TensorRTEngineSession(engine)
    with pytest.raises(TensorRTRuntimeError, match="not found"):
        TensorRTEngineSession(engine.with_name("missing.engine"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(input_type="BF16"))
    engine.write_bytes(b"fake engine")
    with pytest.raises(TensorRTRuntimeError, match="'pixels' has type .*BF16"):
        TensorRTEngineSession(engine)


def test_missing_cuda_python_or_gpu(fakes, monkeypatch):
    cudart, engine = fakes
    cudart.devices = 0
    assert tensorrt_runtime_available() is False
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(TensorRTUnavailableError, match=r"cuda-python is not installed.*pip install 'lowmag\[tensorrt\]'"):
        TensorRTEngineSession(engine)
    assert tensorrt_runtime_available() is False


# ---------------------------------------------------------------------------------------
# A real engine (GPU hosts with tensorrt and cuda-python).

def tiny_onnx(path: Path) -> Path:
    pytest.importorskip("onnx")
    from tests.models import mean_colour_onnx

    return mean_colour_onnx(path, WEIGHTS)


@pytest.mark.gpu
def test_a_real_engine_matches_onnx_runtime(tmp_path):
    pytest.importorskip("tensorrt")
    ort = pytest.importorskip("onnxruntime")
    if not tensorrt_runtime_available():
        pytest.skip("needs cuda-python and a CUDA device")
    from lowmag.tensorrt import ProfileShapes, build_engine

    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "model.engine"
    build_engine(onnx_path, engine, precision="fp32", profile=ProfileShapes(*PROFILE))
    cpu = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with TensorRTEngineSession(engine) as session:
        for seed, shape in enumerate([(1, 16, 16, 3), (4, 64, 48, 3), (2, 8, 8, 3)]):
            pixels = pixels_of(shape, seed)
            expected = cpu.run(["logits"], {"pixels": pixels})[0]
            logits = session.run(pixels)["logits"]
            np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(logits, reference(pixels), rtol=1e-3, atol=1e-3)
