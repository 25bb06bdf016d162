"""The bench report: ``results.json``, ``report.md`` with its plots in ``plots/*.svg``, and a
self-contained ``report.html`` (the same tables, the plots inline, no external resource)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from lowmag.edge import bench_plots
from lowmag.edge.pipeline import STAGES
from lowmag.io import atomic_write_text

PLOTS = ("f1_vs_gflops", "latency", "stages")


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
        f"{m.get('gpu', 'none')}; {m.get('os', '')}"
        + (f"; CPU time taken by other virtual machines (steal) during the run: {m['cpu_steal_pct']:g} %"
           if m.get("cpu_steal_pct") is not None else ""),
        "Libraries: " + ", ".join(f"{k} {m[k]}" for k in ("lowmag", "numpy", "pyvips", "openslide-python",
                                                          "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt")
                                   if k in m), "",
        f"Slides ({len(results['slides'])}): " + ", ".join(results["slides"]) +
        (f"; not benchmarked (do not open): {', '.join(results['skipped_slides'])}" if results["skipped_slides"]
         else ""),
        f"Each slide: {opts['warmup']} warm-up run(s), then {opts['repeats']} measured runs of the whole per-slide "
        "pipeline. Latency is the median over slides of each slide's median (p90: of each slide's 90th "
        "percentile); slides/hour is 3600 s over the mean per-slide median. Peak RSS is the bench process's "
        "while that row ran, with every runtime and model loaded before it still in memory: one "
        "edge-classify run of the same slides uses less."
        + (f" The reference: {opts['reference_repeats']} measured run(s) per slide, no warm-up."
           if opts.get("reference_repeats") else "")
        + (f" Students read a pyramid level within {opts['level_tolerance_pct']:g} % of their µm/px as stored, "
           "without resampling (--level-tolerance); the reference always resamples exactly."
           if opts.get("level_tolerance_pct") else ""), "",
        "## Students", "",
        "![Macro F1 against GFLOPs per slide](plots/f1_vs_gflops.svg)", "",
        "| bundle | magnification | training | precision | backend | MB | GFLOPs/slide | macro F1 (95% CI) | median ms | "
        "p90 ms | slides/h | peak RSS MB | threads | x floor | speed-up vs reference | FLOP reduction |",
        "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["students"]:
        vs = r.get("vs_reference") or {}
        lines.append(
            f"| {r['bundle']} | {r['magnification']} | {r.get('regime', 'unknown')} | {r['target']} {r['precision']} | {r['backend']}/{r['device']} "
            f"| {r['bundle_bytes'] / 1e6:.3g} | {_num(r['gflops_per_slide'], '.3g')} | {_f1(r)} | {_num(r['median_ms_per_slide'])} "
            f"| {_num(r['p90_ms_per_slide'])} | {_num(r['slides_per_hour'])} | {_num(r['peak_rss_mb'])} "
            f"| {r['threads']} | {_times(r.get('floor_ratio_median'), '.2f')} | {_speedups(r)} "
            f"| {_times(vs.get('flop_reduction_median'), '.1f')} |"
        )
    lines += floor_section(results)
    lines += ["", "![Median latency per slide](plots/latency.svg)", "",
              "## Time per stage (median ms per slide)", "",
              "![Where the time goes](plots/stages.svg)", "",
              "| bundle | backend | " + " | ".join(s for s in STAGES) + " |",
              "|---|---|" + "---:|" * len(STAGES)]
    for r in results["students"]:
        lines.append(f"| {r['bundle']} | {r['backend']}/{r['device']} | "
                     + " | ".join(_num(r["stages_ms"].get(s), ".0f") for s in STAGES) + " |")
    refs = results.get("references") or ([results["reference"]] if results.get("reference") else [])
    lines += ["", "## The conventional reference", ""]
    if not refs:
        lines.append("Not measured: pass --reference BUNDLE (a full-resolution model) to compare against it.")
    for ref in refs:
        lines += [
            f"{ref['bundle']} ({ref['precision']}, {ref['backend']}/{ref['device']}): the tissue tiled into "
            f"{ref['patch_px']} px patches at {ref['mpp']} µm/px read from level 0, every patch with tissue run "
            f"through the full-resolution model ({ref['gflops_per_patch']} GFLOPs per patch).", "",
            "| slide | patches | GFLOPs | median ms | p90 ms | CPU ms | hash CPU ms | " + " | ".join(STAGES) + " |",
            "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(STAGES),
        ]
        for s in ref["slides"]:
            lines.append(f"| {s['relative']} | {s['patches']} | {s['gflops']} | {s['median_ms']:.0f} | "
                         f"{s['p90_ms']:.0f} | {_num(s.get('cpu_ms'))} | {_num(s.get('hash_cpu_ms'))} | "
                         + " | ".join(_num(s["stages_ms"].get(k)) for k in STAGES) + " |")
        lines += ["", f"Median {ref['median_ms_per_slide']:.0f} ms per slide, {ref['slides_per_hour']} slides/hour, "
                      f"peak RSS {ref['peak_rss_mb']:.0f} MB; macro F1 (95% CI) on the labeled images: {_f1(ref)}.", ""]
    return "\n".join(lines) + "\n"


def _speedups(row: dict[str, Any]) -> str:
    """The median speed-up against each reference, with the reference's precision and runtime."""
    versus = row.get("vs_references") or ([row["vs_reference"]] if row.get("vs_reference") else [])
    if not versus:
        return "–"
    if len(versus) == 1:
        return _times(versus[0]["speedup_median"], ".2f")
    return ", ".join(f"{_times(v['speedup_median'], '.1f')} ({v.get('precision', '?')} {v.get('backend', '?')})"
                     for v in versus)


def floor_section(results: dict[str, Any]) -> list[str]:
    """Per student and slide: the product's time against the floor measured in the same run."""
    lines = ["", "## Against the floor", "",
             "The floor is what a slide cannot cost less than with this student: decoding, at the pyramid level "
             "it reads, exactly the pixels of the tissue pieces the pipeline found, plus the model on the very "
             "inputs the pipeline gave it (median of 3). x floor = median ms / floor ms. First run: the "
             "slide's first (warm-up) run, new input shapes included, as a watcher meets every new slide. "
             "The stages are this slide's medians; read and resample run beside inference (the next piece "
             "is read while one is inferred) and the hash beside everything, so they overlap in time. "
             "CPU ms: the process's CPU time per run, every thread counted (median), beside the floor's own; "
             "with n cores a run takes at least CPU / n of wall time, so work beside the stages is not free "
             "where the cores are busy. Hash CPU ms: the sha256 of the slide's files, in its thread beside "
             "everything (its stage is only the wait for it at the end).", "",
             "| bundle | backend | slide | median ms | first run ms | floor ms (decode + inference) | x floor | "
             "CPU ms (floor's) | hash CPU ms | " + " | ".join(f"{stage} ms" for stage in STAGES) + " |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(STAGES)]
    for r in results["students"]:
        for s in r["slides"]:
            floor = s.get("floor_ms") or {}
            lines.append(
                f"| {r['bundle']} | {r['backend']}/{r['device']} | {s['relative']} | {s['median_ms']:.0f} "
                f"| {_num(s.get('first_ms'))} | {_num(floor.get('total'))} ({_num(floor.get('decode'))} + "
                f"{_num(floor.get('inference'))}) | {_times(s.get('floor_ratio'), '.2f')} | "
                f"{_num(s.get('cpu_ms'))} ({_num(floor.get('cpu'))}) | {_num(s.get('hash_cpu_ms'))} | "
                + " | ".join(_num(s["stages_ms"].get(stage)) for stage in STAGES) + " |")
    return lines


def run_label(row: dict[str, Any]) -> str:
    return f"{row['bundle']} · {row['backend']}/{row['device']}"


def plots(results: dict[str, Any]) -> dict[str, str]:
    """The three plots as SVG text, by name."""
    students = results["students"]
    points = []
    for r in students:
        f1 = (r.get("accuracy") or {}).get("macro_f1")
        if f1 and r["backend"] == _first_backend(students, r["bundle"]):  # one dot per bundle
            points.append({"gflops": r["gflops_per_slide"], "f1": 100 * f1["value"], "series": r["regime"],
                           "label": r["magnification"]})
    ref = results.get("reference")
    if ref and (ref.get("accuracy") or {}).get("macro_f1"):
        points.append({"gflops": ref["gflops_per_slide"], "f1": 100 * ref["accuracy"]["macro_f1"]["value"],
                       "series": "reference", "label": "20x patches"})
    bars = [{"label": run_label(r), "median": r["median_ms_per_slide"] or 0, "p90": r["p90_ms_per_slide"],
             "group": i} for i, r in enumerate(students)]
    stage_rows = [{"label": run_label(r), "stages_ms": r["stages_ms"]} for r in students]
    if ref:
        bars.append({"label": f"reference: {ref['bundle']}", "median": ref["median_ms_per_slide"],
                     "p90": None, "group": len(students)})
        stage_rows.append({"label": f"reference: {ref['bundle']}", "stages_ms": ref.get("stages_ms", {})})
    return {"f1_vs_gflops": bench_plots.f1_vs_gflops(points), "latency": bench_plots.latency(bars),
            "stages": bench_plots.stages(stage_rows)}


def _first_backend(students: list[dict[str, Any]], bundle: str) -> str:
    """One point per bundle in the accuracy plot (every runtime classifies alike)."""
    return next(r["backend"] for r in students if r["bundle"] == bundle)


def html(results: dict[str, Any], svgs: dict[str, str]) -> str:
    """The report as one HTML file: the Markdown tables as HTML tables, the plots inline."""
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>edge-classify bench</title>',
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "th,td{border:1px solid #ccc;padding:3px 7px}td.n{text-align:right}"
             "code{background:#f4f4f4;padding:1px 3px}figure{margin:1em 0}</style></head><body>"]
    table: list[list[str]] = []
    for line in markdown(results).splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *body = table
            parts.append("<table><thead><tr>" + "".join(f"<th>{escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
                         + "".join("<tr>" + "".join(f'<td{_numeric(c)}>{escape(c)}</td>' for c in row) + "</tr>"
                                   for row in body) + "</tbody></table>")
            table = []
        if line.startswith("!["):
            name = line[line.index("(") + 1:line.index(")")].split("/")[-1].removesuffix(".svg")
            parts.append(f'<figure id="plot-{name}">{svgs[name]}</figure>')
        elif line.startswith("# "):
            parts.append(f"<h1>{escape(line[2:])}</h1>")
        elif line.startswith("## "):
            parts.append(f"<h2>{escape(line[3:])}</h2>")
        elif line.strip():
            text = escape(line)
            while "`" in text and text.count("`") >= 2:
                text = text.replace("`", "<code>", 1).replace("`", "</code>", 1)
            parts.append(f"<p>{text}</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _numeric(cell: str) -> str:
    return ' class="n"' if cell.replace(".", "").replace(",", "").replace("x", "").isdigit() else ""


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """results.json, report.md, plots/*.svg and report.html in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    svgs = plots(results)
    paths = [out / "results.json", out / "report.md", out / "report.html"]
    for name, svg in svgs.items():
        path = out / "plots" / f"{name}.svg"
        atomic_write_text(path, svg)
        paths.append(path)
    atomic_write_text(paths[0], json.dumps(results, indent=2) + "\n")
    atomic_write_text(paths[1], markdown(results))
    atomic_write_text(paths[2], html(results, svgs))
    return paths
