"""Temperature scaling: fitted on labeled logits, never changes a prediction, lowers ECE."""

import numpy as np
import pytest

from lowmag.calibration.temperature import expected_calibration_error, fit_temperature
from lowmag.errors import LowmagError
from lowmag.runtimes import softmax


def simulated_logits(n: int, classes: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / true_t): calibrated at T = true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, size=(n, classes))
    probs = softmax(logits, true_t)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_the_temperature_and_lowers_ece(true_t):
    logits, labels = simulated_logits(4000, 8, true_t)
    result = fit_temperature(logits, labels)
    assert result["temperature"] == pytest.approx(true_t, rel=0.1)
    assert result["ece_after"] < result["ece_before"] and result["ece_after"] < 0.03
    assert result["nll_after"] < result["nll_before"] and not result["at_search_limit"]
    # Predictions are untouched; only the confidence moves.
    assert (softmax(logits, result["temperature"]).argmax(1) == logits.argmax(1)).all()


def test_an_overconfident_model_gets_t_above_one():
    logits, labels = simulated_logits(3000, 4, 3.0, seed=1)
    assert fit_temperature(logits, labels)["temperature"] > 1.5
    assert expected_calibration_error(logits, labels) > expected_calibration_error(logits, labels, 3.0)


def test_too_few_validation_images_are_refused():
    logits, labels = simulated_logits(10, 3, 1.0)
    with pytest.raises(LowmagError, match="--val-images"):
        fit_temperature(logits, labels)


def test_ece_of_a_perfectly_calibrated_confident_model_is_zero():
    logits = np.array([[50.0, 0.0], [0.0, 50.0]] * 20)
    labels = np.array([0, 1] * 20)
    assert expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-9)


def test_a_fit_on_a_set_the_model_almost_never_gets_wrong_is_not_trusted():
    # 60 images, 3 classes, 57 right with confident logits: NLL wants T far below 1.
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 20)
    logits = rng.normal(0, 0.3, size=(60, 3))
    logits[np.arange(60), labels] += 2.0
    wrong = [5, 25, 45]
    logits[wrong, labels[wrong]] -= 4.0
    result = fit_temperature(logits, labels)
    assert result["errors"] == 3 and result["search_range"] == [0.25, 8.0]
    assert 0.25 <= result["temperature"] <= 8.0

    logits[wrong, labels[wrong]] += 4.0  # now never wrong: T runs to the lower edge
    never_wrong = fit_temperature(logits, labels)
    assert never_wrong["at_search_limit"] and not never_wrong["trusted"]
    assert never_wrong["temperature"] == pytest.approx(0.25, rel=0.02)
    assert "edge of its range" in never_wrong["why_not_trusted"]

    logits[wrong[0], labels[wrong[0]]] -= 4.0  # one error: it alone would decide T
    one_error = fit_temperature(logits, labels)
    assert one_error["errors"] == 1 and not one_error["trusted"]
    assert "too few errors" in one_error["why_not_trusted"] or one_error["at_search_limit"]
