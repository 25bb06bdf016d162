"""Classification metrics with bootstrap confidence intervals, as distill-train reports them.

Everything here is computed from the confusion matrix, so a bootstrap resample of the
N test items is fully described by the confusion matrix it produces. Drawing that
matrix directly from ``Multinomial(N, cm / N)`` has exactly the distribution of the
matrix of N items resampled with replacement, costs O(K²) per resample instead of
O(N), and needs no per-item index arrays. Resamples are drawn in chunks so memory
stays near ``_CHUNK_BYTES`` however many classes there are.

numpy only, in the core: distill-train, the export gate and edge-classify bench all use it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lowmag.errors import LowmagError

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 100_000_000
MACRO_METRICS = ("accuracy", "macro_f1", "macro_precision", "macro_recall")
_METRIC_LABELS = {
    "accuracy": "Accuracy",
    "macro_f1": "Macro F1",
    "macro_precision": "Macro precision",
    "macro_recall": "Macro recall",
}


def classification_metrics(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    classes: Sequence[str],
    *,
    n_bootstrap: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1, confusion matrix, bootstrap CIs.

    ``y_true`` and ``y_pred`` hold class indices into ``classes``. Macro averages are
    the unweighted mean over *every* class in ``classes`` (also those absent from
    ``y_true``); 0/0 counts as 0, as scikit-learn's ``zero_division=0``. Percentile
    bootstrap CIs at level ``ci`` come from ``n_bootstrap`` resamples of the test items
    with a numpy Generator seeded by ``seed``; ``n_bootstrap=0`` leaves them None.
    The result holds plain Python numbers only, so it can be written as JSON.
    """
    names = _check_classes(classes)
    truth, pred = _check_labels(y_true, y_pred, len(names))
    n_bootstrap, ci = _check_bootstrap(n_bootstrap, ci)
    k = len(names)
    cm = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
    point = _scores(cm[np.newaxis])
    bounds = _bootstrap_bounds(cm, n_bootstrap, ci, seed)

    result: dict[str, Any] = {"n": int(truth.size), "classes": names}
    for metric in MACRO_METRICS:
        low, high = bounds[metric] if bounds else (None, None)
        result[metric] = {"value": float(point[metric][0]), "ci_low": low, "ci_high": high}
    result["per_class"] = {
        name: {
            "precision": float(point["precision"][0, i]),
            "recall": float(point["recall"][0, i]),
            "f1": float(point["f1"][0, i]),
            "support": int(cm[i].sum()),
        }
        for i, name in enumerate(names)
    }
    result["confusion_matrix"] = cm.astype(int).tolist()
    result["bootstrap"] = {
        "resamples": n_bootstrap,
        "ci": ci,
        "seed": int(seed),
        "method": "percentile",
    }
    return result


def _check_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str):
        raise LowmagError(f"classes must be a list of class names, not the string {classes!r}.")
    names = [str(name) for name in classes]
    if not names:
        raise LowmagError("classes is empty: pass the class names the labels index into.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise LowmagError(f"class names must be unique; repeated: {', '.join(duplicates)}.")
    return names


def _check_labels(y_true: ArrayLike, y_pred: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for label, values in (("y_true", y_true), ("y_pred", y_pred)):
        array = np.asarray(values)
        if array.ndim != 1:
            raise LowmagError(f"{label} must be a 1-D array of class indices, got shape {array.shape}.")
        if array.size and array.dtype.kind not in "iu":
            raise LowmagError(
                f"{label} must hold integer class indices, got dtype {array.dtype}; "
                "pass argmax indices, not scores or names."
            )
        arrays.append(array.astype(np.int64))
    truth, pred = arrays
    if truth.size != pred.size:
        raise LowmagError(f"y_true has {truth.size} labels but y_pred has {pred.size}; they must match.")
    if truth.size == 0:
        raise LowmagError("no test items: y_true and y_pred are empty.")
    for label, array in (("y_true", truth), ("y_pred", pred)):
        bad = array[(array < 0) | (array >= k)]
        if bad.size:
            raise LowmagError(
                f"{label} holds label {int(bad[0])} outside 0..{k - 1} "
                f"({k} classes); check the class list matches the model."
            )
    return truth, pred


def _check_bootstrap(n_bootstrap: int, ci: float) -> tuple[int, float]:
    if isinstance(n_bootstrap, bool) or int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise LowmagError(f"n_bootstrap must be a whole number >= 0, got {n_bootstrap!r}.")
    if not 0.0 < float(ci) < 1.0:
        raise LowmagError(f"ci must be a confidence level between 0 and 1 (e.g. 0.95), got {ci!r}.")
    return int(n_bootstrap), float(ci)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, with 0 wherever the denominator is 0."""
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _scores(cms: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class and macro scores of a batch of confusion matrices, shape (B, K, K)."""
    tp = np.diagonal(cms, axis1=-2, axis2=-1).astype(np.float64)
    predicted = cms.sum(axis=-2)
    actual = cms.sum(axis=-1)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, actual)
    f1 = _safe_divide(2.0 * tp, predicted + actual)  # = 2PR/(P+R), 0 when tp = 0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": _safe_divide(tp.sum(axis=-1), actual.sum(axis=-1)),
        "macro_precision": precision.mean(axis=-1),
        "macro_recall": recall.mean(axis=-1),
        "macro_f1": f1.mean(axis=-1),
    }


def _bootstrap_bounds(
    cm: np.ndarray, n_bootstrap: int, ci: float, seed: int
) -> dict[str, tuple[float, float]]:
    """Percentile CI bounds of the macro metrics over multinomial confusion resamples."""
    if n_bootstrap == 0:
        return {}
    rng = np.random.default_rng(seed)
    n = int(cm.sum())
    k = cm.shape[0]
    cells = cm.ravel() / n
    # Each resample is K*K int64 counts plus a few float copies while scoring.
    chunk = max(1, _CHUNK_BYTES // (k * k * 8 * 8))
    samples: dict[str, list[np.ndarray]] = {metric: [] for metric in MACRO_METRICS}
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        cms = rng.multinomial(n, cells, size=size).reshape(size, k, k)
        scores = _scores(cms)
        for metric in MACRO_METRICS:
            samples[metric].append(scores[metric])
    tail = 100.0 * (1.0 - ci) / 2.0
    bounds = {}
    for metric in MACRO_METRICS:
        low, high = np.percentile(np.concatenate(samples[metric]), [tail, 100.0 - tail])
        bounds[metric] = (float(low), float(high))
    return bounds


def format_percent_ci(entry: dict[str, Any]) -> str:
    """``{"value", "ci_low", "ci_high"}`` as ``"84.3 (82.1–86.4)"`` percent; no CI, no brackets."""
    text = f"{100.0 * entry['value']:.1f}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" ({100.0 * entry['ci_low']:.1f}–{100.0 * entry['ci_high']:.1f})"
    return text


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """The metrics of ``classification_metrics`` as Markdown tables for a terminal or a file.

    Macro metrics with their CI, then per-class precision/recall/F1/support, then the
    confusion matrix with rows = true class and columns = predicted class.
    """
    boot = metrics.get("bootstrap", {})
    if boot.get("resamples"):
        interval = (
            f"{100.0 * boot['ci']:g}% percentile bootstrap CI, "
            f"{boot['resamples']} resamples, seed {boot['seed']}"
        )
    else:
        interval = "no bootstrap CI"
    lines = [
        f"N = {metrics['n']} test items; values in percent ({interval}).",
        "",
        "| Metric | Value (CI) |",
        "|---|---:|",
    ]
    for metric in MACRO_METRICS:
        lines.append(f"| {_METRIC_LABELS[metric]} | {format_percent_ci(metrics[metric])} |")

    lines += ["", "| Class | Precision | Recall | F1 | Support |", "|---|---:|---:|---:|---:|"]
    for name, scores in metrics["per_class"].items():
        lines.append(
            f"| {_escape(name)} | {100.0 * scores['precision']:.1f} | {100.0 * scores['recall']:.1f} "
            f"| {100.0 * scores['f1']:.1f} | {scores['support']} |"
        )

    classes = [_escape(name) for name in metrics["classes"]]
    lines += [
        "",
        "| True \\ Predicted | " + " | ".join(classes) + " |",
        "|---|" + "---:|" * len(classes),
    ]
    for name, row in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(count) for count in row) + " |")
    return "\n".join(lines) + "\n"
