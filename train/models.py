"""ResNets with GroupNorm, named like torchvision's so its checkpoints load.

Whole tissue images vary in size and train at batch size 1, where BatchNorm's batch
statistics are meaningless; the paper therefore swaps every BatchNorm for GroupNorm(32).
Parameter names (``bn1``, ``layer1.0.downsample.1``, ``fc``...) are torchvision's, so a
torchvision ImageNet checkpoint loads (its BatchNorm affine weights become the GroupNorm
affine weights; running statistics are dropped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowmag.errors import LowmagError

log = logging.getLogger(__name__)

GROUPS = 32


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(GROUPS, channels), channels)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = _norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = _norm(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = _norm(width)
        self.conv2 = _conv3x3(width, width, stride)  # stride on the 3x3, as torchvision (v1.5)
        self.bn2 = _norm(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = _norm(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet whose ``forward`` returns logits and ``forward_features`` the final conv map."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], num_classes: int):
        super().__init__()
        self.in_ch = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.feature_channels = 512 * block.expansion
        self._init_weights()

    def _make_layer(self, block, width: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_ch != width * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.in_ch, width * block.expansion, stride), _norm(width * block.expansion)
            )
        layers = [block(self.in_ch, width, stride, downsample)]
        self.in_ch = width * block.expansion
        layers += [block(self.in_ch, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """He (Kaiming) initialisation for convolutions, unit/zero GroupNorm affine."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final convolutional feature map (N, C, h, w): what the pixel loss compares."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return self.forward_head(features), features


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[int], ResNet]


ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture("resnet18", lambda n: ResNet(BasicBlock, (2, 2, 2, 2), n)),
    "resnet34": Architecture("resnet34", lambda n: ResNet(BasicBlock, (3, 4, 6, 3), n)),
    "resnet50": Architecture("resnet50", lambda n: ResNet(Bottleneck, (3, 4, 6, 3), n)),
}


def build_model(architecture: str, num_classes: int) -> ResNet:
    """A freshly initialised GroupNorm ResNet (``resnet18``, ``resnet34`` or ``resnet50``)."""
    try:
        arch = ARCHITECTURES[architecture]
    except KeyError:
        raise LowmagError(
            f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
        ) from None
    if num_classes < 2:
        raise LowmagError(f"a classifier needs at least 2 classes, got {num_classes}")
    return arch.build(num_classes)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch file, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise LowmagError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a bad file
        raise LowmagError(
            f"{path}: not a loadable weights file ({error.__class__.__name__}: {error}); "
            "give a .safetensors file or a torch state dict saved with plain tensors"
        ) from error
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LowmagError(f"{path}: expected a state dict of tensors, found {type(data).__name__}")
    return data


def load_pretrained(model: ResNet, path: str | Path) -> list[str]:
    """Load ImageNet-style weights from a local file (never a hub); the classifier is kept.

    BatchNorm running statistics are dropped (GroupNorm has none); ``fc`` is loaded only
    when its shape matches. Returns the names of parameters that were left initialised.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    usable = {
        k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)
    }
    mismatched = [k for k in state if k in own and k not in usable and not k.startswith("fc.")]
    if mismatched:
        raise LowmagError(
            f"{path}: {len(mismatched)} tensors have the wrong shape for this architecture "
            f"(first: {mismatched[0]}); is it a checkpoint of another ResNet depth?"
        )
    if not any(k.startswith("layer") for k in usable):
        raise LowmagError(f"{path}: no ResNet weights with torchvision names found")
    model.load_state_dict(usable, strict=False)
    missing = sorted(set(own) - set(usable))
    log.info("loaded %d tensors from %s; left initialised: %s", len(usable), path, missing)
    return missing
