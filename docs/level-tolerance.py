"""What `edge-classify --level-tolerance` changes in the answers (issue 15, item 6).

Usage: python docs/level-tolerance.py --bundle B [--bundle ...] --slide S [--slide ...]
           [--labeled-bundle TEACHER --images TEST_FOLDER --mpp 0.495 --center-crop 144]
           [--tolerance 1 --tolerance 2] --out docs/level-tolerance

1. Slides: each bundle classifies each slide with exact resampling (the default) and with
   each tolerance. Per slide: the pyramid level read, the pieces whose label changed, the
   largest change of any piece's probability and of the slide's, against the exact read.
   For scale, the same figures between the bundles themselves (FP32 against INT8) at the
   default: a difference a lab already accepts when it deploys INT8.
2. Labeled tiles: a tolerance shows a model tissue up to that fraction off its scale. The
   labeled tiles are read with their µm/px misstated by -4 .. +4 %, so the model sees them
   that much coarser or finer than it was trained at; macro F1, accuracy and agreement with
   the exact read. Only a model whose inputs are large enough for 1 % to move a pixel can
   show this (the Kather teacher at 144 px; a 1.25x student's 9 px tiles round back to 9).
Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lowmag.bundle import load_bundle
from lowmag.edge.backends import choose_backend, open_session
from lowmag.edge.bench import machine
from lowmag.edge.pipeline import PipelineConfig, SlideClassifier


def classify(bundle, session, slide: Path, tolerance_pct: float):
    result = SlideClassifier(bundle, session, PipelineConfig(level_tolerance=tolerance_pct / 100)).classify(slide)
    return result


def compare(a, b) -> dict:
    """How far result b is from result a (same slide, same boxes)."""
    assert [p.box.region for p in a.pieces] == [p.box.region for p in b.pieces], "boxes differ"
    pa = np.stack([p.probabilities for p in a.pieces])
    pb = np.stack([p.probabilities for p in b.pieces])
    return {
        "pieces": len(a.pieces),
        "pieces_label_changed": int((pa.argmax(1) != pb.argmax(1)).sum()),
        "max_piece_dp": round(float(np.abs(pa - pb).max()), 4),
        "median_piece_dp": round(float(np.median(np.abs(pa - pb).max(1))), 4),
        "slide_label_changed": a.label != b.label,
        "max_slide_dp": round(float(np.abs(a.probabilities - b.probabilities).max()), 4),
    }


def slides_part(bundles: list[Path], slides: list[Path], tolerances: list[float]) -> list[dict]:
    rows, exact = [], {}
    for path in bundles:
        bundle = load_bundle(path)
        session = open_session(bundle, choose_backend(bundle, "auto", "cpu"), None)
        for slide in slides:
            base = classify(bundle, session, slide, 0.0)
            exact[(path.name, slide.name)] = base
            for tolerance in tolerances:
                got = classify(bundle, session, slide, tolerance)
                rows.append({"bundle": path.name, "slide": slide.name, "tolerance_pct": tolerance,
                             "exact_reading": base.reading, "reading": got.reading, **compare(base, got)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    for i, a in enumerate(bundles):
        for b in bundles[i + 1:]:
            for slide in slides:
                rows.append({"bundle": f"{a.name} vs {b.name}", "slide": slide.name, "tolerance_pct": 0.0,
                             "exact_reading": None, "reading": None,
                             **compare(exact[(a.name, slide.name)], exact[(b.name, slide.name)])})
    return rows


def labeled_part(path: Path, images: Path, mpp: float, crop: int | None, offsets: list[float]) -> list[dict]:
    from lowmag.edge.bench import _scan_labeled
    from lowmag.metrics import classification_metrics
    from lowmag.runtimes import logits_of

    bundle = load_bundle(path)
    session = open_session(bundle, choose_backend(bundle, "auto", "cpu"), None)
    rows, reference = [], None
    for offset in offsets:
        # Stating the tiles' µm/px as mpp / (1 + offset) makes the reader shrink them by
        # (1 + offset) more: the model sees tissue that much coarser (negative: finer).
        items = _scan_labeled(images, mpp / (1 + offset / 100), bundle.spec.classes, crop)
        inputs = [item.read(bundle.spec.target_mpp) for item in items]
        predicted = logits_of(session, inputs, batch_size=32).argmax(1)
        if offset == 0:
            reference = predicted
        metrics = classification_metrics([item.label for item in items], predicted, bundle.spec.classes,
                                         n_bootstrap=2000)
        rows.append({"bundle": path.name, "scale_offset_pct": offset, "input_px": list(inputs[0].shape[:2]),
                     "images": len(items), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                     "_predicted": predicted})
        print(offset, rows[-1]["input_px"], metrics["macro_f1"]["value"], file=sys.stderr)
    for row in rows:
        row["agreement_with_exact"] = round(float((row.pop("_predicted") == reference).mean()), 4)
    return rows


def markdown(results: dict) -> str:
    lines = ["# `--level-tolerance`: what reading a near pyramid level as stored changes", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {results['machine'].get('model')}, {results['machine'].get('cores')} cores", "",
             "## Slides: the tolerance against exact resampling (the default)", "",
             "| bundle | slide | tolerance | level read (exact → tolerance) | pieces | labels changed | "
             "largest piece Δp | median piece Δp | slide label changed | slide Δp |",
             "|---|---|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in results["slides"]:
        if r["reading"] is None:
            continue
        read = (f"{r['exact_reading']['level']} ({r['exact_reading']['level_mpp']:g}, resampled) → "
                f"{r['reading']['level']} ({r['reading']['level_mpp']:g}, "
                f"{'resampled' if r['reading']['resampled'] else 'as stored'})")
        lines.append(f"| {r['bundle']} | {r['slide']} | {r['tolerance_pct']:g} % | {read} | {r['pieces']} | "
                     f"{r['pieces_label_changed']} | {r['max_piece_dp']} | {r['median_piece_dp']} | "
                     f"{'yes' if r['slide_label_changed'] else 'no'} | {r['max_slide_dp']} |")
    pairs = [r for r in results["slides"] if r["reading"] is None]
    if pairs:
        lines += ["", "For scale: the bundles against each other, both reading exactly (the default).", "",
                  "| bundles | slide | pieces | labels changed | largest piece Δp | median piece Δp | "
                  "slide label changed | slide Δp |", "|---|---|---:|---:|---:|---:|---|---:|"]
        for r in pairs:
            lines.append(f"| {r['bundle']} | {r['slide']} | {r['pieces']} | {r['pieces_label_changed']} | "
                         f"{r['max_piece_dp']} | {r['median_piece_dp']} | "
                         f"{'yes' if r['slide_label_changed'] else 'no'} | {r['max_slide_dp']} |")
    if results.get("labeled"):
        lines += ["", "## Labeled tiles seen off their scale", "",
                  "| bundle | scale offset | input px | images | macro F1 (95% CI) | accuracy | agreement with exact |",
                  "|---|---:|---|---:|---|---:|---:|"]
        for r in results["labeled"]:
            f1 = r["macro_f1"]
            lines.append(f"| {r['bundle']} | {r['scale_offset_pct']:+g} % | {r['input_px'][1]} x {r['input_px'][0]} "
                         f"| {r['images']} | {100 * f1['value']:.1f} ({100 * f1['ci_low']:.1f}-{100 * f1['ci_high']:.1f}) | "
                         f"{100 * r['accuracy']['value']:.1f} | {100 * r['agreement_with_exact']:.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", type=Path, default=[])
    parser.add_argument("--slide", action="append", type=Path, default=[])
    parser.add_argument("--tolerance", action="append", type=float, default=None)
    parser.add_argument("--labeled-bundle", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--mpp", type=float, default=0.495)
    parser.add_argument("--center-crop", type=int)
    parser.add_argument("--offset", action="append", type=float, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {"command": "python " + " ".join(sys.argv), "machine": machine(),
               "slides": slides_part(args.bundle, args.slide, args.tolerance or [1.0, 2.0])}
    if args.labeled_bundle:
        results["labeled"] = labeled_part(args.labeled_bundle, args.images, args.mpp, args.center_crop,
                                          args.offset or [-4, -2, -1, 0, 1, 2, 4])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
