"""Augmentation applied identically to every resolution of one image.

Distillation shows the teacher the high-resolution image and the student the low-resolution
one of the *same* tissue, so both must get the same augmentation. Only transforms that
commute with downsampling are used: the eight flips/90° rotations, and a colour transform
that is linear in RGB (brightness, saturation and hue as one 3×3 matrix, the hue rotation
done in YIQ) plus a contrast stretch about the image's mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float32
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation (0 turns a jitter off)."""

    flips: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02  # fraction of a full turn


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the random augmentation, to apply to each resolution."""

    rotations: int
    flip: bool
    colour: torch.Tensor  # 3x3 RGB matrix
    contrast: float


def draw(config: AugmentConfig, generator: torch.Generator) -> AugmentParams:
    def uniform(spread: float) -> float:
        return 1.0 + spread * (2.0 * float(torch.rand((), generator=generator)) - 1.0)

    rotations = int(torch.randint(0, 4, (), generator=generator)) if config.rot90 else 0
    flip = bool(torch.randint(0, 2, (), generator=generator)) if config.flips else False
    angle = 2.0 * math.pi * config.hue * (2.0 * float(torch.rand((), generator=generator)) - 1.0)
    saturation = uniform(config.saturation)
    brightness = uniform(config.brightness)
    cos, sin = math.cos(angle) * saturation, math.sin(angle) * saturation
    yiq = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    colour = brightness * (_YIQ_TO_RGB @ yiq @ _RGB_TO_YIQ)
    return AugmentParams(rotations, flip, colour, uniform(config.contrast))


def identity() -> AugmentParams:
    return AugmentParams(0, False, torch.eye(3), 1.0)


def apply(image: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Augment a (3, H, W) float image in 0-1; returns a new tensor, clamped to 0-1."""
    out = image
    if params.rotations:
        out = torch.rot90(out, params.rotations, dims=(1, 2))
    if params.flip:
        out = torch.flip(out, dims=(2,))
    if not torch.equal(params.colour, torch.eye(3)):
        out = torch.einsum("ij,jhw->ihw", params.colour, out)
    if params.contrast != 1.0:
        mean = out.mean()
        out = (out - mean) * params.contrast + mean
    return out.clamp(0.0, 1.0)
