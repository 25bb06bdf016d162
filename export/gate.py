"""The parity and accuracy gate every export passes before its bundle is written.

The exported model and the PyTorch model it came from classify the same real images:

- **FP32**: the largest absolute logit difference must be within ``fp32_tolerance``
  (default 1e-3; ONNX Runtime measures ~1e-5 on the Kather students, OpenVINO with its
  f32 precision hint ~1e-5, and OpenVINO left at its bf16 default ~3e-2, which fails).
- **FP16 / INT8**: top-1 agreement with PyTorch is reported, and on a labeled set the
  macro-F1 change; a drop larger than ``max_f1_drop`` points fails unless allowed.

An FP32 export outside tolerance always fails: it means the graph is not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowmag.errors import LowmagError


class GateError(LowmagError):
    """The exported model does not predict what the PyTorch model predicts."""


@dataclass(frozen=True)
class GatePolicy:
    fp32_tolerance: float = 1e-3
    max_f1_drop: float = 1.0  # macro-F1 points
    allow_accuracy_drop: bool = False


def compare(reference: np.ndarray, exported: np.ndarray) -> dict[str, Any]:
    """Logit differences and top-1 agreement between two (N, classes) arrays."""
    diff = np.abs(reference.astype(np.float64) - exported.astype(np.float64))
    return {
        "images": int(len(reference)),
        "max_abs_logit_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_logit_diff": float(diff.mean()) if diff.size else 0.0,
        "top1_agreement": float((reference.argmax(1) == exported.argmax(1)).mean()) if len(reference) else 1.0,
    }


def accuracy_change(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Macro F1 (%) of both models on a labeled set, and the change in points."""
    from lowmag.train.phases import macro_f1  # the same macro F1 distill-train reports

    ref = 100 * macro_f1(labels, reference.argmax(1), num_classes)
    exp = 100 * macro_f1(labels, exported.argmax(1), num_classes)
    return {
        "images": int(len(labels)),
        "macro_f1_pytorch": round(ref, 3),
        "macro_f1_exported": round(exp, 3),
        "macro_f1_change": round(exp - ref, 3),
        "accuracy_pytorch": round(100 * float((reference.argmax(1) == labels).mean()), 3),
        "accuracy_exported": round(100 * float((exported.argmax(1) == labels).mean()), 3),
    }


def judge(precision: str, parity: dict[str, Any], accuracy: dict[str, Any] | None, policy: GatePolicy,
          where: str, target: str = "onnx") -> dict[str, Any]:
    """Apply the policy; returns the verdict for the spec or raises ``GateError``."""
    verdict: dict[str, Any] = {"precision": precision, "policy": {
        "fp32_tolerance": policy.fp32_tolerance, "max_f1_drop": policy.max_f1_drop,
        "allow_accuracy_drop": policy.allow_accuracy_drop}}
    problems = []
    if precision == "fp32" and parity["max_abs_logit_diff"] > policy.fp32_tolerance:
        problems.append(
            f"FP32 logits differ from PyTorch by up to {parity['max_abs_logit_diff']:.3g} on "
            f"{parity['images']} real images (tolerance {policy.fp32_tolerance:g}); the exported graph "
            "does not compute the model. Check the runtime settings (OpenVINO must run with "
            "INFERENCE_PRECISION_HINT=f32) and the exporter versions; this cannot be overridden."
        )
    drop = -accuracy["macro_f1_change"] if accuracy else 0.0
    verdict["accuracy_checked"] = accuracy is not None
    if accuracy and drop > policy.max_f1_drop:
        message = (
            f"{precision.upper()} macro F1 is {accuracy['macro_f1_exported']:.1f}% against PyTorch's "
            f"{accuracy['macro_f1_pytorch']:.1f}% on {accuracy['images']} labeled images: a drop of "
            f"{drop:.2f} points, more than the allowed {policy.max_f1_drop:g}"
        )
        if policy.allow_accuracy_drop:
            verdict["accuracy_drop_allowed"] = True
            verdict["warning"] = message
        else:
            # The knob that changes INT8 ranges differs per target: ONNX Runtime's calibration
            # method, or NNCF's preset (OpenVINO ignores --calibration-method).
            knob = ("try --nncf-preset mixed (asymmetric activations)" if target == "openvino"
                    else "try --calibration-method percentile or entropy")
            problems.append(
                message + f". Calibrate on more (and more representative) tissue with --calibration, {knob}, "
                "use --precision fp16, or pass --allow-accuracy-drop to accept it knowingly (it is recorded in "
                "lowmag.json)."
            )
    if problems:
        raise GateError(f"{where}: export refused, nothing was written. " + " ".join(problems))
    verdict["passed"] = True
    return verdict
