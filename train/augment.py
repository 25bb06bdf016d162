"""Augmentation applied identically to every resolution of one image.

Distillation shows the teacher the high-resolution image and the student the low-resolution
one of the *same* tissue, so both must get the same augmentation. The geometric and the RGB
colour transforms commute with downsampling exactly: the eight flips/90° rotations, and a
colour transform that is linear in RGB (brightness, saturation and hue as one 3×3 matrix,
the hue rotation done in YIQ) plus a contrast stretch about the image's mean.

Stain jitter (``hed``, ``hed_bias``; Tellez et al. 2019, "Quantifying the effects of data
augmentation and stain color normalization in convolutional neural networks for
computational pathology") varies what actually differs between H&E labs: the amount of each
stain. The image goes to optical density (OD = -log10 I), is unmixed into haematoxylin,
eosin and DAB with Ruifrok & Johnston's vectors, each stain is scaled by 1 ± ``hed`` and
shifted by ± ``hed_bias`` OD, and the result is mixed back. It is linear in OD, not in RGB,
so it commutes with downsampling only approximately (the test measures by how much).
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
    #: Stain jitter: each of haematoxylin, eosin and DAB scaled by 1 ± hed and shifted by
    #: ± hed_bias optical density (Tellez et al.'s "HED-light", the default since issue 14;
    #: 0, 0 is the recipe before it and draws the same augmentations as it did).
    hed: float = 0.05
    hed_bias: float = 0.05


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the random augmentation, to apply to each resolution."""

    rotations: int
    flip: bool
    colour: torch.Tensor  # 3x3 RGB matrix
    contrast: float
    stain_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # H, E, DAB
    stain_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def stains(self) -> bool:
        return self.stain_scale != (1.0, 1.0, 1.0) or self.stain_bias != (0.0, 0.0, 0.0)


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
    contrast = uniform(config.contrast)
    scale = tuple(uniform(config.hed) for _ in range(3)) if config.hed else (1.0, 1.0, 1.0)
    bias = tuple(config.hed_bias * (2.0 * float(torch.rand((), generator=generator)) - 1.0) for _ in range(3)) \
        if config.hed_bias else (0.0, 0.0, 0.0)
    return AugmentParams(rotations, flip, colour, contrast, scale, bias)


def identity() -> AugmentParams:
    return AugmentParams(0, False, torch.eye(3), 1.0)


# Ruifrok & Johnston (2001): OD vectors of haematoxylin, eosin and DAB (rows), as in
# lowmag.fingerprint.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_MIN_INTENSITY = 1.0 / 255.0


def stain_jitter(image: torch.Tensor, scale: tuple[float, float, float], bias: tuple[float, float, float]
                 ) -> torch.Tensor:
    """Scale and shift each stain's concentration in optical-density space (see the module doc)."""
    od = -torch.log10(image.clamp(min=_MIN_INTENSITY))
    hed = torch.einsum("chw,cs->shw", od, _HED_FROM_RGB)
    hed = hed * torch.tensor(scale).view(3, 1, 1) + torch.tensor(bias).view(3, 1, 1)
    od = torch.einsum("shw,sc->chw", hed, _RGB_FROM_HED)
    return torch.pow(10.0, -od)


def apply(image: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Augment a (3, H, W) float image in 0-1; returns a new tensor, clamped to 0-1."""
    out = image
    if params.rotations:
        out = torch.rot90(out, params.rotations, dims=(1, 2))
    if params.flip:
        out = torch.flip(out, dims=(2,))
    if params.stains:
        out = stain_jitter(out, params.stain_scale, params.stain_bias)
    if not torch.equal(params.colour, torch.eye(3)):
        out = torch.einsum("ij,jhw->ihw", params.colour, out)
    if params.contrast != 1.0:
        mean = out.mean()
        out = (out - mean) * params.contrast + mean
    return out.clamp(0.0, 1.0)
