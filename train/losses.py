"""The distillation losses of DiPalma et al. and the attention term of del Amor et al.

Each loss is a small named module; :class:`DistillationLoss` adds them up and reports
each part so training logs show what drives the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowmag.errors import LowmagError

PIXEL_MODES = ("both", "maxpool", "bicubic", "none")


class SoftTargetLoss(nn.Module):
    """KL(softmax(teacher/T) ‖ softmax(student/T)) · T², averaged over the batch.

    The T² keeps the gradient scale independent of the temperature (Hinton et al.).
    """

    def __init__(self, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise LowmagError(f"distillation temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return kl * t * t


def resize_maxpool(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """g₁: adaptive max-pooling of the teacher's map down to the student's size."""
    return F.adaptive_max_pool2d(features, size)


def resize_bicubic(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """g₂: bicubic interpolation of the teacher's map to the student's size."""
    return F.interpolate(features, size=size, mode="bicubic", align_corners=False)


class PixelLoss(nn.Module):
    """½ Σ_k ‖g_k(F_teacher) − F_student‖² over the selected resizings g_k.

    ``mode`` is ``both`` (max-pool and bicubic, the two terms averaged as in the paper),
    ``maxpool``, ``bicubic`` or ``none``. ‖·‖² is the mean squared difference per element,
    so the loss does not grow with the size of the feature map.
    """

    def __init__(self, mode: str = "both") -> None:
        super().__init__()
        if mode not in PIXEL_MODES:
            raise LowmagError(f"pixel loss mode {mode!r} is not one of {', '.join(PIXEL_MODES)}")
        self.mode = mode
        self.resizers = {
            "both": (resize_maxpool, resize_bicubic),
            "maxpool": (resize_maxpool,),
            "bicubic": (resize_bicubic,),
            "none": (),
        }[mode]

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        if not self.resizers:
            return student_features.new_zeros(())
        size = tuple(student_features.shape[-2:])
        terms = [
            F.mse_loss(student_features.float(), g(teacher_features.float(), size))
            for g in self.resizers
        ]
        return torch.stack(terms).sum() / len(terms)


def grad_cam(features: torch.Tensor, fc_weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of ``classes`` on the final conv map of a global-average-pool + FC head.

    For logits y = W · mean_hw(A), ∂y_c/∂A_k(i,j) = W[c,k] / (h·w) at every position, so
    the Grad-CAM weights (spatial mean of the positive gradients) are ReLU(W[c]) / (h·w) and
    the map is ReLU(Σ_k weight_k · A_k). Computed in closed form, it stays differentiable
    for the student without second-order autograd. Returns (N, h, w), each map scaled to a
    maximum of 1 (all-zero maps stay zero).
    """
    n, _, h, w = features.shape
    weights = F.relu(fc_weight[classes]) / (h * w)  # (N, C)
    cam = F.relu(torch.einsum("nc,nchw->nhw", weights.float(), features.float()))
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-8).view(n, 1, 1)
    return cam / peak


class AttentionLoss(nn.Module):
    """L2 between the normalised Grad-CAM maps of teacher and student (del Amor et al.).

    Both maps are taken for the teacher's predicted class; the teacher's map is resized
    (bilinear) to the student's. Mean squared difference per position.
    """

    def forward(
        self,
        student_features: torch.Tensor,
        student_fc: torch.Tensor,
        teacher_features: torch.Tensor,
        teacher_fc: torch.Tensor,
        teacher_logits: torch.Tensor,
    ) -> torch.Tensor:
        target_class = teacher_logits.argmax(dim=1)
        student_cam = grad_cam(student_features, student_fc, target_class)
        teacher_cam = grad_cam(teacher_features, teacher_fc, target_class)
        teacher_cam = F.interpolate(
            teacher_cam.unsqueeze(1), size=student_cam.shape[-2:], mode="bilinear", align_corners=False
        ).squeeze(1)
        return F.mse_loss(student_cam, teacher_cam)


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    soft: torch.Tensor
    pixel: torch.Tensor
    attention: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "soft", "pixel", "attention")}


class DistillationLoss(nn.Module):
    """soft + pixel_weight · pixel (+ attention_weight · attention)."""

    def __init__(
        self,
        temperature: float = 4.0,
        pixel: str = "both",
        pixel_weight: float = 1.0,
        attention_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if pixel_weight < 0 or attention_weight < 0:
            raise LowmagError("loss weights must be non-negative")
        self.soft = SoftTargetLoss(temperature)
        self.pixel = PixelLoss(pixel)
        self.attention = AttentionLoss()
        self.pixel_weight = pixel_weight
        self.attention_weight = attention_weight

    def forward(
        self,
        student_logits: torch.Tensor,
        student_features: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_features: torch.Tensor,
        student_fc: torch.Tensor | None = None,
        teacher_fc: torch.Tensor | None = None,
    ) -> LossParts:
        soft = self.soft(student_logits, teacher_logits)
        pixel = self.pixel(student_features, teacher_features)
        attention = soft.new_zeros(())
        if self.attention_weight > 0:
            if student_fc is None or teacher_fc is None:
                raise LowmagError("the attention term needs both models' FC weights")
            attention = self.attention(student_features, student_fc, teacher_features, teacher_fc, teacher_logits)
        total = soft + self.pixel_weight * pixel + self.attention_weight * attention
        return LossParts(total, soft, pixel, attention)
