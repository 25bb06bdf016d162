"""What a model's inputs looked like, and how far a slide is from that (torch-free).

A model answers for any pixels it is fed. The *fingerprint* in its spec records what its
training images looked like at its µm/px, read with the one reader; the edge runner
computes the same statistics on the tissue it reads anyway and flags (or refuses) slides
unlike anything the model saw. The check is a guard, not a guarantee.

Statistics are computed per *window*: a square about the size of a training image (the
fingerprint records it), so a training tile and a window of a slide are measured alike.
Per window, of its tissue pixels (saturation above the tissue detector's floor, not near
white):

- stain amount: mean total optical density (OD = -log10(I/255), summed over R, G, B);
- stain colour: each channel's share of the mean OD (intensity-free, so a darker or paler
  H&E keeps it while IHC, fluorescence or another stain moves it);
- the eosin share of the haematoxylin + eosin signal (Ruifrok & Johnston's colour
  deconvolution), and the mean haematoxylin, eosin and DAB (recorded, not scored);
- mean colour saturation;
- sharpness: the log of the grey level's fine detail (its distance to a 3 x 3 mean) over
  its spread: blur beyond the magnification lowers it;
- the tissue fraction (recorded, not scored; windows under half tissue are not used).

A coarse 6 x 6 histogram of (haematoxylin, eosin) over all tissue pixels is compared as a
total-variation distance. Each scored statistic becomes a robust z-score against the
training windows (median and 1.4826 x MAD, never below a floor in the statistic's own
units, so tightly normalised training data does not flag every slide); a slide's
statistics are the medians over its usable windows, and its score is the largest |z|. The
threshold is the 99th percentile of the scores of held-out training-like windows (at least
``MIN_THRESHOLD``): about 99 % of single held-out images pass by construction, and a
slide, a median over many windows, varies less, so the check errs towards few alarms.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

FINGERPRINT_VERSION = "lowmag-fingerprint-1"

#: Statistics that are scored, with the direction that makes a slide suspect (0: either),
#: and the smallest spread a z-score uses (in the statistic's own units).
SCORED = {"od_total": 0, "od_r_share": 0, "od_g_share": 0, "od_b_share": 0, "eosin_share": 0, "saturation": 0,
          "sharpness": 0, "histogram_distance": 1}
SCALE_FLOOR = {"od_total": 0.05, "od_r_share": 0.01, "od_g_share": 0.01, "od_b_share": 0.01, "eosin_share": 0.02,
               "saturation": 0.02, "sharpness": 0.05, "histogram_distance": 0.02}
#: Statistics recorded with the scored ones, for people (too spread out to score).
RECORDED = ("hematoxylin", "eosin", "dab", "tissue_fraction")
#: A window needs this many tissue pixels to have statistics.
MIN_TISSUE_PIXELS = 64
#: ... and at least this tissue fraction: the statistics of a mostly-glass tile are noise.
MIN_TISSUE_FRACTION = 0.5
#: The threshold is never below this (a tiny held-out set must not make it hair-trigger).
MIN_THRESHOLD = 4.0
#: Share of held-out windows meant to pass.
HELD_OUT_PASS = 0.99
#: Window sides (pixels at the model's µm/px) a fingerprint may use.
WINDOW_RANGE = (16, 128)
#: The fewest training windows a fingerprint is made from.
MIN_TRAINING_WINDOWS = 20

_MIN_SATURATION = 0.07
_WHITE_OD = 0.06  # total OD below this is glass, not stain
# Ruifrok & Johnston (2001): OD vectors of haematoxylin, eosin and DAB (rows).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_HIST_BINS = 6
_HIST_RANGE = (-0.1, 1.1)
#: Optical density of each 8-bit level: -log10(max(I, 1) / 255).
_OD = (-np.log10(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)).astype(np.float32)
_REQUIRED = ("version", "mpp", "window_px", "min_saturation", "images", "features", "histogram", "threshold")


def _window_sums(rgb: np.ndarray, window: int, min_saturation: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-window sums over tissue pixels (arrays of shape (windows,)) and the (H, E)
    histogram of all tissue pixels. An image smaller than ``window`` is one window."""
    h, w = rgb.shape[:2]
    wy, wx = min(window, h), min(window, w)
    ny, nx = h // wy, w // wx
    crop = rgb[: ny * wy, : nx * wx]
    r, g, b = (crop[..., i] for i in range(3))
    high = np.maximum(np.maximum(r, g), b)
    saturation = (high - np.minimum(np.minimum(r, g), b)).astype(np.float32) / np.maximum(high, 1)
    od = [_OD[c] for c in (r, g, b)]
    tissue = (saturation > min_saturation) & (od[0] + od[1] + od[2] > _WHITE_OD)
    grey = (r.astype(np.float32) + g + b) / 3.0
    detail = np.zeros_like(grey)
    sharp = np.zeros_like(tissue)
    if min(crop.shape[:2]) >= 3:  # the 3 x 3 mean, as two 1-D sums; the 1-px border has none
        rows = grey[:-2] + grey[1:-1] + grey[2:]
        local = (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0
        detail[1:-1, 1:-1] = np.abs(grey[1:-1, 1:-1] - local)
        sharp[1:-1, 1:-1] = (saturation > min_saturation)[1:-1, 1:-1]

    def per_window(values: np.ndarray) -> np.ndarray:
        return values.reshape(ny, wy, nx, wx).sum(axis=(1, 3), dtype=np.float64).ravel()

    t = tissue.astype(np.float32)
    s = sharp.astype(np.float32)
    sums = {"pixels": np.full(ny * nx, float(wy * wx)), "tissue": per_window(t),
            "od_r": per_window(od[0] * t), "od_g": per_window(od[1] * t), "od_b": per_window(od[2] * t),
            "saturation": per_window(saturation * t), "sharp": per_window(s), "detail": per_window(detail * s),
            "grey": per_window(grey * s), "grey2": per_window(grey.astype(np.float64) ** 2 * s)}
    hist = np.zeros((_HIST_BINS, _HIST_BINS))
    if tissue.any():
        pixels = np.stack([od[0][tissue], od[1][tissue], od[2][tissue]], axis=1).astype(np.float64)
        hed = pixels @ _HED_FROM_RGB
        low, span = _HIST_RANGE[0], _HIST_RANGE[1] - _HIST_RANGE[0]
        bins = np.clip(((hed[:, :2] - low) / span * _HIST_BINS).astype(np.int64), 0, _HIST_BINS - 1)
        hist += np.bincount(bins[:, 0] * _HIST_BINS + bins[:, 1],
                            minlength=_HIST_BINS * _HIST_BINS).reshape(_HIST_BINS, _HIST_BINS)
    return sums, hist


def _features(sums: Mapping[str, np.ndarray | float]) -> dict[str, np.ndarray]:
    """Statistics from sums (arrays: one value per window; scalars: pooled)."""
    n = np.maximum(np.asarray(sums["tissue"], np.float64), 1.0)
    od = np.stack([np.asarray(sums[k], np.float64) / n for k in ("od_r", "od_g", "od_b")], axis=-1)
    total = od.sum(axis=-1)
    hed = od @ _HED_FROM_RGB
    h, e = np.maximum(hed[..., 0], 0.0), np.maximum(hed[..., 1], 0.0)
    sharp = np.maximum(np.asarray(sums["sharp"], np.float64), 1.0)
    mean = np.asarray(sums["grey"]) / sharp
    spread = np.sqrt(np.maximum(np.asarray(sums["grey2"]) / sharp - mean * mean, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "od_total": total, "od_r_share": od[..., 0] / np.maximum(total, 1e-6),
            "od_g_share": od[..., 1] / np.maximum(total, 1e-6), "od_b_share": od[..., 2] / np.maximum(total, 1e-6),
            "eosin_share": e / np.maximum(h + e, 1e-6), "saturation": np.asarray(sums["saturation"]) / n,
            "hematoxylin": hed[..., 0], "eosin": hed[..., 1], "dab": hed[..., 2],
            "tissue_fraction": np.asarray(sums["tissue"]) / np.maximum(np.asarray(sums["pixels"]), 1.0),
            "sharpness": np.log(np.maximum(np.asarray(sums["detail"]) / sharp, 1e-3) / np.maximum(spread, 1.0)),
        }


def _usable_mask(sums: Mapping[str, np.ndarray]) -> np.ndarray:
    pixels = np.maximum(sums["pixels"], 1.0)
    return ((sums["tissue"] >= MIN_TISSUE_PIXELS) & (sums["tissue"] / pixels >= MIN_TISSUE_FRACTION)
            & (sums["sharp"] >= MIN_TISSUE_PIXELS))


class StainStats:
    """The statistics of the windows of one or many images (the pieces and tiles of a slide)."""

    def __init__(self, window_px: int, min_saturation: float = _MIN_SATURATION) -> None:
        self.window_px = int(window_px)
        self.min_saturation = min_saturation
        self.windows: list[dict[str, np.ndarray]] = []  # per-window statistics of the usable windows
        self.pooled = {k: 0.0 for k in ("pixels", "tissue", "od_r", "od_g", "od_b", "saturation", "sharp", "detail",
                                        "grey", "grey2")}
        self.hist = np.zeros((_HIST_BINS, _HIST_BINS))

    def add(self, rgb: np.ndarray) -> None:
        """Add one RGB uint8 image (any size) at the model's µm/px."""
        sums, hist = _window_sums(rgb, self.window_px, self.min_saturation)
        self.hist += hist
        for key, values in sums.items():
            self.pooled[key] += float(values.sum())
        usable = _usable_mask(sums)
        if usable.any():
            features = _features(sums)
            self.windows.append({k: v[usable] for k, v in features.items()})

    def window_features(self) -> list[dict[str, float]]:
        """Each usable window's statistics (the samples a fingerprint is made from)."""
        rows = []
        for block in self.windows:
            for i in range(len(block["od_total"])):
                rows.append({k: float(v[i]) for k, v in block.items()})
        return rows

    def features(self) -> dict[str, float] | None:
        """The medians over the usable windows; None when there is none (too little tissue).

        The pooled tissue fraction is reported with them."""
        if not self.windows:
            return None
        merged = {k: np.concatenate([w[k] for w in self.windows]) for k in self.windows[0]}
        out = {k: float(np.median(v)) for k, v in merged.items()}
        out["tissue_fraction"] = self.pooled["tissue"] / max(self.pooled["pixels"], 1.0)
        out["windows"] = float(len(merged["od_total"]))
        return {k: round(v, 6) for k, v in out.items()}

    def histogram(self) -> np.ndarray:
        total = self.hist.sum()
        return self.hist / total if total else self.hist


def window_for(images: Iterable[np.ndarray]) -> int:
    """The window side for a set of training images: their median shorter side, in range."""
    sides = [min(rgb.shape[:2]) for rgb in images]
    if not sides:
        return WINDOW_RANGE[1]
    return int(min(max(int(np.median(sides)), WINDOW_RANGE[0]), WINDOW_RANGE[1]))


def image_windows(rgb: np.ndarray, window_px: int, min_saturation: float = _MIN_SATURATION
                  ) -> tuple[list[dict[str, float]], np.ndarray]:
    """The usable windows' statistics of one image, and its (H, E) histogram."""
    stats = StainStats(window_px, min_saturation)
    stats.add(rgb)
    return stats.window_features(), stats.histogram()


def _histogram_distance(a: np.ndarray, b: Sequence[Sequence[float]]) -> float:
    return float(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


@dataclass(frozen=True)
class Verdict:
    """A slide against a fingerprint: ``in_distribution``, ``out_of_distribution`` or
    ``unchecked``, and why."""

    verdict: str
    score: float | None
    threshold: float | None
    reasons: tuple[str, ...] = ()
    features: Mapping[str, float] = field(default_factory=dict)
    z: Mapping[str, float] = field(default_factory=dict)

    @property
    def out(self) -> bool:
        return self.verdict == "out_of_distribution"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "score": None if self.score is None else round(self.score, 3),
                "threshold": self.threshold, "reasons": list(self.reasons), "features": dict(self.features),
                "z": {k: round(v, 2) for k, v in self.z.items()}}


class Fingerprint:
    """The training data's statistics as stored in a spec (``ModelSpec.fingerprint``)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = dict(data)

    @classmethod
    def build(cls, training: Sequence[np.ndarray], held_out: Iterable[np.ndarray], mpp: float, source: str,
              min_saturation: float = _MIN_SATURATION) -> "Fingerprint":
        """From training images and held-out images (all at ``mpp``, read with the one reader)."""
        training = list(training)
        window = window_for(training)
        rows, hists = [], []
        for rgb in training:
            windows, hist = image_windows(rgb, window, min_saturation)
            if windows:
                rows += windows
                hists.append(hist)
        if len(rows) < MIN_TRAINING_WINDOWS:
            from lowmag.errors import LowmagError

            raise LowmagError(f"a fingerprint needs at least {MIN_TRAINING_WINDOWS} training windows with tissue, "
                              f"got {len(rows)}")
        reference = np.mean(hists, axis=0)
        distances = [_histogram_distance(h, reference) for h in hists]
        stats = {}
        for name in [*SCORED, *RECORDED]:
            values = np.array(distances if name == "histogram_distance" else [row[name] for row in rows])
            median = float(np.median(values))
            scale = max(float(1.4826 * np.median(np.abs(values - median))), SCALE_FLOOR.get(name, 1e-6))
            stats[name] = {"median": round(median, 6), "scale": round(scale, 6),
                           "p01": round(float(np.quantile(values, 0.01)), 6),
                           "p99": round(float(np.quantile(values, 0.99)), 6)}
        data: dict[str, Any] = {"version": FINGERPRINT_VERSION, "mpp": mpp, "source": source, "window_px": window,
                                "images": len(hists), "windows": len(rows), "min_saturation": min_saturation,
                                "features": stats, "histogram": [[round(float(v), 6) for v in r] for r in reference],
                                "threshold": MIN_THRESHOLD}
        fingerprint = cls(data)
        scores = []
        for rgb in held_out:
            windows, hist = image_windows(rgb, window, min_saturation)
            scores += [fingerprint.judge(w, hist).score for w in windows]
        threshold = max(MIN_THRESHOLD, float(np.quantile(scores, HELD_OUT_PASS))) if scores else MIN_THRESHOLD
        data.update(threshold=round(threshold, 3), held_out_windows=len(scores),
                    held_out_pass_rate=round(float(np.mean([s <= threshold for s in scores])), 4) if scores else None)
        data["sha256"] = _digest(data)
        return cls(data)

    def check(self, target_mpp: float | None = None) -> list[str]:
        """Problems that make a stored fingerprint unusable (another version, damage, missing
        parts, another µm/px than the model's); empty when it can be used."""
        data = self.data
        if data.get("version") != FINGERPRINT_VERSION:
            return [f"fingerprint version {data.get('version')!r} is not {FINGERPRINT_VERSION!r} (this lowmag "
                    "reads only that one)"]
        missing = [key for key in _REQUIRED if key not in data]
        features = data.get("features") if isinstance(data.get("features"), Mapping) else {}
        missing += [f"features.{name}" for name in SCORED if name not in features]
        if missing:
            return [f"the fingerprint lacks {', '.join(missing)}"]
        if np.asarray(data["histogram"]).shape != (_HIST_BINS, _HIST_BINS):
            return ["the fingerprint's histogram is not 6 x 6"]
        if data.get("sha256") != _digest(data):
            return ["the fingerprint does not match its sha256 (edited or damaged)"]
        if target_mpp is not None and abs(float(data["mpp"]) - target_mpp) > 0.01 * target_mpp:
            return [f"the fingerprint describes images at {data['mpp']:g} µm/px, the model reads {target_mpp:g}"]
        return []

    @property
    def threshold(self) -> float:
        return float(self.data["threshold"])

    def stats(self) -> StainStats:
        """An empty accumulator measuring the way this fingerprint was made."""
        return StainStats(int(self.data["window_px"]), float(self.data["min_saturation"]))

    def judge(self, features: Mapping[str, float] | None, histogram: np.ndarray | None = None,
              modality: tuple[str, ...] = ()) -> Verdict:
        """Score statistics against the fingerprint; ``modality`` adds the tissue step's reasons
        (a dark background, no colour), which make a slide out of distribution by themselves."""
        threshold = self.data.get("threshold")
        if features is None:
            reasons = tuple(modality) or ("too little stained tissue to compare with the training data",)
            return Verdict("out_of_distribution", None, threshold, reasons)
        values = dict(features)
        if histogram is not None and np.asarray(histogram).sum() > 0:
            values["histogram_distance"] = _histogram_distance(histogram, self.data["histogram"])
        z = {}
        for name, direction in SCORED.items():
            if name not in values:
                continue
            ref = self.data["features"][name]
            score = (values[name] - ref["median"]) / ref["scale"]
            z[name] = max(score, 0.0) if direction > 0 else score
        score = max((abs(v) for v in z.values()), default=0.0)
        limit = threshold if threshold is not None else MIN_THRESHOLD
        reasons = list(modality)  # (stain statistics of a non-brightfield image say nothing more)
        if score > limit and not reasons:
            reasons = _explain(z, limit)
        verdict = "out_of_distribution" if reasons else "in_distribution"
        return Verdict(verdict, score, threshold, tuple(reasons), {k: round(v, 4) for k, v in values.items()}, z)


def _explain(z: Mapping[str, float], limit: float) -> list[str]:
    """Words for the statistics beyond the threshold."""
    off = {k: v for k, v in z.items() if abs(v) > limit}
    reasons = []
    if off.get("saturation", 0) < 0:
        reasons.append("little colour in the tissue: greyscale, faded or unstained?")
    if off.get("od_total", 0) < 0:
        reasons.append("much paler than the training slides: faded, unstained or overexposed?")
    elif off.get("od_total", 0) > 0:
        reasons.append("much darker than the training slides: a thick section, another stain or underexposed?")
    if off.get("eosin_share", 0) < 0:
        reasons.append("little eosin next to the haematoxylin: an IHC counterstain or another stain, not H&E?")
    elif any(k in off for k in ("od_r_share", "od_g_share", "od_b_share", "eosin_share", "histogram_distance")):
        worst = max((k for k in off if k.endswith("share") or k == "histogram_distance"), key=lambda k: abs(off[k]))
        reasons.append(f"stain colours unlike the training slides ({worst} {off[worst]:+.1f} robust SDs): another "
                       "stain (IHC?) or a colour-shifted scan?")
    if off.get("sharpness", 0) < 0:
        reasons.append("out of focus at this magnification (less fine detail than the training images)")
    elif off.get("sharpness", 0) > 0:
        reasons.append("more fine detail or noise than the training images: another magnification or scanner?")
    return reasons


def _digest(data: Mapping[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
