"""TensorRT for lowmag bundles: will TensorRT take this ONNX, build an engine, may it run here.

- ``check_tensorrt_onnx`` (in ``lowmag.tensorrt_onnx``, re-exported here) reads a graph
  with the ``onnx`` package only, so CI on the CPU machines learns whether TensorRT's ONNX
  parser will accept a bundle before anyone owns a GPU.
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
from typing import Any, Mapping

from lowmag.bundle import INPUT_NAME
from lowmag.errors import EngineMismatchError, LowmagError, TensorRTUnavailableError
from lowmag.io import atomic_open, atomic_write_text, sha256_file, user_cache_dir
from lowmag.tensorrt_onnx import TENSORRT_ONNX_OPS, cast_uint8_inputs_first, check_tensorrt_onnx

__all__ = [  # the ONNX check lives in tensorrt_onnx; callers import everything from here
    "TENSORRT_ONNX_OPS", "cast_uint8_inputs_first", "check_tensorrt_onnx", "ProfileShapes", "default_profile",
    "parse_profile", "current_environment", "engine_mismatches", "read_sidecar", "build_engine",
    "engine_cache_dir", "prepare_engine",
]


log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_FILENAME = "model.engine"
SIDECAR_FILENAME = "engine.json"
#: The ONNX an engine of each precision is built from (int8: the Q/DQ model).
ONNX_FILENAMES = {"fp32": "model.onnx", "fp16": "model.onnx", "int8": "model.int8.onnx"}
ENVIRONMENT_FIELDS = ("tensorrt_version", "cuda_version", "gpu_name", "compute_capability", "driver_version")
SIDECAR_FIELDS = (*ENVIRONMENT_FIELDS, "precision", "profile", "onnx_sha256", "engine_sha256", "built_at")


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
    return user_cache_dir("engines")


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
