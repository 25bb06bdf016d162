"""Run a TensorRT engine without torch: the edge runner's NVIDIA GPU backend.

The CUDA stream and device buffers come from cuda-python's runtime bindings, so a scanner
workstation needs ``tensorrt`` and ``cuda-python`` (``lowmag[tensorrt]``), never torch.
Written against the TensorRT 10 Python API (named I/O tensors, ``execute_async_v3``).
Which engine file to run (the bundle's, or one rebuilt for this GPU) is
``lowmag.tensorrt.prepare_engine``'s decision; this module only runs it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from lowmag.bundle import INPUT_NAME
from lowmag.errors import LowmagError, TensorRTUnavailableError
from lowmag.runtimes import _batch
from lowmag.tensorrt import _import_tensorrt

log = logging.getLogger(__name__)

#: numpy types of the TensorRT data types an engine's I/O may have (bf16, fp8, int4 have none).
_NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


class TensorRTRuntimeError(LowmagError):
    """An engine that cannot be loaded or run here: a CUDA call or TensorRT itself failed."""


class CudaPythonUnavailableError(TensorRTUnavailableError):
    """TensorRT is importable but cuda-python, which provides the GPU buffers, is not."""

    def __init__(self, detail: str) -> None:
        LowmagError.__init__(self, f"cuda-python is not installed here ({detail}); the torch-free TensorRT "
                                   "runner needs it: pip install 'lowmag[tensorrt]'")


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as error:
            raise CudaPythonUnavailableError(str(error)) from error
    return cudart


def tensorrt_runtime_available() -> bool:
    """Whether TensorRT, cuda-python and at least one CUDA device are here (backend
    auto-selection); never raises."""
    try:
        _import_tensorrt()
        cudart = _import_cudart()
        status, count = cudart.cudaGetDeviceCount()
        return status == cudart.cudaError_t.cudaSuccess and count > 0
    except (LowmagError, ImportError, OSError, RuntimeError, AttributeError, TypeError, ValueError) as error:
        log.debug("TensorRT runtime unavailable: %s", error)
        return False


_trt_logger: Any = None


def _logger(trt: Any) -> Any:
    global _trt_logger  # one logger per process: TensorRT warns when runtimes get different ones
    if _trt_logger is None:
        _trt_logger = trt.Logger(trt.Logger.WARNING)
    return _trt_logger


class TensorRTEngineSession:
    """A deserialized engine on one GPU with its own stream and reusable device buffers.

    Buffers grow to the largest batch seen and are kept for later calls; ``close()`` (or
    leaving a ``with`` block) frees them. One session serves one thread at a time.
    """

    backend = "tensorrt"
    _cudart: Any = None  # set as __init__ goes, so close() can undo a half-finished one
    _stream: Any = None
    _context: Any = None

    def __init__(self, engine_path: str | Path, device: int = 0) -> None:
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.engine_path, self.device = Path(engine_path), int(device)
        trt = _import_tensorrt()
        self._cudart = _import_cudart()
        if not self.engine_path.is_file():
            raise TensorRTRuntimeError(f"{self.engine_path}: TensorRT engine file not found")
        self._call("cudaSetDevice", self.device)
        self._stream = self._call("cudaStreamCreate")
        self._runtime = trt.Runtime(_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise TensorRTRuntimeError(
                f"{self.engine_path}: TensorRT {trt.__version__} could not load this engine (see its messages "
                "above); an engine runs only with the TensorRT version and GPU it was built for. Fix: "
                "--rebuild-engine (lowmag.tensorrt.prepare_engine(..., rebuild=True))")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise TensorRTRuntimeError(f"{self.engine_path}: could not create an execution context "
                                       f"(out of GPU memory on device {self.device}?)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME]:
            raise TensorRTRuntimeError(f"{self.engine_path}: expected one input {INPUT_NAME!r}, got {inputs}; "
                                       "build engines from bundles made by export-student")
        self._types = {n: self._numpy_type(n) for n in names}
        if self._types[INPUT_NAME] != np.uint8:
            raise TensorRTRuntimeError(f"{self.engine_path}: input {INPUT_NAME!r} is {self._types[INPUT_NAME]}, "
                                       "not uint8 pixels; rebuild the engine from a current export")
        self.output_names = tuple(n for n in names if n not in inputs)
        self.settings = {"engine": str(self.engine_path), "device": self.device,
                         "tensorrt_version": str(trt.__version__)}

    def _numpy_type(self, name: str) -> Any:
        dtype = self._engine.get_tensor_dtype(name)
        found = _NUMPY_TYPES.get(getattr(dtype, "name", str(dtype)))
        if found is None:
            raise TensorRTRuntimeError(f"{self.engine_path}: tensor {name!r} has type {dtype}, which numpy "
                                       f"cannot hold; lowmag engines use {', '.join(_NUMPY_TYPES)}")
        return np.dtype(found)

    def _call(self, function: str, *args: Any) -> Any:
        """A cudart function's result; raises naming the engine unless it returned cudaSuccess."""
        cudart = self._cudart
        try:
            status, *values = getattr(cudart, function)(*args)
        except RuntimeError as error:  # cuda-python raises when it cannot load the NVIDIA driver
            raise TensorRTRuntimeError(f"{self.engine_path}: {function} failed: {error}") from error
        if status != cudart.cudaError_t.cudaSuccess:
            raise TensorRTRuntimeError(f"{self.engine_path}: {function} failed on CUDA device {self.device} "
                                       f"with {getattr(status, 'name', status)}")
        return values[0] if values else None

    def _bind(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                self._call("cudaFree", pointer)
                del self._buffers[name]
            pointer, size = int(self._call("cudaMalloc", nbytes)), nbytes
            self._buffers[name] = (pointer, size)
        self._context.set_tensor_address(name, pointer)
        return pointer

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for a uint8 batch (N, H, W, 3) within the engine's profile."""
        if self._context is None:
            raise TensorRTRuntimeError(f"{self.engine_path}: the session is closed")
        pixels = _batch(pixels)
        cudart = self._cudart
        self._call("cudaSetDevice", self.device)  # the current device is per host thread
        if not self._context.set_input_shape(INPUT_NAME, pixels.shape):
            low, _, high = (tuple(s) for s in self._engine.get_tensor_profile_shape(INPUT_NAME, 0))
            raise TensorRTRuntimeError(f"{self.engine_path}: input shape {pixels.shape} is outside the engine's "
                                       f"profile {low} .. {high}; rebuild the engine with a wider profile")
        address = self._bind(INPUT_NAME, pixels.nbytes)
        self._call("cudaMemcpyAsync", address, pixels.ctypes.data, pixels.nbytes,
                   cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream)
        outputs = {}
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TensorRTRuntimeError(f"{self.engine_path}: output {name!r} has no fixed shape {shape}")
            outputs[name] = np.empty(shape, self._types[name])
            self._bind(name, max(outputs[name].nbytes, 1))
        if not self._context.execute_async_v3(int(self._stream)):
            raise TensorRTRuntimeError(f"{self.engine_path}: TensorRT execution failed (see its messages above)")
        for name, host in outputs.items():
            self._call("cudaMemcpyAsync", host.ctypes.data, self._buffers[name][0], host.nbytes,
                       cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream)
        self._call("cudaStreamSynchronize", self._stream)
        return outputs

    def close(self) -> None:
        """Free the device buffers and the stream; idempotent, never raises."""
        self._context = self._engine = self._runtime = None  # TensorRT objects before their memory
        cudart = self._cudart
        if cudart is None:
            return
        for pointer, _ in getattr(self, "_buffers", {}).values():
            self._release(cudart.cudaFree, pointer)
        self._buffers = {}
        if self._stream is not None:
            self._release(cudart.cudaStreamDestroy, self._stream)
            self._stream = None

    def _release(self, function: Any, handle: Any) -> None:
        try:
            (status,) = function(handle)
        except (RuntimeError, TypeError, ValueError) as error:  # e.g. at interpreter exit
            status = error
        if status != self._cudart.cudaError_t.cudaSuccess:
            log.debug("%s: %s(%s) failed: %s", self.engine_path, function.__name__, handle, status)

    def __enter__(self) -> TensorRTEngineSession:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
