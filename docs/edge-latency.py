"""Measure edge-classify's per-slide latency and slides per hour on this machine.

Usage: python docs/edge-latency.py --slide SLIDE [--slide ...] --bundle BUNDLE [--bundle ...]
           [--copies 10] [--out docs/edge-latency]
For every bundle x slide: the slide is copied COPIES times into a scratch folder under
different names, `edge-classify run` classifies them (one worker, all cores), and the
medians and 90th percentiles of the per-stage times come from the results' timings_ms;
slides per hour is COPIES over the run's wall time (process start, model load included).
Writes results.md and results.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lowmag.edge.bench import machine, percentile

STAGES = ("hash", "open", "tissue", "read", "resample", "inference", "write", "total")


def measure(slide: Path, bundle: Path, copies: int, edge: str) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        scans, out = Path(scratch) / "scans", Path(scratch) / "out"
        scans.mkdir()
        for i in range(copies):  # copies, not symlinks: the scan never follows links out of its folder
            copy = scans / f"copy{i:02d}{slide.suffix}"
            shutil.copytree(slide, copy) if slide.is_dir() else shutil.copy(slide, copy)
        started = time.perf_counter()
        done = subprocess.run([edge, "run", str(scans), "--model", str(bundle), "--out", str(out)],
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"edge-classify failed on {slide} with {bundle}:\n{done.stderr}")
        docs = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    timings = {s: [d["timings_ms"][s] for d in docs] for s in STAGES}
    first = docs[0]
    return {
        "slide": str(slide), "bundle": bundle.name, "magnification": first["model"]["magnification"],
        "backend": f"{first['runtime']['backend']}/{first['runtime']['device']}",
        "precision": first["model"]["precision"], "copies": copies, "wall_s": round(wall, 2),
        "slides_per_hour_wall": round(3600 * copies / wall), "tissue_pieces": len(first["tissue"]),
        "input_px": [p["input_px"] for p in first["tissue"]],
        "median_ms": {s: round(statistics.median(v), 1) for s, v in timings.items()},
        "p90_ms": {s: round(percentile(v, 0.9), 1) for s, v in timings.items()},
        "label": first["result"]["label"],
    }


def markdown(rows: list[dict], info: dict, command: str) -> str:
    lines = [
        "# edge-classify: per-slide latency and slides per hour on this machine", "",
        f"Command: `{command}`", "",
        f"Machine: {info.get('model')}, {info.get('cores')} cores; ONNX Runtime {info['onnxruntime']}, "
        f"OpenVINO {info['openvino']}; {info['os']}", "",
        "Median and 90th percentile over the copies; stages in ms (read = decoding the slide, resample = box "
        "filter + Lanczos, tissue = localisation incl. its overview read). Slides/hour: copies / wall time of "
        "the whole `edge-classify run` (process start and model load included); 3600 s / median is the "
        "steady-state rate.", "",
        "| slide | bundle | backend | median ms | p90 ms | slides/h (wall) | slides/h (3600/median) | "
        "hash | open | tissue | read | resample | inference | write |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["median_ms"]
        lines.append(
            f"| {Path(r['slide']).name} | {r['bundle']} ({r['magnification']}) | {r['backend']} | {m['total']:.0f} | "
            f"{r['p90_ms']['total']:.0f} | {r['slides_per_hour_wall']} | {3600000 / m['total']:.0f} | "
            + " | ".join(f"{m[s]:.0f}" for s in STAGES[:-1]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", action="append", type=Path, required=True)
    parser.add_argument("--bundle", action="append", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/edge-latency"))
    args = parser.parse_args()
    edge = str(Path(sys.executable).parent / "edge-classify")
    rows = []
    for bundle in args.bundle:
        for slide in args.slide:
            rows.append(measure(slide, bundle, args.copies, edge))
            print(f"{slide.name} {bundle.name}: median {rows[-1]['median_ms']['total']:.0f} ms", flush=True)
    info = machine()
    command = "python docs/edge-latency.py " + " ".join(
        [f"--slide {s}" for s in args.slide] + [f"--bundle {b}" for b in args.bundle] + [f"--copies {args.copies}"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": info, "command": command, "rows": rows},
                                                      indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(rows, info, command))
    print(markdown(rows, info, command))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
