"""The bench report: ``results.json`` and ``report.md`` (plots and HTML: see issue 6's notes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowmag.edge.pipeline import STAGES
from lowmag.io import atomic_write_text


def _f1(row: dict[str, Any]) -> str:
    from lowmag.metrics import format_percent_ci

    accuracy = row.get("accuracy")
    if not accuracy or "macro_f1" not in accuracy:
        return "–"
    return format_percent_ci(accuracy["macro_f1"])


def _num(value: Any, digits: str = ".0f") -> str:
    return "–" if value is None else format(value, digits)


def _times(value: Any, digits: str) -> str:
    return "–" if value is None else format(value, digits) + "x"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    opts = results["options"]
    lines = [
        "# edge-classify bench", "",
        f"Command: `{results.get('command', '(not recorded)')}`", "",
        f"Machine: {m.get('model', '?')}, {m.get('cores', '?')} cores, {m.get('ram_gib', '?')} GiB RAM, GPU: "
        f"{m.get('gpu', 'none')}; {m.get('os', '')}",
        "Libraries: " + ", ".join(f"{k} {m[k]}" for k in ("lowmag", "numpy", "pyvips", "openslide-python",
                                                          "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt")
                                   if k in m), "",
        f"Slides ({len(results['slides'])}): " + ", ".join(results["slides"]) +
        (f"; not benchmarked (do not open): {', '.join(results['skipped_slides'])}" if results["skipped_slides"]
         else ""),
        f"Each slide: {opts['warmup']} warm-up run(s), then {opts['repeats']} measured runs of the whole per-slide "
        "pipeline. Latency is the median over slides of each slide's median (p90: of each slide's 90th "
        "percentile); slides/hour is 3600 s over the mean per-slide median.", "",
        "## Students", "",
        "| bundle | magnification | precision | backend | MB | GFLOPs/slide | macro F1 (95% CI) | median ms | "
        "p90 ms | slides/h | peak RSS MB | threads | speed-up vs reference | FLOP reduction |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["students"]:
        vs = r.get("vs_reference") or {}
        lines.append(
            f"| {r['bundle']} | {r['magnification']} | {r['target']} {r['precision']} | {r['backend']}/{r['device']} "
            f"| {r['bundle_bytes'] / 1e6:.3g} | {_num(r['gflops_per_slide'], '.3g')} | {_f1(r)} | {_num(r['median_ms_per_slide'])} "
            f"| {_num(r['p90_ms_per_slide'])} | {_num(r['slides_per_hour'])} | {_num(r['peak_rss_mb'])} "
            f"| {r['threads']} | {_times(vs.get('speedup_median'), '.2f')} | {_times(vs.get('flop_reduction_median'), '.1f')} |"
        )
    lines += ["", "## Time per stage (median ms per slide)", "",
              "| bundle | backend | " + " | ".join(s for s in STAGES) + " |",
              "|---|---|" + "---:|" * len(STAGES)]
    for r in results["students"]:
        lines.append(f"| {r['bundle']} | {r['backend']}/{r['device']} | "
                     + " | ".join(_num(r["stages_ms"].get(s), ".0f") for s in STAGES) + " |")
    ref = results.get("reference")
    lines += ["", "## The conventional reference", ""]
    if ref is None:
        lines.append("Not measured: pass --reference BUNDLE (a full-resolution model) to compare against it.")
    else:
        lines += [
            f"{ref['bundle']} ({ref['precision']}, {ref['backend']}/{ref['device']}): the tissue tiled into "
            f"{ref['patch_px']} px patches at {ref['mpp']} µm/px read from level 0, every patch with tissue run "
            f"through the full-resolution model ({ref['gflops_per_patch']} GFLOPs per patch).", "",
            "| slide | patches | GFLOPs | median ms | p90 ms |", "|---|---:|---:|---:|---:|",
        ]
        for s in ref["slides"]:
            lines.append(f"| {s['relative']} | {s['patches']} | {s['gflops']} | {s['median_ms']:.0f} | "
                         f"{s['p90_ms']:.0f} |")
        lines += ["", f"Median {ref['median_ms_per_slide']:.0f} ms per slide, {ref['slides_per_hour']} slides/hour, "
                      f"peak RSS {ref['peak_rss_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "report.md"]
    atomic_write_text(paths[0], json.dumps(results, indent=2) + "\n")
    atomic_write_text(paths[1], markdown(results))
    return paths
