"""Measure the out-of-distribution check: false alarms on Kather test tiles, cost per slide.

For each Kather student magnification (10x, 5x, 2.5x: scan/2, scan/4, scan/8 of the
kather2016 config), the fingerprint is made exactly as ``distill-train`` records it for the
labeled+unlabeled student (``Experiment.fingerprint``, the config's own grouped splits,
threshold on the validation tiles), then:

- false alarms: the share of the test split's tiles (those with at least half tissue; the
  rest are counted apart) the check flags;
- slides: the verdict on the real CMU-1 slides and on slides built from their tissue
  (fluorescence-like, greyscale, blurred, inverted) and on the IHC image;
- cost: the ``distribution`` stage of the edge pipeline against its total on the three
  CMU-1 slides (median of 5 runs; a stand-in model, since the stage does not depend on it).

Usage: python docs/ood-measure.py [--out docs/ood]   (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowmag.edge.bench import machine  # noqa: E402
from lowmag.fingerprint import Fingerprint, image_windows  # noqa: E402
from lowmag.synthetic import VARIANTS, write_variant  # noqa: E402

SLIDES = REPO.parent / "shared" / "data" / "slides"
CMU = ["aperio/CMU-1-Small-Region.svs", "generic-tiff/CMU-1-Small-Region-pyramid.tif", "dicom/CMU-1-Small-Region"]


def experiment(work: Path):
    from lowmag.train.config import load_config
    from lowmag.train.engine import make_runtime
    from lowmag.train.experiment import Experiment

    config = load_config(REPO / "train" / "configs" / "kather2016.toml")
    return Experiment(config, work / "run", make_runtime(config.runtime))


def false_alarms(exp, step, fingerprint: Fingerprint) -> dict:
    cache = exp.cache("test", step.resolution)
    checked = []
    for i in range(len(cache)):  # one window per tile: a tile is a training image
        windows, histogram = image_windows(cache[i], fingerprint.data["window_px"])
        checked += [fingerprint.judge(w, histogram) for w in windows]
    flagged = sum(v.out for v in checked)
    return {"test_tiles": len(cache), "checked": len(checked), "too_little_tissue": len(cache) - len(checked),
            "flagged": flagged, "false_alarm_rate": round(flagged / max(len(checked), 1), 4)}


def slide_verdicts(bundle: Path, work: Path) -> dict:
    from lowmag.bundle import load_bundle
    from lowmag.edge.backends import choose_backend, open_session
    from lowmag.edge.pipeline import PipelineConfig, SlideClassifier

    loaded = load_bundle(bundle)
    classifier = SlideClassifier(loaded, open_session(loaded, choose_backend(loaded), None), PipelineConfig())
    cases = {name: (SLIDES / name, None) for name in CMU}
    for kind in VARIANTS:
        cases[f"CMU-1 {kind}"] = (write_variant(SLIDES / CMU[0], work / f"{kind}.tif", kind), None)
    cases["IHC (--assume-mpp 1.9)"] = (SLIDES / "bad" / "untiled-ihc-no-mpp.tif", 1.9)
    verdicts, cost = {}, {}
    for name, (path, mpp) in cases.items():
        classifier.config = PipelineConfig(assume_mpp=mpp)
        runs = [classifier.classify(path) for _ in range(5 if name in CMU else 1)]
        verdict = runs[-1].distribution
        verdicts[name] = {"verdict": verdict.verdict, "score": verdict.score and round(verdict.score, 2),
                          "reasons": list(verdict.reasons)}
        if name in CMU:
            timings = [r.timer.ms() for r in runs]
            cost[name] = {"distribution_ms": statistics.median(t["distribution"] for t in timings),
                          "total_ms": statistics.median(t["total"] for t in timings)}
    return {"slides": verdicts, "cost": cost}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ood")
    args = parser.parse_args()
    from lowmag.train.experiment import Step
    from tests.models import make_bundle

    results = {"machine": machine(), "command": "python docs/ood-measure.py", "magnifications": {}}
    with tempfile.TemporaryDirectory(prefix="lowmag-ood-") as scratch:
        work = Path(scratch)
        exp = experiment(work)
        for resolution in ("scan/2", "scan/4", "scan/8"):
            step = Step("distill", resolution, regime="labeled+unlabeled")
            fingerprint = Fingerprint(exp.fingerprint(step))
            row = {"mpp": fingerprint.data["mpp"], "threshold": fingerprint.threshold,
                   "training_images": fingerprint.data["images"], "window_px": fingerprint.data["window_px"],
                   "held_out_windows": fingerprint.data["held_out_windows"],
                   "held_out_pass_rate": fingerprint.data["held_out_pass_rate"],
                   **false_alarms(exp, step, fingerprint)}
            if resolution == "scan/4":  # the 5x student: slides and cost through the edge pipeline
                bundle = make_bundle(work / "bundle", "onnx", target_mpp=fingerprint.data["mpp"],
                                     fingerprint=fingerprint.data)
                row.update(slide_verdicts(bundle, work))
            results["magnifications"][resolution] = row
            print(resolution, json.dumps({k: v for k, v in row.items() if k not in ("slides",)}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(f"wrote {args.out / 'results.md'}")
    return 0


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# The out-of-distribution check, measured", "",
             f"Command: `{results['command']}`. Machine: {m.get('model', '?')}, {m.get('cores', '?')} cores, "
             f"{m.get('ram_gib', '?')} GiB.", "",
             "| student | µm/px | window px | threshold | training images | held-out pass | test tiles checked | "
             "flagged | false-alarm rate | tiles with too little tissue |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for resolution, r in results["magnifications"].items():
        lines.append(f"| {resolution} | {r['mpp']:.3g} | {r['window_px']} | {r['threshold']:g} | "
                     f"{r['training_images']} | "
                     f"{100 * r['held_out_pass_rate']:.1f} % | {r['checked']} | {r['flagged']} | "
                     f"{100 * r['false_alarm_rate']:.1f} % | {r['too_little_tissue']} |")
    five = results["magnifications"]["scan/4"]
    lines += ["", "Slides, against the 5x fingerprint:", "", "| slide | verdict | score | reasons |",
              "|---|---|---:|---|"]
    for name, v in five["slides"].items():
        lines.append(f"| {name} | {v['verdict']} | {v['score'] if v['score'] is not None else '-'} | "
                     f"{'; '.join(v['reasons']) or '-'} |")
    lines += ["", "Cost per slide (5x, median of 5 runs, stand-in model):", "",
              "| slide | check ms | pipeline ms | share |", "|---|---:|---:|---:|"]
    for name, c in five["cost"].items():
        lines.append(f"| {name} | {c['distribution_ms']:.1f} | {c['total_ms']:.0f} | "
                     f"{100 * c['distribution_ms'] / c['total_ms']:.2f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
