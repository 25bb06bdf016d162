"""The ONNX graph of a student: uint8 RGB pixels in, logits (and the feature map) out.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), the exporter
PyTorch recommends from 2.9 on, at ONNX opset 18. Batch, height and width are dynamic
so one graph serves tissue pieces of any size. The input is what ``read_at_mpp`` yields,
(N, H, W, 3) uint8 RGB; the graph transposes to NCHW, casts to float and applies the
checkpoint's mean/std itself, so no runtime re-implements the normalisation. GroupNorm
is exported as Reshape → InstanceNormalization → Reshape → Mul → Add, which ONNX Runtime,
OpenVINO and TensorRT's ONNX parser all accept.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowmag.bundle import FEATURES_NAME, INPUT_NAME, LOGITS_NAME
from lowmag.spec import ModelSpec
from lowmag.train.models import ResNet

OPSET = 18
EXPORTER = f"torch.onnx.export(dynamo=True), opset {OPSET}"
#: Smallest input side the exported graph is traced for; smaller pieces are not classified.
MIN_SIDE = 16


class StudentGraph(nn.Module):
    """The student with its input standardisation in front: what gets exported."""

    def __init__(self, model: ResNet, spec: ModelSpec, features: bool = False) -> None:
        super().__init__()
        self.model = model
        self.features = features
        mean = torch.tensor(spec.normalization.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(spec.normalization.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, pixels: torch.Tensor):
        x = (pixels.permute(0, 3, 1, 2).to(torch.float32) - self.mean) / self.std
        if not self.features:
            return self.model(x)
        fmap = self.model.forward_features(x)
        return self.model.forward_head(fmap), fmap


def reference_logits(graph: StudentGraph, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """PyTorch eager logits for uint8 images, one shape group at a time (the parity reference)."""
    from lowmag.runtimes import shape_batches

    out: list[np.ndarray | None] = [None] * len(images)
    graph.eval()
    with torch.inference_mode():
        for chunk in shape_batches(images, batch_size):
            result = graph(torch.from_numpy(np.stack([images[i] for i in chunk])))
            logits = result[0] if isinstance(result, tuple) else result
            for row, i in enumerate(chunk):
                out[i] = logits[row].float().numpy()
    return np.stack(out).astype(np.float32)  # type: ignore[arg-type]


def export_onnx(graph: StudentGraph, path: str | Path, example_side: int = 64) -> Path:
    """Write the FP32 ONNX model to ``path`` (a single file, weights inside)."""
    path = Path(path)
    graph = graph.eval().cpu()
    example = torch.randint(0, 256, (2, example_side, example_side, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    height = torch.export.Dim("height", min=MIN_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE)
    outputs = [LOGITS_NAME, FEATURES_NAME] if graph.features else [LOGITS_NAME]
    # The exporter prints progress lines and warns about torchvision ops lowmag never uses.
    sink = io.StringIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                (example,),
                input_names=[INPUT_NAME],
                output_names=outputs,
                opset_version=OPSET,
                dynamo=True,
                dynamic_shapes={"pixels": {0: batch, 1: height, 2: width}},
                external_data=False,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    # TensorRT takes a uint8 input only straight into a Cast; torch writes Transpose first.
    import onnx

    from lowmag.tensorrt import cast_uint8_inputs_first

    onnx.save(cast_uint8_inputs_first(program.model_proto), str(path))
    return path
