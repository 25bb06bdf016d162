"""GFLOPs of a bundle's model at a given input size, counted without torch or onnx.

The same convention as ``lowmag.train.flops`` and the paper: one multiply-accumulate of a
convolution or a matrix product counts as one FLOP; normalisation, activations and
pooling are not counted. The graph is read with OpenVINO (part of ``lowmag[edge]``),
which reads IR and ONNX files alike, reshaped to the input size, and every
``Convolution``/``GroupConvolution``/``MatMul`` is summed from its static shapes. INT8
models have the same convolutions (between FakeQuantize nodes), so they count the same.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

from lowmag.bundle import INPUT_NAME


@lru_cache(maxsize=256)
def model_gflops(model: str, height: int, width: int) -> float:
    """MACs / 1e9 of one forward pass on a (1, height, width, 3) uint8 image."""
    import openvino as ov

    graph = ov.Core().read_model(str(model))
    graph.reshape({INPUT_NAME: [1, height, width, 3]})
    macs = 0
    for op in graph.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Convolution", "GroupConvolution"):
            out = list(op.get_output_shape(0))  # N, C_out, H, W
            weights = list(op.get_input_shape(1))
            if kind == "GroupConvolution":  # G, C_out/G, C_in/G, kh, kw
                per_output = math.prod(weights[2:])
            else:  # C_out, C_in, kh, kw
                per_output = math.prod(weights[1:])
            macs += math.prod(out) * per_output
        elif kind == "MatMul":
            a = list(op.get_input_shape(0))
            out = list(op.get_output_shape(0))
            inner = a[-2] if op.get_attributes().get("transpose_a") else a[-1]
            macs += math.prod(out) * inner
    return macs / 1e9


def bundle_gflops(model_file: Path, sizes: list[tuple[int, int]]) -> float:
    """Total GFLOPs over several inputs given as (width, height), e.g. a slide's tissue pieces."""
    return sum(model_gflops(str(model_file), h, w) for w, h in sizes)
