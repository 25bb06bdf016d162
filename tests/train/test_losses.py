"""The distillation losses, checked against hand computations and autograd."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowmag.errors import LowmagError
from lowmag.train.losses import (
    AttentionLoss,
    DistillationLoss,
    PixelLoss,
    SoftTargetLoss,
    grad_cam,
)

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _kl_by_hand(teacher, student, t):
    """mean over samples of Σ_i p_i log(p_i / q_i), p = softmax(teacher/T), q = softmax(student/T)."""
    total = 0.0
    for t_row, s_row in zip(teacher, student):
        p = _softmax([v / t for v in t_row])
        q = _softmax([v / t for v in s_row])
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(teacher)




# --- soft targets -----------------------------------------------------------------------


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_soft_target_loss_is_batch_mean_kl_times_t_squared(t):
    loss = SoftTargetLoss(t)(torch.tensor(STUDENT), torch.tensor(TEACHER))
    kl = _kl_by_hand(TEACHER, STUDENT, t)
    assert kl > 0
    assert float(loss) == pytest.approx(kl * t * t, rel=1e-5)
    # The T² factor, explicitly: the loss over the unscaled KL is T².
    assert float(loss) / kl == pytest.approx(t * t, rel=1e-5)


def test_soft_target_loss_is_zero_for_equal_logits():
    logits = torch.tensor(TEACHER)
    assert float(SoftTargetLoss(4.0)(logits, logits.clone())) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_soft_target_loss_refuses_non_positive_temperature(t):
    with pytest.raises(LowmagError, match="temperature"):
        SoftTargetLoss(t)


# --- pixel loss --------------------------------------------------------------------------


def _pixel_maps(channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(1, channels, 4, 4, generator=g)
    student = torch.randn(1, channels, 2, 2, generator=g)
    return teacher, student


def _maxpool_term_by_hand(teacher, student):
    t = teacher.numpy()[0]  # (C, 4, 4)
    s = student.numpy()[0]  # (C, 2, 2)
    pooled = np.zeros_like(s)
    for c in range(t.shape[0]):
        for i in range(2):
            for j in range(2):
                pooled[c, i, j] = t[c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].max()
    return float(np.mean((pooled - s) ** 2))


def _bicubic_term(teacher, student):
    resized = F.interpolate(teacher, size=(2, 2), mode="bicubic", align_corners=False)
    return float(torch.mean((resized - student) ** 2))


def test_pixel_loss_maxpool_is_mse_to_2x2_max_of_teacher():
    teacher, student = _pixel_maps()
    loss = PixelLoss("maxpool")(student, teacher)
    assert float(loss) == pytest.approx(_maxpool_term_by_hand(teacher, student), rel=1e-6)


def test_pixel_loss_bicubic_is_mse_to_bicubic_resize_of_teacher():
    teacher, student = _pixel_maps()
    loss = PixelLoss("bicubic")(student, teacher)
    assert float(loss) == pytest.approx(_bicubic_term(teacher, student), rel=1e-6)


def test_pixel_loss_both_averages_the_two_terms_rather_than_adding_them():
    teacher, student = _pixel_maps(seed=3)
    maxpool = _maxpool_term_by_hand(teacher, student)
    bicubic = _bicubic_term(teacher, student)
    both = float(PixelLoss("both")(student, teacher))
    assert both == pytest.approx((maxpool + bicubic) / 2, rel=1e-6)
    assert both != pytest.approx(maxpool + bicubic, rel=1e-3)


def test_pixel_loss_none_is_zero():
    teacher, student = _pixel_maps()
    assert float(PixelLoss("none")(student, teacher)) == 0.0


def test_pixel_loss_refuses_unknown_mode():
    with pytest.raises(LowmagError, match="bilinear"):
        PixelLoss("bilinear")


# --- Grad-CAM ----------------------------------------------------------------------------


def _autograd_grad_cam(features, fc_weight, fc_bias, classes):
    """Grad-CAM the textbook way: differentiate logit c of fc(mean_hw(A)) with respect to A."""
    maps = []
    for n in range(features.shape[0]):
        a = features[n : n + 1].detach().clone().requires_grad_(True)
        logits = F.linear(a.mean(dim=(2, 3)), fc_weight, fc_bias)
        (grad,) = torch.autograd.grad(logits[0, classes[n]], a)
        weights = F.relu(grad[0]).mean(dim=(1, 2))  # (C,)
        cam = F.relu((weights[:, None, None] * a[0].detach()).sum(0))
        maps.append(cam / cam.max() if cam.max() > 0 else cam)
    return torch.stack(maps)


def test_grad_cam_closed_form_matches_autograd_grad_cam():
    g = torch.Generator().manual_seed(0)
    # Post-ReLU features, as a ResNet's final map is; weights of both signs.
    features = F.relu(torch.randn(3, 6, 5, 4, generator=g))
    fc_weight = torch.randn(4, 6, generator=g)
    fc_bias = torch.randn(4, generator=g)
    classes = torch.tensor([0, 3, 2])
    got = grad_cam(features, fc_weight, classes)
    expected = _autograd_grad_cam(features, fc_weight, fc_bias, classes)
    assert got.shape == (3, 5, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.flatten(1).amax(1), torch.ones(3))


def test_grad_cam_of_all_zero_map_stays_zero():
    features = torch.zeros(2, 4, 3, 3)
    cam = grad_cam(features, torch.randn(5, 4), torch.tensor([1, 4]))
    assert torch.isfinite(cam).all()
    assert torch.count_nonzero(cam) == 0


# --- attention and the total -------------------------------------------------------------


def _features_and_fc(seed):
    g = torch.Generator().manual_seed(seed)
    return F.relu(torch.randn(2, 8, 3, 3, generator=g)), torch.randn(5, 8, generator=g)


def test_attention_loss_is_zero_for_identical_models_and_positive_otherwise():
    features, fc = _features_and_fc(0)
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    same = AttentionLoss()(features, fc, features.clone(), fc.clone(), logits)
    assert float(same) == pytest.approx(0.0, abs=1e-12)
    other_features, other_fc = _features_and_fc(2)
    different = AttentionLoss()(other_features, other_fc, features, fc, logits)
    assert float(different) > 0


def _value(loss):
    return float(loss.detach())


def _distillation_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(2, 5, generator=g, requires_grad=True)
    t_logits = torch.randn(2, 5, generator=g)
    s_features = F.relu(torch.randn(2, 8, 2, 2, generator=g)).requires_grad_(True)
    t_features = F.relu(torch.randn(2, 8, 4, 4, generator=g))
    s_fc = torch.randn(5, 8, generator=g, requires_grad=True)
    t_fc = torch.randn(5, 8, generator=g)
    return s_logits, s_features, t_logits, t_features, s_fc, t_fc


def test_distillation_total_is_weighted_sum_of_its_parts():
    s_logits, s_features, t_logits, t_features, s_fc, t_fc = _distillation_inputs()
    loss = DistillationLoss(temperature=3.0, pixel="both", pixel_weight=0.7, attention_weight=0.4)
    parts = loss(s_logits, s_features, t_logits, t_features, s_fc, t_fc)
    soft = _value(SoftTargetLoss(3.0)(s_logits, t_logits))
    pixel = _value(PixelLoss("both")(s_features, t_features))
    attention = _value(AttentionLoss()(s_features, s_fc, t_features, t_fc, t_logits))
    assert _value(parts.soft) == pytest.approx(soft, rel=1e-6)
    assert _value(parts.pixel) == pytest.approx(pixel, rel=1e-6)
    assert _value(parts.attention) == pytest.approx(attention, rel=1e-6)
    assert attention > 0
    assert _value(parts.total) == pytest.approx(soft + 0.7 * pixel + 0.4 * attention, rel=1e-6)
    assert set(parts.as_floats()) == {"total", "soft", "pixel", "attention"}


def test_attention_is_zero_and_not_computed_when_its_weight_is_zero(monkeypatch):
    s_logits, s_features, t_logits, t_features, _, _ = _distillation_inputs()
    loss = DistillationLoss(temperature=2.0, pixel="maxpool", pixel_weight=0.5, attention_weight=0.0)

    def refuse(*args, **kwargs):
        raise AssertionError("attention was computed although its weight is 0")

    monkeypatch.setattr(loss.attention, "forward", refuse)
    # No FC weights given: with weight 0 they are not needed.
    parts = loss(s_logits, s_features, t_logits, t_features)
    assert _value(parts.attention) == 0.0
    expected = _value(SoftTargetLoss(2.0)(s_logits, t_logits)) + 0.5 * _value(
        PixelLoss("maxpool")(s_features, t_features)
    )
    assert _value(parts.total) == pytest.approx(expected, rel=1e-6)


def test_attention_needs_both_fc_weights():
    s_logits, s_features, t_logits, t_features, s_fc, _ = _distillation_inputs()
    loss = DistillationLoss(attention_weight=1.0)
    with pytest.raises(LowmagError, match="FC"):
        loss(s_logits, s_features, t_logits, t_features, s_fc, None)


def test_negative_loss_weights_are_refused():
    with pytest.raises(LowmagError):
        DistillationLoss(pixel_weight=-1.0)
    with pytest.raises(LowmagError):
        DistillationLoss(attention_weight=-0.1)


def test_gradient_flows_to_the_student_only():
    s_logits, s_features, t_logits, t_features, s_fc, t_fc = _distillation_inputs()
    assert not (t_logits.requires_grad or t_features.requires_grad or t_fc.requires_grad)
    parts = DistillationLoss(pixel="both", attention_weight=1.0)(
        s_logits, s_features, t_logits, t_features, s_fc, t_fc
    )
    assert parts.total.requires_grad
    parts.total.backward()
    for tensor in (s_logits, s_features, s_fc):
        assert tensor.grad is not None
        assert torch.isfinite(tensor.grad).all()
        assert tensor.grad.abs().sum() > 0
    assert t_logits.grad is None and t_features.grad is None and t_fc.grad is None
