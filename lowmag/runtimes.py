"""Run an exported model with ONNX Runtime or OpenVINO: torch-free, used by export and edge.

Both take what the core reader yields: uint8 RGB pixels, here batched as (N, H, W, 3);
normalisation is inside the graph. Images of different sizes are run in groups of equal
shape (``run_images``), so whole tissue pieces keep their own size. The runtime settings
a bundle records (e.g. OpenVINO's ``INFERENCE_PRECISION_HINT``) are applied here, so the
edge runner computes exactly what the export's parity gate measured.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np

from lowmag.bundle import INPUT_NAME, LOGITS_NAME, Bundle
from lowmag.errors import LowmagError

logger = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "openvino")


class RuntimeUnavailableError(LowmagError):
    """The runtime a bundle needs is not installed or cannot load the model."""


class Session(Protocol):
    backend: str
    output_names: tuple[str, ...]

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for a uint8 batch (N, H, W, 3)."""


class OnnxRuntimeSession:
    """An ONNX Runtime inference session on the CPU (or another execution provider).

    ``optimized_cache``: a folder where the model, once optimised by ONNX Runtime at its full
    level on this machine, is kept and loaded from with no further optimisation. The full
    level's layout transforms make inference 23-43 % faster than the basic level, but a
    session optimising them holds the original weights beside the transformed ones: 147 MB
    for the 45 MB FP32 1.25x student, 53 MB when loaded from the optimised copy, with
    identical outputs (docs: README, issue 15's peak memory). The copy is tied to this
    machine (its layout depends on the CPU's vector width): its name holds the model's
    sha256, ONNX Runtime's version, the providers and the CPU's model and flags. A copy that
    cannot be written or loaded is skipped (the model is loaded as usual) and rebuilt.
    """

    backend = "onnxruntime"

    def __init__(self, model: Path, threads: int | None = None, providers: Sequence[str] | None = None,
                 optimized_cache: Path | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise RuntimeUnavailableError(
                f"{model}: onnxruntime is not installed; pip install 'lowmag[edge]'."
            ) from error
        self._ort = ort
        self._threads = threads
        self._providers = list(providers or ["CPUExecutionProvider"])
        self.optimized_from: Path | None = None
        self.session = self._open_optimized(Path(model), optimized_cache) if optimized_cache is not None else None
        if self.session is None:
            self.session = self._open(Path(model), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.settings = {"providers": self.session.get_providers(), "threads": threads}

    def _open(self, model: Path, level: Any, save_to: Path | None = None) -> Any:
        options = self._ort.SessionOptions()
        options.graph_optimization_level = level
        if self._threads:
            options.intra_op_num_threads = self._threads
            options.inter_op_num_threads = 1
        # Workers that spin between runs take the core the next piece's read needs: without
        # spinning the 1.25x student on the 20 x 15 mm slide took 691 ms instead of 783, and
        # its inference 489 instead of 582 (2 Xeon cores, edge-classify bench, 2 runs each).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        if save_to is not None:
            options.optimized_model_filepath = str(save_to)
        return self._ort.InferenceSession(str(model), sess_options=options, providers=self._providers)

    def _open_optimized(self, model: Path, cache: Path) -> Any:
        """A session from this machine's optimised copy of ``model``, made first if missing;
        None when that fails (logged), for the caller to load ``model`` itself."""
        import os

        from lowmag.io import sha256_file

        key = hashlib.sha256("|".join([sha256_file(model), self._ort.__version__, ",".join(self._providers),
                                       _cpu_identity()]).encode()).hexdigest()[:32]
        copy = cache / f"{model.stem}-{key}.onnx"
        disabled = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if copy.is_file():
            try:
                session = self._open(copy, disabled)
                self.optimized_from = copy
                return session
            except Exception as error:  # a damaged copy: made again below
                logger.warning("%s: the optimised copy %s does not load (%s); making it again", model, copy, error)
        partial = cache / f".{copy.name}.{os.getpid()}.partial"
        try:
            cache.mkdir(parents=True, exist_ok=True)
            maker = self._open(model, self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL, save_to=partial)
            del maker  # made only to write the copy: its memory is what the copy saves
            os.replace(partial, copy)
            session = self._open(copy, disabled)
            self.optimized_from = copy
            return session
        except Exception as error:
            logger.warning("%s: no optimised copy in %s (%s); loading the model as it is", model, cache, error)
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass
            return None

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(list(self.output_names), {INPUT_NAME: _batch(pixels)})
        return dict(zip(self.output_names, outputs))


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (Linux), else what ``platform`` says."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
        wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags")]
        return "|".join(dict.fromkeys(wanted))  # one CPU's lines (all cores repeat them)
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"


class OpenVinoSession:
    """An OpenVINO compiled model; ``config`` holds properties such as the precision hint."""

    backend = "openvino"

    def __init__(
        self, model: Path, device: str = "CPU", threads: int | None = None, config: Mapping[str, Any] | None = None
    ) -> None:
        try:
            import openvino as ov
        except ImportError as error:
            raise RuntimeUnavailableError(
                f"{model}: openvino is not installed; pip install 'lowmag[edge]'."
            ) from error
        properties: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", **dict(config or {})}
        if threads:
            properties["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(model), device, properties)
        self.request = self.compiled.create_infer_request()
        self.output_names = tuple(o.get_any_name() for o in self.compiled.outputs)
        self.settings = {"device": device, **properties}

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        result = self.request.infer({INPUT_NAME: _batch(pixels)})
        return {name: np.array(result[output]) for name, output in zip(self.output_names, self.compiled.outputs)}


def open_model(
    model: str | Path,
    backend: str,
    *,
    threads: int | None = None,
    settings: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> Session:
    """A session for one model file; ``settings`` are the bundle's recorded runtime settings."""
    model = Path(model)
    settings = dict(settings or {})
    if backend == "onnxruntime":
        if model.suffix != ".onnx":
            raise RuntimeUnavailableError(f"{model}: ONNX Runtime runs .onnx files; use an ONNX bundle.")
        return OnnxRuntimeSession(model, threads, settings.get("providers"))
    if backend == "openvino":
        return OpenVinoSession(model, device or "CPU", threads, settings.get("config"))
    raise RuntimeUnavailableError(f"{model}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")


def open_bundle(bundle: Bundle, backend: str | None = None, *, threads: int | None = None,
                device: str | None = None) -> Session:
    """A session for a verified bundle, with the runtime settings its gate was measured with."""
    backend = backend or {"onnx": "onnxruntime", "openvino": "openvino"}.get(bundle.target, "")
    if not backend:
        raise RuntimeUnavailableError(
            f"{bundle.directory}: a {bundle.target} bundle needs its own runtime (see lowmag.tensorrt)."
        )
    return open_model(bundle.path("model"), backend, threads=threads,
                      settings=bundle.runtime_settings.get(backend), device=device)


def shape_batches(images: Sequence[np.ndarray], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``images`` in batches of at most ``batch_size`` images of one shape."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start:start + batch_size]


def run_images(session: Session, images: Sequence[np.ndarray], batch_size: int = 32) -> dict[str, list[np.ndarray]]:
    """Outputs per image, in order; images of equal shape are batched together."""
    results: dict[str, list[Any]] = {}
    for chunk in shape_batches(images, batch_size):
        outputs = session.run(np.stack([images[i] for i in chunk]))
        for name, value in outputs.items():
            slots = results.setdefault(name, [None] * len(images))
            for row, i in enumerate(chunk):
                slots[i] = value[row]
    return results


def logits_of(session: Session, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """(N, classes) float32 logits for a list of uint8 images."""
    if not images:
        return np.zeros((0, 0), np.float32)
    return np.stack(run_images(session, images, batch_size)[LOGITS_NAME]).astype(np.float32)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities from logits scaled by a fitted temperature (calibrated confidences)."""
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _batch(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels (N, H, W, 3), got {pixels.dtype} {pixels.shape}")
    return np.ascontiguousarray(pixels)
