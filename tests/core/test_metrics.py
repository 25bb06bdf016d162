import json

import numpy as np
import pytest

from lowmag.errors import LowmagError
from lowmag.metrics import classification_metrics, format_metrics_table, format_percent_ci

CLASSES = ["a", "b", "c"]
# Confusion matrix (rows true, cols predicted): a=[2,1,1], b=[1,2,0], c=[0,1,2].
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]


def _noisy_labels(n, k=3, correct=0.8, seed=1):
    """Labels where a fraction ``correct`` of predictions is right, the rest uniform wrong."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, size=n)
    wrong = (truth + rng.integers(1, k, size=n)) % k
    pred = np.where(rng.random(n) < correct, truth, wrong)
    return truth, pred


def test_three_class_example_matches_hand_computation():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, n_bootstrap=0)
    assert m["n"] == 10
    assert m["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert m["accuracy"]["value"] == pytest.approx(0.6)
    # a: tp 2 of 3 predicted, 4 true; b: 2 of 4 predicted, 3 true; c: 2 of 3, 3 true.
    expected = {
        "a": (2 / 3, 2 / 4, 4 / 7, 4),
        "b": (2 / 4, 2 / 3, 4 / 7, 3),
        "c": (2 / 3, 2 / 3, 2 / 3, 3),
    }
    for name, (p, r, f1, support) in expected.items():
        got = m["per_class"][name]
        assert got["precision"] == pytest.approx(p)
        assert got["recall"] == pytest.approx(r)
        assert got["f1"] == pytest.approx(f1)
        assert got["support"] == support
    assert m["macro_precision"]["value"] == pytest.approx(11 / 18)
    assert m["macro_recall"]["value"] == pytest.approx(11 / 18)
    assert m["macro_f1"]["value"] == pytest.approx(38 / 63)


def test_macro_average_counts_a_class_absent_from_the_test_set_as_zero():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES + ["d"], n_bootstrap=0)
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"]["value"] == pytest.approx(38 / 63 * 3 / 4)
    assert m["macro_precision"]["value"] == pytest.approx(11 / 18 * 3 / 4)
    assert m["accuracy"]["value"] == pytest.approx(0.6)
    assert m["confusion_matrix"][3] == [0, 0, 0, 0]


def test_class_predicted_but_never_true_has_zero_precision_and_recall():
    # Two 'c' items wrongly called 'd', which never occurs in the truth.
    m = classification_metrics([0, 1, 2, 2], [0, 1, 3, 3], ["a", "b", "c", "d"], n_bootstrap=0)
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["c"]["recall"] == 0.0
    assert m["macro_recall"]["value"] == pytest.approx(0.5)  # (1 + 1 + 0 + 0) / 4
    assert m["accuracy"]["value"] == pytest.approx(0.5)


def test_ci_contains_the_estimate_and_narrows_with_more_items():
    widths = []
    for n in (100, 2000):
        truth, pred = _noisy_labels(n)
        m = classification_metrics(truth, pred, CLASSES, n_bootstrap=1000, seed=3)
        for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall"):
            assert m[key]["ci_low"] <= m[key]["value"] <= m[key]["ci_high"]
            assert m[key]["ci_low"] < m[key]["ci_high"]
        widths.append(m["accuracy"]["ci_high"] - m["accuracy"]["ci_low"])
    # Width shrinks like 1/sqrt(N): about sqrt(20) ~ 4.5 times narrower.
    assert widths[1] < widths[0] / 3


def test_perfect_predictions_give_a_ci_of_exactly_one():
    # 20 items per class, so no resample plausibly misses a class entirely (that would
    # make the class's F1 0/0 = 0 and pull the macro scores below 1).
    labels = [0, 1, 2] * 20
    m = classification_metrics(labels, labels, CLASSES, n_bootstrap=500)
    for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall"):
        assert (m[key]["value"], m[key]["ci_low"], m[key]["ci_high"]) == (1.0, 1.0, 1.0)


def test_tiny_perfect_test_set_macro_ci_reflects_resamples_missing_a_class():
    # With 7 items some resamples contain no 'a' at all; macro averages still count 'a'
    # (F1 0/0 = 0), so the macro F1 CI reaches down to 2/3 while accuracy stays 1.
    labels = [0, 1, 2, 1, 1, 2, 2]
    m = classification_metrics(labels, labels, CLASSES, n_bootstrap=500)
    assert m["accuracy"]["ci_low"] == 1.0
    assert m["macro_f1"]["value"] == 1.0
    assert m["macro_f1"]["ci_low"] == pytest.approx(2 / 3)


def test_same_seed_reproduces_the_ci_and_another_seed_does_not():
    truth, pred = _noisy_labels(300)
    first = classification_metrics(truth, pred, CLASSES, n_bootstrap=1000, seed=7)
    again = classification_metrics(truth, pred, CLASSES, n_bootstrap=1000, seed=7)
    other = classification_metrics(truth, pred, CLASSES, n_bootstrap=1000, seed=8)
    assert first == again
    assert first["macro_f1"]["ci_low"] != other["macro_f1"]["ci_low"]
    assert first["macro_f1"]["value"] == other["macro_f1"]["value"]


def test_bootstrap_agrees_with_naive_resampling_of_items():
    truth, pred = _noisy_labels(200, correct=0.7)
    m = classification_metrics(truth, pred, CLASSES, n_bootstrap=4000, seed=0)
    # Independent reference: resample item indices and recompute accuracy and macro F1.
    rng = np.random.default_rng(12345)
    acc, f1 = [], []
    for _ in range(4000):
        idx = rng.integers(0, truth.size, size=truth.size)
        t, p = truth[idx], pred[idx]
        acc.append(np.mean(t == p))
        per_class = []
        for c in range(3):
            tp = np.sum((t == c) & (p == c))
            denom = np.sum(t == c) + np.sum(p == c)
            per_class.append(2 * tp / denom if denom else 0.0)
        f1.append(np.mean(per_class))
    for key, values in (("accuracy", acc), ("macro_f1", f1)):
        low, high = np.percentile(values, [2.5, 97.5])
        # Two independent Monte Carlo estimates of the same bounds: within ~1 point.
        assert m[key]["ci_low"] == pytest.approx(low, abs=0.012)
        assert m[key]["ci_high"] == pytest.approx(high, abs=0.012)


def test_default_10000_resamples_on_1000_items_match_the_normal_approximation():
    truth, pred = _noisy_labels(1000, correct=0.8, seed=5)
    m = classification_metrics(truth, pred, CLASSES)
    assert m["bootstrap"] == {"resamples": 10000, "ci": 0.95, "seed": 0, "method": "percentile"}
    p = m["accuracy"]["value"]
    expected_width = 2 * 1.96 * np.sqrt(p * (1 - p) / 1000)
    width = m["accuracy"]["ci_high"] - m["accuracy"]["ci_low"]
    assert width == pytest.approx(expected_width, rel=0.1)


def test_ci_level_changes_the_interval():
    truth, pred = _noisy_labels(500)
    wide = classification_metrics(truth, pred, CLASSES, n_bootstrap=2000, ci=0.99)
    narrow = classification_metrics(truth, pred, CLASSES, n_bootstrap=2000, ci=0.5)
    assert (wide["accuracy"]["ci_high"] - wide["accuracy"]["ci_low"]
            > 2 * (narrow["accuracy"]["ci_high"] - narrow["accuracy"]["ci_low"]))


def test_zero_resamples_gives_no_ci():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, n_bootstrap=0)
    assert m["accuracy"] == {"value": pytest.approx(0.6), "ci_low": None, "ci_high": None}
    assert m["bootstrap"]["resamples"] == 0


def test_result_round_trips_through_json_as_plain_numbers():
    truth, pred = _noisy_labels(50)
    m = classification_metrics(np.asarray(truth, dtype=np.int32), pred, CLASSES, n_bootstrap=100)
    assert json.loads(json.dumps(m)) == m
    assert type(m["accuracy"]["ci_low"]) is float
    assert type(m["confusion_matrix"][0][0]) is int
    assert type(m["per_class"]["a"]["support"]) is int


@pytest.mark.parametrize(
    ("y_true", "y_pred", "classes", "kwargs", "message"),
    [
        ([], [], CLASSES, {}, "empty"),
        ([0, 1, 2], [0, 1], CLASSES, {}, "must match"),
        ([0, 1, 3], [0, 1, 2], CLASSES, {}, "label 3 outside 0..2"),
        ([0, 1, 2], [0, -1, 2], CLASSES, {}, "label -1 outside"),
        ([0.0, 1.0], [0, 1], CLASSES, {}, "integer class indices"),
        ([[0, 1]], [[0, 1]], CLASSES, {}, "1-D"),
        ([0], [0], [], {}, "classes is empty"),
        ([0], [0], ["a", "a"], {}, "unique"),
        ([0], [0], CLASSES, {"ci": 95}, "between 0 and 1"),
        ([0], [0], CLASSES, {"n_bootstrap": -1}, ">= 0"),
    ],
)
def test_bad_input_raises_a_clear_lowmag_error(y_true, y_pred, classes, kwargs, message):
    with pytest.raises(LowmagError, match=message):
        classification_metrics(y_true, y_pred, classes, **kwargs)


def test_format_percent_ci():
    assert format_percent_ci({"value": 0.843, "ci_low": 0.821, "ci_high": 0.864}) == "84.3 (82.1–86.4)"
    assert format_percent_ci({"value": 0.5, "ci_low": None, "ci_high": None}) == "50.0"


def test_format_metrics_table_shows_macro_per_class_and_confusion():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, n_bootstrap=200)
    table = format_metrics_table(m)
    assert f"| Accuracy | 60.0 ({100 * m['accuracy']['ci_low']:.1f}–" in table
    assert "| Macro F1 | 60.3 (" in table  # 38/63
    assert "| a | 66.7 | 50.0 | 57.1 | 4 |" in table
    assert "| c | 66.7 | 66.7 | 66.7 | 3 |" in table
    assert "| True \\ Predicted | a | b | c |" in table
    assert "| a | 2 | 1 | 1 |" in table
    assert "| c | 0 | 1 | 2 |" in table
    assert "200 resamples" in table


def test_format_metrics_table_without_ci():
    table = format_metrics_table(classification_metrics(Y_TRUE, Y_PRED, CLASSES, n_bootstrap=0))
    assert "| Accuracy | 60.0 |" in table
    assert "no bootstrap CI" in table
