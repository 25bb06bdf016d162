"""``export_student``: checkpoint in, verified bundle out, or nothing written at all.

Order of work: load and verify the checkpoint → export the FP32 ONNX graph → read the
real images (calibration set with held-out parity images, labeled evaluation and
validation sets) → build the target's files → run the gate (PyTorch next to the exported
model) → fit the temperature on the exported model's validation logits → write
``lowmag.json`` → move the finished folder into place. Everything happens in a hidden
sibling folder, so an interrupted or refused export leaves ``--out`` as it was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lowmag.errors import LowmagError
from lowmag.runtimes import logits_of
from lowmag.spec import ModelSpec, write_spec

logger = logging.getLogger(__name__)

TOOLS = ("torch", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "tensorrt", "numpy", "lowmag")


@dataclass(frozen=True)
class ExportOptions:
    target: str = "onnx"
    precision: str = "fp32"
    features: bool = False
    calibration: tuple[Path, ...] = ()
    calibration_mpp: float | None = None
    calibration_size: int = 500
    calibration_method: str = "minmax"
    int8_activations: str = "auto"
    nncf_preset: str = "performance"
    calibration_cache: Path | None = None
    patch_px: int = 224
    parity_images: int = 64
    eval_images: Path | None = None
    val_images: Path | None = None
    mpp: float | None = None
    center_crop: int | None = None
    fp32_tolerance: float = 1e-3
    max_f1_drop: float = 1.0
    allow_accuracy_drop: bool = False
    threads: int | None = None
    profile: Any = None
    force: bool = False
    seed: int = 0
    progress: bool = False
    refresh_fingerprint: bool = False


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _preflight(checkpoint: Path, out: Path, options: ExportOptions) -> None:
    problems = []
    if out.exists() and not options.force:
        problems.append(f"{out} already exists; choose another --out or pass --force to replace it")
    if options.precision == "int8" and not options.calibration:
        problems.append("INT8 needs real tissue to calibrate on: pass --calibration SLIDES_OR_IMAGES")
    if not options.calibration and not options.eval_images:
        problems.append(
            "an export proves itself on real images: pass --calibration (unlabeled slides or images) "
            "and/or --eval-images DIR --mpp X (labeled)"
        )
    if options.refresh_fingerprint and not options.calibration:
        problems.append("--refresh-fingerprint makes the fingerprint from the --calibration images: pass them")
    if (options.eval_images or options.val_images) and options.mpp is None:
        problems.append("--eval-images/--val-images need --mpp (their µm/px)")
    if options.nncf_preset != "performance" and not (options.target == "openvino" and options.precision == "int8"):
        problems.append("--nncf-preset sets how NNCF quantizes OpenVINO INT8 models: use it with --target openvino "
                        "--precision int8 (ONNX and TensorRT INT8 take --calibration-method)")
    if options.calibration_method != "minmax" and options.target == "openvino":
        problems.append("--calibration-method sets ONNX Runtime's INT8 ranges; OpenVINO INT8 is quantized by NNCF: "
                        "use --nncf-preset mixed instead")
    if options.target == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            problems.append(
                "TensorRT is not installed here; build TensorRT bundles on the GPU host that will run "
                "them (pip install 'lowmag[tensorrt]' there), or export --target onnx for ONNX Runtime"
            )
    if problems:
        raise LowmagError(f"{checkpoint}: cannot export: " + "; ".join(problems) + ".")


def _read_labeled(folder: Path, mpp: float, classes: Sequence[str], crop: int | None, target_mpp: float,
                  progress: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """A labeled class-folder read at the model's µm/px with the core reader (as in training)."""
    from lowmag.labeled import scan_image_folder

    _, items = scan_image_folder(folder, scan_mpp=mpp, classes=classes, crop_px=crop, require_all_classes=False)
    images = [item.read(target_mpp) for item in _progress(items, progress, f"reading {folder.name} at {target_mpp:g} µm/px")]
    return images, np.array([item.label for item in items], np.int64)


def _progress(items: Sequence[Any], enabled: bool, label: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="image", leave=False, disable=None)  # None: off when not a terminal


def _checkpoint_record(checkpoint: Path, spec: ModelSpec) -> dict[str, Any]:
    from lowmag.io import sha256_file

    return {
        "path": str(checkpoint.resolve()),
        "name": checkpoint.resolve().name,
        "spec_sha256": sha256_file(checkpoint / "lowmag.json"),
        "weights_sha256": dict(spec.artifacts),
        "architecture": spec.architecture,
        "git_sha": spec.provenance.git_sha,
    }


def export_student(checkpoint: str | Path, out: str | Path, options: ExportOptions) -> ModelSpec:
    """Export, gate and write a bundle; returns its spec. Raises ``LowmagError`` on refusal."""
    from lowmag.calibration.sampling import sample_calibration_set
    from lowmag.export import gate
    from lowmag.export.onnx_graph import EXPORTER, OPSET, StudentGraph, export_onnx, reference_logits
    from lowmag.export.targets import BUILDERS, BuildInputs
    from lowmag.provenance import git_sha
    from lowmag.tensorrt import check_tensorrt_onnx
    from lowmag.train.checkpoint import load_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    if checkpoint.name.endswith(".json"):
        checkpoint = checkpoint.parent
    _preflight(checkpoint, out, options)
    model, spec = load_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    scratch = tempfile.TemporaryDirectory(prefix="lowmag-onnx-")
    try:
        graph = StudentGraph(model, spec, features=options.features)
        fp32 = Path(scratch.name) / "model.onnx"
        logger.info("exporting the ONNX graph (%s)", EXPORTER)
        export_onnx(graph, fp32)

        calibration, holdout, calibration_manifest = [], [], None
        if options.calibration:
            cset = sample_calibration_set(
                options.calibration, spec.target_mpp,
                size=options.calibration_size if options.precision == "int8" or options.refresh_fingerprint else 0,
                holdout=options.parity_images, patch_px=options.patch_px, image_mpp=options.calibration_mpp,
                seed=options.seed, cache_dir=options.calibration_cache, progress=options.progress,
            )
            calibration, holdout, calibration_manifest = cset.images, cset.holdout, cset.manifest
        eval_set = val_set = None
        if options.eval_images:
            eval_set = _read_labeled(options.eval_images, options.mpp, spec.classes, options.center_crop,
                                     spec.target_mpp, options.progress)
        if options.val_images:
            val_set = _read_labeled(options.val_images, options.mpp, spec.classes, options.center_crop,
                                    spec.target_mpp, options.progress)

        inputs = BuildInputs(options.precision, calibration, options.calibration_method, options.int8_activations,
                             options.threads, spec.target_mpp, options.profile, options.nncf_preset)
        built = BUILDERS[options.target](work, fp32, inputs)
        session = built.session()

        # -- the gate -------------------------------------------------------------------
        parity_images = list(holdout) + (eval_set[0] if eval_set else [])
        reference = reference_logits(StudentGraph(model, spec), parity_images)
        exported = logits_of(session, parity_images)
        parity = gate.compare(reference, exported)
        accuracy = None
        if eval_set:
            n = len(holdout)
            accuracy = gate.accuracy_change(reference[n:], exported[n:], eval_set[1], len(spec.classes))
        policy = gate.GatePolicy(options.fp32_tolerance, options.max_f1_drop, options.allow_accuracy_drop)
        verdict = gate.judge(options.precision, parity, accuracy, policy, str(checkpoint), options.target)
        if verdict.get("warning"):
            logger.warning("%s (allowed by --allow-accuracy-drop)", verdict["warning"])

        temperature, temperature_record = 1.0, {"fitted": False, "why": "no --val-images given"}
        if val_set:
            from lowmag.calibration.temperature import fit_temperature

            temperature_record = {"fitted": True, "on": str(options.val_images),
                                  **fit_temperature(logits_of(session, val_set[0]), val_set[1])}
            if not temperature_record["trusted"]:
                # Typically a validation set the model (almost) never gets wrong: NLL keeps falling
                # as T -> 0, and applying such a T would make every prediction look certain.
                why = temperature_record["why_not_trusted"]
                logger.warning("%s: temperature %.3g not applied: %s (use a larger validation set "
                               "with some errors)", options.val_images, temperature_record["temperature"], why)
                temperature_record.update(applied=False, why=why)
            else:
                temperature_record["applied"] = True
                temperature = temperature_record["temperature"]

        if calibration_manifest is not None and options.precision == "int8":
            # What INT8 was calibrated on travels with the model, for audit.
            from lowmag.io import atomic_write_text

            atomic_write_text(work / "calibration.json", json.dumps(calibration_manifest, indent=1) + "\n")
            built.files["calibration_manifest"] = "calibration.json"
        onnx_files = [name for name in built.files.values() if name.endswith(".onnx")]
        trt_problems = {name: check_tensorrt_onnx(work / name) for name in onnx_files}
        del session
        export_section = {
            "target": options.target,
            "files": built.files,
            "runtime": built.runtime,
            "inputs": {"name": "pixels", "dtype": "uint8", "layout": "NHWC RGB",
                       "shape": ["batch", "height", "width", 3], "normalization": "inside the graph"},
            "outputs": ["logits", "features"] if options.features else ["logits"],
            "exporter": EXPORTER, "opset": OPSET,
            "source_checkpoint": _checkpoint_record(checkpoint, spec),
            "tools": tool_versions(),
            "quantization": built.quantization,
            "calibration": _calibration_record(calibration_manifest, options),
            "gate": {**verdict, "parity": parity, "accuracy": accuracy,
                     "eval_images": str(options.eval_images) if options.eval_images else None,
                     "eval_mpp": options.mpp, "center_crop": options.center_crop},
            "temperature": temperature_record,
            "tensorrt_onnx_check": {name: (problems or "compatible") for name, problems in trt_problems.items()},
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "exported_by_git_sha": git_sha(),
            **built.extra,
        }
        fingerprint = dict(spec.fingerprint)
        if options.refresh_fingerprint:
            from lowmag.fingerprint import Fingerprint

            sources = ", ".join(str(p) for p in options.calibration)
            fingerprint = Fingerprint.build(calibration, holdout, spec.target_mpp,
                                            source=f"export-student calibration images of {sources}").data
        export_section["fingerprint"] = ("refreshed from the calibration images" if options.refresh_fingerprint
                                         else "the checkpoint's" if fingerprint else None)
        bundle_spec = dataclasses.replace(
            spec, precision=options.precision, temperature=temperature, artifacts={}, export=export_section,
            fingerprint=fingerprint,
        ).with_artifacts(work, sorted(set(built.files.values())))
        write_spec(bundle_spec, work)
        _move_into_place(work, out, options.force)
        return bundle_spec
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        scratch.cleanup()


def _calibration_record(manifest: dict[str, Any] | None, options: ExportOptions) -> dict[str, Any] | None:
    if manifest is None:
        return None
    return {
        "sources": [str(p) for p in options.calibration],
        "method": (None if options.precision != "int8" else
                   f"nncf {options.nncf_preset}" if options.target == "openvino" else options.calibration_method),
        "counts": manifest.get("counts"),
        "patch_px": manifest.get("patch_px"),
        "manifest_key": manifest.get("key"),
        "per_source": [{k: s.get(k) for k in ("path", "n_calibration", "n_holdout")} for s in manifest.get("sources", [])],
    }


def _move_into_place(work: Path, out: Path, force: bool) -> None:
    """Rename the finished folder to ``out``; a replaced bundle is removed only afterwards."""
    from lowmag.io import current_umask

    os.chmod(work, 0o777 & ~current_umask())  # mkdtemp makes it owner-only
    old = None
    if out.exists():
        if not force:
            raise LowmagError(f"{out} appeared while exporting; nothing was replaced.")
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

