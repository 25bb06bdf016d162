"""GFLOPs of one forward pass, counted the way torchvision and the paper count them."""

from __future__ import annotations

import torch
from torch import nn


def forward_gflops(model: nn.Module, height: int, width: int) -> float:
    """Multiply-accumulates of the conv and linear layers for one (1, 3, H, W) input, / 1e9.

    This is the convention behind the usual "ResNet-18 = 1.8 GFLOPs at 224 px" (one
    multiply-accumulate counted as one FLOP); normalisation, activations and pooling are
    not counted. Measured by running the model once under torch's FLOP counter.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, height, width, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
