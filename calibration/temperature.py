"""Confidence calibration by temperature scaling (Guo et al., 2017).

One scalar T divides the logits before the softmax. It is fitted on a labeled validation
set by minimising the negative log-likelihood; it never changes which class wins, only
how confident the model says it is, which is what ``needs_review`` thresholds rely on.
Expected calibration error (ECE, 15 equal-width confidence bins) is reported before and
after. numpy only, so it runs wherever logits exist.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lowmag.errors import LowmagError

#: Search range for T. Outside it a temperature is not a calibration but a symptom: T = 0.07
#: (fitted on 60 images a tiny model got 95 % right) would sharpen confidences 14-fold. A fit
#: at either end means the data cannot pin T down.
T_MIN, T_MAX = 0.25, 8.0

#: A fit rests on the validation images the model gets wrong (NLL falls as T -> 0 while it
#: gets all right); with fewer errors than this one image decides T, so it is not trusted.
MIN_ERRORS = 3


def _log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    logp = _log_softmax(logits, temperature)
    return float(-logp[np.arange(len(labels)), labels].mean())


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = 15) -> float:
    """Mean |accuracy − confidence| over equal-width confidence bins, weighted by count."""
    probs = np.exp(_log_softmax(logits, temperature))
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Fit T on validation logits; returns T with NLL and ECE before and after, and whether
    the fit can be trusted (``trusted``; else ``why_not_trusted``): not at the edge of
    ``T_MIN``-``T_MAX``, and resting on at least ``MIN_ERRORS`` misclassified images."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) < 20:
        raise LowmagError(
            f"temperature scaling needs at least 20 labeled validation images, got {len(labels)}; "
            "pass a larger --val-images folder."
        )
    # NLL is convex in 1/T: golden-section search on log T is robust and needs no gradients.
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = (negative_log_likelihood(logits, labels, math.exp(v)) for v in (a, b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = negative_log_likelihood(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = negative_log_likelihood(logits, labels, math.exp(b))
    temperature = math.exp((lo + hi) / 2)
    errors = int((logits.argmax(axis=1) != labels).sum())
    at_limit = bool(temperature < T_MIN * 1.01 or temperature > T_MAX * 0.99)
    why = None
    if at_limit:
        why = (f"the fit ran to the edge of its range ({T_MIN:g}-{T_MAX:g}), so the validation set cannot pin T "
               "down")
    elif errors < MIN_ERRORS:
        why = f"the model gets only {errors} of {len(labels)} validation images wrong: too few errors to rest T on"
    return {
        "temperature": round(temperature, 4),
        "images": int(len(labels)),
        "nll_before": round(negative_log_likelihood(logits, labels), 4),
        "nll_after": round(negative_log_likelihood(logits, labels, temperature), 4),
        "ece_before": round(expected_calibration_error(logits, labels), 4),
        "ece_after": round(expected_calibration_error(logits, labels, temperature), 4),
        "bins": 15,
        "errors": errors,
        "search_range": [T_MIN, T_MAX],
        "at_search_limit": at_limit,
        "trusted": why is None,
        "why_not_trusted": why,
    }
