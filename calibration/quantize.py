"""INT8 post-training quantization of an exported student, calibrated on real tissue.

Two recipes, both fed by a ``CalibrationSet`` (uint8 images at the model's µm/px):

- ``quantize_onnx_qdq``: ONNX Runtime static quantization in QDQ format. Only Conv, Gemm
  and MatMul are quantized (the other ops stay float; quantizing more costs accuracy and
  buys nothing on these runtimes). Weights are int8, symmetric, per output channel.
  Activations are either ``int8`` symmetric (zero point 0): the one Q/DQ form that ONNX
  Runtime, OpenVINO and TensorRT's explicit quantization all consume; or ``uint8``
  asymmetric, which ONNX Runtime's x86 kernels run 2.5x faster (u8 x s8 is what
  VPMADDUBSW/VNNI multiply; measured on the Kather 5x student: s8s8 220 ms, u8s8 88 ms,
  FP32 136 ms for a 505 px piece) but TensorRT refuses.
- ``quantize_openvino_nncf``: NNCF post-training quantization of an OpenVINO IR.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lowmag.bundle import INPUT_NAME

logger = logging.getLogger(__name__)

#: ORT calibration methods offered on the command line.
ORT_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of images (batch 1)."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self.images = images
        self.iterator: Iterator[np.ndarray] = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self.iterator, None)
        return None if image is None else {INPUT_NAME: image[None]}

    def rewind(self) -> None:
        self.iterator = iter(self.images)


ACTIVATIONS = ("int8", "uint8")


def quantize_onnx_qdq(
    fp32_model: str | Path, out: str | Path, images: Sequence[np.ndarray], method: str = "minmax",
    activations: str = "int8",
) -> dict[str, Any]:
    """Write the Q/DQ INT8 model to ``out``; returns what was done, for the bundle spec."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in ORT_METHODS:
        raise ValueError(f"calibration method must be one of {ORT_METHODS}, got {method!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    symmetric = activations == "int8"
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory(prefix="lowmag-quant-") as tmp:
        # Shape inference and graph cleanup first, as ONNX Runtime recommends before
        # quantizing; skip_symbolic_shape because the dynamic H/W need no concrete sizes.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            _Reader(images),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate,
            # Biases stay float: an int32 DequantizeLinear is something TensorRT cannot parse.
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                           "CalibTensorRangeSymmetric": symmetric, "QuantizeBias": False},
        )
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "ops": list(QUANTIZED_OPS),
        "activations": "int8 symmetric, per tensor" if symmetric else "uint8 asymmetric, per tensor",
        "weights": "int8 symmetric, per channel",
        "method": method,
        "images": len(images),
    }


#: NNCF presets offered on the command line: symmetric activations (the default), or
#: asymmetric ones, which keep more of a student whose activations are one-sided (the
#: Kather 10x student distilled on labeled tiles only lost 1.06 macro-F1 points with the
#: first and 0.49 with the second; full bias correction changed nothing there).
NNCF_PRESETS = {"performance": "performance (symmetric int8)", "mixed": "mixed (symmetric weights, asymmetric activations)"}


def quantize_openvino_nncf(ov_model: Any, images: Sequence[np.ndarray], preset: str = "performance",
                           fast_bias_correction: bool = True) -> tuple[Any, dict[str, Any]]:
    """The NNCF-quantized copy of an OpenVINO model, and what was done."""
    import nncf

    if preset not in NNCF_PRESETS:
        raise ValueError(f"NNCF preset must be one of {tuple(NNCF_PRESETS)}, got {preset!r}")
    dataset = nncf.Dataset(list(images), lambda image: {INPUT_NAME: image[None]})
    quantized = nncf.quantize(
        ov_model,
        dataset,
        preset=getattr(nncf.QuantizationPreset, preset.upper()),  # PERFORMANCE or MIXED
        subset_size=len(images),
        fast_bias_correction=fast_bias_correction,
    )
    return quantized, {
        "tool": f"nncf.quantize {nncf.__version__}",
        "preset": NNCF_PRESETS[preset],
        "images": len(images),
        "fast_bias_correction": fast_bias_correction,
    }
