"""What a model's inputs looked like, and how far a slide is from that (torch-free).

A model answers for any pixels it is fed. The *fingerprint* in its spec records what its
training images looked like at its µm/px, read with the one reader; the edge runner
computes the same statistics on the tissue it reads anyway and flags (or refuses) slides
unlike anything the model saw. The check is a guard, not a guarantee.

Statistics of tissue pixels (saturation above the tissue detector's floor, not near white):

- stain amount: mean total optical density (OD = -log10(I/255), summed over R, G, B);
- stain colour: each channel's share of the mean OD (intensity-free, so a darker or paler
  H&E keeps it while IHC, fluorescence or another stain moves it);
- the eosin share of the haematoxylin + eosin signal (Ruifrok & Johnston's colour
  deconvolution), and the mean haematoxylin, eosin and DAB (recorded, not scored);
- mean colour saturation;
- sharpness: the log of the grey level's fine detail (its distance to a 3 x 3 mean) over
  its spread, at the model's µm/px: blur beyond the magnification lowers it;
- a coarse 6 x 6 histogram of (haematoxylin, eosin), compared as a total-variation distance;
- the tissue fraction (recorded, not scored: slides and training tiles differ in it).

Each scored statistic becomes a robust z-score against the training images (median and
1.4826 x MAD); a slide's score is the largest |z|. The threshold is the 99th percentile of
the scores of held-out training-like images (at least ``MIN_THRESHOLD``), so about 99 % of
in-distribution images pass by construction.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

FINGERPRINT_VERSION = "lowmag-fingerprint-1"

#: Statistics that are scored, with the direction that makes a slide suspect (0: either).
SCORED = {"od_total": 0, "od_r_share": 0, "od_g_share": 0, "od_b_share": 0, "eosin_share": 0, "saturation": 0,
          "sharpness": 0, "histogram_distance": 1}
#: Statistics recorded with the scored ones, for people (too spread out to score).
RECORDED = ("hematoxylin", "eosin", "dab", "tissue_fraction")
#: Fewer tissue pixels than this give no statistics (an empty tile, a blank piece).
MIN_TISSUE_PIXELS = 64
#: Training and held-out images count only with at least this tissue fraction: the
#: statistics of a tile that is mostly glass are noise, and a slide's tissue pieces are
#: never mostly glass after the tissue step.
MIN_TISSUE_FRACTION = 0.5
#: The threshold is never below this (a tiny held-out set must not make it hair-trigger).
MIN_THRESHOLD = 4.0
#: Share of held-out images meant to pass.
HELD_OUT_PASS = 0.99

_MIN_SATURATION = 0.07
_WHITE_OD = 0.06  # total OD below this is glass, not stain
# Ruifrok & Johnston (2001): OD vectors of haematoxylin, eosin and DAB (rows).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_HIST_BINS = 6
_HIST_RANGE = (-0.1, 1.1)
#: Longest side of the window the sharpness is measured on (its cost stays bounded).
_SHARPNESS_WINDOW = 1024
#: At most this many pixels of one image feed the colour statistics (a regular subsample).
_COLOUR_PIXELS = 1 << 20
#: Optical density of each 8-bit level: -log10(max(I, 1) / 255).
_OD = (-np.log10(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)).astype(np.float32)


class StainStats:
    """Accumulates the statistics of tissue pixels over one or many images (pieces, tiles)."""

    def __init__(self, min_saturation: float = _MIN_SATURATION) -> None:
        self.min_saturation = min_saturation
        self.pixels = 0
        self.tissue = 0.0
        self.sampled = 0
        self.od = np.zeros(3)
        self.hed = np.zeros(3)
        self.saturation = 0.0
        self.detail = 0.0
        self.grey = np.zeros(2)  # sum, sum of squares
        self.sharp_pixels = 0
        self.hist = np.zeros((_HIST_BINS, _HIST_BINS))

    def add(self, rgb: np.ndarray) -> None:
        """Add one RGB uint8 image (any size) at the model's µm/px."""
        h, w = rgb.shape[:2]
        self.pixels += h * w
        step = max(1, math.ceil(math.sqrt(h * w / _COLOUR_PIXELS)))
        sample = rgb[::step, ::step]
        r, g, b = sample[..., 0], sample[..., 1], sample[..., 2]
        high = np.maximum(np.maximum(r, g), b)
        saturation = (high - np.minimum(np.minimum(r, g), b)).astype(np.float32) / np.maximum(high, 1)
        od_r, od_g, od_b = _OD[r], _OD[g], _OD[b]
        tissue = (saturation > self.min_saturation) & (od_r + od_g + od_b > _WHITE_OD)
        count = int(np.count_nonzero(tissue))
        self.tissue += count * (h * w) / max(r.size, 1)
        self.sampled += count
        if count:
            od = np.stack([od_r[tissue], od_g[tissue], od_b[tissue]], axis=1).astype(np.float64)
            hed = od @ _HED_FROM_RGB
            self.od += od.sum(axis=0)
            self.hed += hed.sum(axis=0)
            self.saturation += float(saturation[tissue].sum(dtype=np.float64))
            low, span = _HIST_RANGE[0], _HIST_RANGE[1] - _HIST_RANGE[0]
            bins = np.clip(((hed[:, :2] - low) / span * _HIST_BINS).astype(np.int64), 0, _HIST_BINS - 1)
            self.hist += np.bincount(bins[:, 0] * _HIST_BINS + bins[:, 1],
                                     minlength=_HIST_BINS * _HIST_BINS).reshape(_HIST_BINS, _HIST_BINS)
        self._add_sharpness(rgb)

    def _add_sharpness(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        top, left = max(0, (h - _SHARPNESS_WINDOW) // 2), max(0, (w - _SHARPNESS_WINDOW) // 2)
        window = rgb[top:top + _SHARPNESS_WINDOW, left:left + _SHARPNESS_WINDOW]
        if min(window.shape[:2]) < 3:
            return
        r, g, b = window[..., 0], window[..., 1], window[..., 2]
        high = np.maximum(np.maximum(r, g), b)
        saturation = (high - np.minimum(np.minimum(r, g), b)).astype(np.float32) / np.maximum(high, 1)
        tissue = (saturation > self.min_saturation)[1:-1, 1:-1]
        n = int(np.count_nonzero(tissue))
        if not n:
            return
        grey = (r.astype(np.float32) + g + b) / 3.0
        rows = grey[:-2] + grey[1:-1] + grey[2:]  # a 3 x 3 mean, as two 1-D sums
        local = (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0
        centre = grey[1:-1, 1:-1]
        values = centre[tissue]
        self.detail += float(np.abs(centre - local)[tissue].sum(dtype=np.float64))
        self.grey += (float(values.sum(dtype=np.float64)), float((values.astype(np.float64) ** 2).sum()))
        self.sharp_pixels += n

    def features(self) -> dict[str, float] | None:
        """The statistics, or None with fewer than ``MIN_TISSUE_PIXELS`` tissue pixels."""
        if self.sampled < MIN_TISSUE_PIXELS:
            return None
        n = self.sampled
        od = self.od / n
        total = float(od.sum())
        hematoxylin, eosin, dab = self.hed / n
        out = {"od_total": total, "od_r_share": od[0] / max(total, 1e-6), "od_g_share": od[1] / max(total, 1e-6),
               "od_b_share": od[2] / max(total, 1e-6),
               "eosin_share": max(eosin, 0.0) / max(max(hematoxylin, 0.0) + max(eosin, 0.0), 1e-6),
               "saturation": self.saturation / n, "hematoxylin": hematoxylin, "eosin": eosin, "dab": dab,
               "tissue_fraction": self.tissue / max(self.pixels, 1)}
        if self.sharp_pixels >= MIN_TISSUE_PIXELS:
            mean = self.grey[0] / self.sharp_pixels
            spread = math.sqrt(max(self.grey[1] / self.sharp_pixels - mean * mean, 0.0))
            out["sharpness"] = math.log(max(self.detail / self.sharp_pixels, 1e-3) / max(spread, 1.0))
        return {k: float(round(v, 6)) for k, v in out.items()}

    def histogram(self) -> np.ndarray:
        total = self.hist.sum()
        return self.hist / total if total else self.hist


def image_stats(rgb: np.ndarray, min_saturation: float = _MIN_SATURATION) -> tuple[dict | None, np.ndarray]:
    """Statistics and (H, E) histogram of one image."""
    stats = StainStats(min_saturation)
    stats.add(rgb)
    return stats.features(), stats.histogram()


def usable(features: Mapping[str, float] | None) -> bool:
    """An image whose statistics may calibrate or test a fingerprint (enough tissue)."""
    return features is not None and "sharpness" in features and features["tissue_fraction"] >= MIN_TISSUE_FRACTION


def _histogram_distance(a: np.ndarray, b: Sequence[Sequence[float]]) -> float:
    return float(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


@dataclass(frozen=True)
class Verdict:
    """A slide against a fingerprint: ``in_distribution`` or ``out_of_distribution``, why."""

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
    def build(cls, training: Iterable[np.ndarray], held_out: Iterable[np.ndarray], mpp: float, source: str,
              min_saturation: float = _MIN_SATURATION) -> "Fingerprint":
        """From training images and held-out images (all at ``mpp``, read with the one reader)."""
        rows, hists = [], []
        for rgb in training:
            features, hist = image_stats(rgb, min_saturation)
            if usable(features):
                rows.append(features)
                hists.append(hist)
        if len(rows) < 20:
            from lowmag.errors import LowmagError

            raise LowmagError(f"a fingerprint needs at least 20 training images with tissue, got {len(rows)}")
        reference = np.mean(hists, axis=0)
        for row, hist in zip(rows, hists):
            row["histogram_distance"] = _histogram_distance(hist, reference)
        stats = {}
        for name in [*SCORED, *RECORDED]:
            values = np.array([row[name] for row in rows], np.float64)
            median = float(np.median(values))
            scale = float(1.4826 * np.median(np.abs(values - median)))
            scale = max(scale, 1e-3 * max(abs(median), 1e-3), 1e-6)
            stats[name] = {"median": round(median, 6), "scale": round(scale, 6),
                           "p01": round(float(np.quantile(values, 0.01)), 6),
                           "p99": round(float(np.quantile(values, 0.99)), 6)}
        data: dict[str, Any] = {"version": FINGERPRINT_VERSION, "mpp": mpp, "source": source, "images": len(rows),
                                "min_saturation": min_saturation, "features": stats,
                                "histogram": [[round(float(v), 6) for v in r] for r in reference]}
        fingerprint = cls(data)
        scores = []
        for rgb in held_out:
            features, hist = image_stats(rgb, min_saturation)
            if usable(features):
                scores.append(fingerprint.judge(features, hist).score)
        threshold = max(MIN_THRESHOLD, float(np.quantile(scores, HELD_OUT_PASS))) if scores else MIN_THRESHOLD
        data.update(threshold=round(threshold, 3), held_out_images=len(scores),
                    held_out_pass_rate=round(float(np.mean([s <= threshold for s in scores])), 4) if scores else None)
        data["sha256"] = _digest(data)
        return cls(data)

    def check(self) -> list[str]:
        """Problems with a stored fingerprint (version, damage), empty when usable."""
        data = self.data
        if data.get("version") != FINGERPRINT_VERSION:
            return [f"fingerprint version {data.get('version')!r} is not {FINGERPRINT_VERSION!r}"]
        if data.get("sha256") != _digest(data):
            return ["the fingerprint does not match its sha256 (edited or damaged)"]
        return []

    @property
    def threshold(self) -> float:
        return float(self.data["threshold"])

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
