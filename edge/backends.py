"""Which runtime runs a bundle on this machine, and on which device.

``--backend auto`` runs a bundle on the runtime its parity gate measured, on the fastest
device present:

- ONNX bundles: ONNX Runtime, with the CUDA execution provider when onnxruntime-gpu
  and a GPU are present, else on the CPU;
- OpenVINO bundles: OpenVINO, on an OpenVINO GPU device when one is present, else the CPU;
- TensorRT bundles: TensorRT on the NVIDIA GPU (the engine is checked against this
  machine and rebuilt into the local cache on request); without TensorRT the bundle's
  ONNX file runs on ONNX Runtime instead.

Auto never moves a bundle to a runtime its gate did not measure, except that last
fallback; every fallback is logged as a warning, never silent. Naming a backend or a
device that is not available is an error. Torch-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lowmag.bundle import Bundle
from lowmag.errors import LowmagError
from lowmag.io import user_cache_dir
from lowmag.runtimes import OnnxRuntimeSession, OpenVinoSession, RuntimeUnavailableError, Session

logger = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "onnxruntime", "openvino", "tensorrt")
DEVICE_CHOICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class BackendChoice:
    """A runtime, a device and the model file it loads, with why it was chosen."""

    backend: str
    device: str  # "cpu" or "gpu"
    model: Path
    reason: str
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.backend} on {self.device} ({self.model.name})"


@lru_cache(maxsize=1)
def ort_cuda_available() -> bool:
    """Whether ONNX Runtime has CUDA here (asked once per process: it cannot change)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@lru_cache(maxsize=1)
def openvino_gpu_available() -> bool:
    """Whether OpenVINO sees a GPU (asked once per process: the probe starts a Core, ~0.3 s)."""
    try:
        import openvino as ov

        return any(d.startswith("GPU") for d in ov.Core().available_devices)
    except Exception:  # a broken driver must not stop a CPU run
        return False


def tensorrt_available() -> bool:
    try:
        from lowmag.tensorrt_runtime import tensorrt_runtime_available
    except ImportError:
        return False
    return tensorrt_runtime_available()


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def choose_backend(bundle: Bundle, backend: str = "auto", device: str = "auto") -> BackendChoice:
    """Pick runtime and device for ``bundle``; raises ``RuntimeUnavailableError`` when impossible."""
    if backend not in BACKEND_CHOICES:
        raise LowmagError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}.")
    if device not in DEVICE_CHOICES:
        raise LowmagError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)}.")
    target = bundle.target
    onnx = _onnx_file(bundle)
    if backend == "auto":
        backend = {"onnx": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}[target]
        if backend == "tensorrt" and (device == "cpu" or not tensorrt_available()):
            why = "--device cpu was asked for" if device == "cpu" else "TensorRT (or a CUDA GPU) is not available here"
            choice = _choose(bundle, "onnxruntime", device, onnx)
            warning = f"{bundle.directory}: a TensorRT bundle, but {why}; running its ONNX file on ONNX Runtime instead"
            return _with_warning(choice, warning)
        if backend == "onnxruntime" and not _installed("onnxruntime") and _installed("openvino"):
            choice = _choose(bundle, "openvino", device, onnx)
            return _with_warning(choice, f"{bundle.directory}: onnxruntime is not installed; running the ONNX "
                                         "file on OpenVINO, which its gate did not measure")
        return _choose(bundle, backend, device, onnx, auto=True)
    return _choose(bundle, backend, device, onnx)


def _onnx_file(bundle: Bundle) -> Path | None:
    if bundle.target == "onnx":
        return bundle.path("model")
    if "onnx" in bundle.files:
        return bundle.path("onnx")
    return None


def _with_warning(choice: BackendChoice, warning: str) -> BackendChoice:
    return BackendChoice(choice.backend, choice.device, choice.model, choice.reason, (warning, *choice.warnings))


def _choose(bundle: Bundle, backend: str, device: str, onnx: Path | None, auto: bool = False) -> BackendChoice:
    where = bundle.directory
    if backend == "tensorrt":
        if bundle.target != "tensorrt":
            raise RuntimeUnavailableError(
                f"{where}: --backend tensorrt needs a TensorRT bundle; export one with "
                "export-student CHECKPOINT --target tensorrt on the GPU host."
            )
        if device == "cpu":
            raise RuntimeUnavailableError(f"{where}: TensorRT runs on NVIDIA GPUs only; drop --device cpu.")
        if not tensorrt_available():
            raise RuntimeUnavailableError(
                f"{where}: TensorRT or a CUDA GPU is not available here; use --backend auto to run the "
                "bundle's ONNX file on ONNX Runtime, or pip install 'lowmag[tensorrt]' on an NVIDIA host."
            )
        return BackendChoice("tensorrt", "gpu", bundle.path("model"), "the bundle's TensorRT engine")

    if backend == "onnxruntime":
        if onnx is None:
            raise RuntimeUnavailableError(f"{where}: this {bundle.target} bundle has no ONNX file for ONNX Runtime; "
                                          "use --backend auto or --backend openvino.")
        cuda = ort_cuda_available()
        if device == "gpu" and not cuda:
            raise RuntimeUnavailableError(
                f"{where}: --device gpu needs onnxruntime-gpu and a CUDA GPU; neither is usable here. "
                "Use --device cpu (or auto)."
            )
        use_gpu = device == "gpu" or (device == "auto" and cuda)
        return BackendChoice("onnxruntime", "gpu" if use_gpu else "cpu", onnx,
                             "CUDA execution provider" if use_gpu else "CPU execution provider")

    # OpenVINO reads its own IR and ONNX files alike.
    model = bundle.path("model") if bundle.target == "openvino" else onnx
    if model is None:
        raise RuntimeUnavailableError(f"{where}: OpenVINO cannot read a TensorRT engine; use --backend auto.")
    gpu = openvino_gpu_available()
    if device == "gpu" and not gpu:
        raise RuntimeUnavailableError(f"{where}: --device gpu: OpenVINO sees no GPU here. Use --device cpu (or auto).")
    use_gpu = device == "gpu" or (device == "auto" and gpu)
    choice = BackendChoice("openvino", "gpu" if use_gpu else "cpu", model, "OpenVINO " + ("GPU" if use_gpu else "CPU"))
    if bundle.target != "openvino" and not auto:
        choice = _with_warning(choice, f"{where}: a {bundle.target} bundle run on OpenVINO, which its gate did not "
                                       "measure (in f32, as the gate computed); its results may differ slightly")
    return choice


def open_session(bundle: Bundle, choice: BackendChoice, threads: int | None = None,
                 rebuild_engine: bool = False) -> Session:
    """A session on the chosen runtime with the settings the bundle's gate measured."""
    settings: dict[str, Any] = dict(bundle.runtime_settings.get(choice.backend, {}))
    if choice.backend == "onnxruntime":
        if choice.device == "gpu":
            return OnnxRuntimeSession(choice.model, threads, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        # On the CPU the model is loaded from this machine's optimised copy (94 MB less held
        # by the 1.25x FP32 student's session, same outputs): runtimes.OnnxRuntimeSession.
        return OnnxRuntimeSession(choice.model, threads, ["CPUExecutionProvider"],
                                  optimized_cache=user_cache_dir("onnxruntime"))
    if choice.backend == "openvino":
        config = settings.get("config")
        if config is None and bundle.precision != "fp16":
            # Another target's bundle on OpenVINO: compute in f32 as its gate did (OpenVINO
            # would otherwise pick bf16 on CPUs that have it, and move the logits).
            config = {"INFERENCE_PRECISION_HINT": "f32"}
        return OpenVinoSession(choice.model, "GPU" if choice.device == "gpu" else "CPU", threads, config)
    from lowmag.tensorrt import prepare_engine
    from lowmag.tensorrt_runtime import TensorRTEngineSession

    engine = prepare_engine(bundle.directory, rebuild=rebuild_engine)
    return TensorRTEngineSession(engine)
