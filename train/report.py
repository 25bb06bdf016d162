"""Results of a distill-train run as JSON, Markdown tables and an accuracy-vs-cost plot.

A *result row* is one evaluated model::

    {"name": "distill-labeled-10x", "phase": "distill", "method": "Distillation (labeled)",
     "magnification": "10x", "mpp": 0.99, "input_px": 72, "gflops": 0.19,
     "metrics": <classification_metrics(...) dict>}

The tables follow DiPalma et al., "Resolution-Based Distillation for Efficient
Histology Image Classification" (Tables 3 and 4): grouped by magnification from the
finest resolution down, teacher first, each metric with its bootstrap CI. The plot
follows their Figure 3: accuracy against GFLOPs on a log axis, one series per method.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lowmag.errors import LowmagError
from lowmag.io import atomic_write_bytes, atomic_write_text
from lowmag.metrics import format_percent_ci

logger = logging.getLogger(__name__)

PHASES = ("teacher", "baseline", "distill", "finetune")
#: How a method name says its student learnt from labeled + unlabeled images (Step.method
#: writes it; seed_differences pairs such a student with its labeled-only twin by it).
WITH_UNLABELED = "labeled + unlabeled"
_REQUIRED = ("name", "phase", "method", "magnification", "mpp", "metrics")
_TABLE_METRICS = (("Accuracy", "accuracy"), ("F1", "macro_f1"),
                  ("Precision", "macro_precision"), ("Recall", "macro_recall"))
# Meta items shown in the results.md header, in this order, with these labels.
_META_LABELS = {
    "command": "Command",
    "machine": "Machine",
    "wall_time_s": "Wall time",
    "wall_time": "Wall time",
    "git_sha": "Git SHA",
    "lowmag_version": "lowmag version",
    "started": "Started",
    "finished": "Finished",
}
JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"
PLOT_NAME = "accuracy_vs_gflops.png"


def gather_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every evaluated step of a run and of its extra seeds' runs (``RUN/seed-*/``)."""
    run_dir = Path(run_dir)
    paths = sorted(run_dir.glob("steps/*/metrics.json")) + sorted(run_dir.glob("seed-*/steps/*/metrics.json"))
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def first_seed_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step: that of its lowest seed (the main table keeps the paper's shape)."""
    kept: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = row["name"]
        if name not in kept or row.get("seed", 0) < kept[name].get("seed", 0):
            kept[name] = row
    return list(kept.values())


def seed_groups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps evaluated with two or more seeds: mean and sample SD of each table metric over
    the seeds, and every seed's value with its CI. Ordered like the main table."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    groups = []
    for name, members in by_name.items():
        seeds = sorted({m.get("seed", 0) for m in members})
        if len(seeds) < 2:
            continue
        members = sorted(members, key=lambda m: m.get("seed", 0))
        first = members[0]
        summary = {}
        for _, key in _TABLE_METRICS:
            values = np.array([100.0 * m["metrics"][key]["value"] for m in members])
            summary[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)),
                            "min": float(values.min()), "max": float(values.max())}
        groups.append({**{k: first[k] for k in ("name", "phase", "method", "magnification", "mpp")},
                       "input_px": first.get("input_px"), "gflops": first.get("gflops"), "seeds": seeds,
                       "summary": summary,
                       "per_seed": [{"seed": m.get("seed", 0), "macro_f1": m["metrics"]["macro_f1"],
                                     "accuracy": m["metrics"]["accuracy"]} for m in members]})
    return sorted(groups, key=lambda g: (float(g["mpp"]), PHASES.index(g["phase"])))


def render_seeds(groups: Sequence[dict[str, Any]]) -> str:
    """The over-seeds table: mean ± SD, and each seed's macro F1 with its CI."""
    if not groups:
        return ""
    lines = ["", "Over seeds (mean ± sample SD of the seeds' test metrics; each seed's macro F1 with its "
                 "95% bootstrap CI):", "",
             "| Magnification | Method | Seeds | Accuracy | F1 | F1 per seed |", "|---|---|---|---:|---:|---|"]
    for g in groups:
        acc, f1 = g["summary"]["accuracy"], g["summary"]["macro_f1"]
        per_seed = "; ".join(f"{p['seed']}: {format_percent_ci(p['macro_f1'])}" for p in g["per_seed"])
        lines.append(f"| {_escape(g['magnification'])} | {_escape(g['method'])} | {len(g['seeds'])} | "
                     f"{acc['mean']:.1f} ± {acc['sd']:.1f} | {f1['mean']:.1f} ± {f1['sd']:.1f} | {per_seed} |")
    return "\n".join(lines) + "\n"


def seed_differences(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each student step with several seeds: its macro F1 minus the teacher's of the same
    seed; for a distilled or fine-tuned student, minus the baseline's at its resolution and
    seed; for one that learnt from labeled + unlabeled images, minus the same student on the
    labeled images alone (what the unlabeled images add), where that has the seed too (points).
    A claim such as "matches the teacher" or "beats the baseline" holds
    across seeds only if it holds for every seed here, not just on the means."""
    def seed(row: dict[str, Any]) -> int:
        return row.get("seed", 0)

    def macro_f1(row: dict[str, Any]) -> float:
        return 100.0 * row["metrics"]["macro_f1"]["value"]

    f1 = {(row["name"], seed(row)): macro_f1(row) for row in rows}
    teacher = {seed(row): macro_f1(row) for row in rows if row["phase"] == "teacher"}
    baseline = {(float(row["mpp"]), seed(row)): macro_f1(row) for row in rows if row["phase"] == "baseline"}
    by_method = {(row["method"], float(row["mpp"]), seed(row)): macro_f1(row) for row in rows}

    def difference(group: dict[str, Any], reference: Callable[[int], float | None]) -> dict[str, Any] | None:
        pairs = [(s, f1[(group["name"], s)] - ref) for s in group["seeds"] if (ref := reference(s)) is not None]
        if len(pairs) < 2:
            return None
        return {"per_seed": {s: round(d, 2) for s, d in pairs}, "mean": float(np.mean([d for _, d in pairs])),
                "seeds": len(pairs)}

    out = []
    for group in seed_groups(rows):
        if group["phase"] == "teacher":
            continue
        mpp = float(group["mpp"])
        entry: dict[str, Any] = {k: group[k] for k in ("name", "phase", "method", "magnification", "mpp")}
        entry["minus_teacher"] = difference(group, teacher.get)
        entry["minus_baseline"] = (None if group["phase"] == "baseline"
                                   else difference(group, lambda s: baseline.get((mpp, s))))
        # What the unlabeled images add: the same student distilled on the labeled ones alone.
        labeled_only = group["method"].replace(WITH_UNLABELED, "labeled")
        entry["minus_labeled"] = (None if WITH_UNLABELED not in group["method"]
                                  else difference(group, lambda s: by_method.get((labeled_only, mpp, s))))
        out.append(entry)
    return out


def render_seed_differences(rows: Sequence[dict[str, Any]]) -> str:
    """The per-seed differences of ``seed_differences`` as a Markdown table."""
    entries = [e for e in seed_differences(rows) if e["minus_teacher"] or e["minus_baseline"] or e["minus_labeled"]]
    if not entries:
        return ""

    def cell(d: dict[str, Any] | None) -> str:
        if d is None:
            return "–"
        per_seed = ", ".join(f"{v:+.1f}" for _, v in sorted(d["per_seed"].items()))
        return f"{d['mean']:+.1f} ({per_seed})"

    lines = ["", "Differences within each seed (macro F1 points, the mean then each seed's; a claim holds across "
                 "seeds only where every seed agrees):", "",
             "| Magnification | Method | − teacher | − baseline | − labeled only |", "|---|---|---:|---:|---:|"]
    for e in entries:
        lines.append(f"| {_escape(e['magnification'])} | {_escape(e['method'])} | {cell(e['minus_teacher'])} | "
                     f"{cell(e['minus_baseline'])} | {cell(e['minus_labeled'])} |")
    return "\n".join(lines) + "\n"


def _check_rows(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        raise LowmagError("no result rows to report: evaluate at least one model first.")
    for row in rows:
        missing = [key for key in _REQUIRED if key not in row]
        if missing:
            raise LowmagError(
                f"result row {row.get('name', '?')!r} lacks {', '.join(missing)}; "
                f"every row needs {', '.join(_REQUIRED)}."
            )
        if row["phase"] not in PHASES:
            raise LowmagError(
                f"result row {row['name']!r} has phase {row['phase']!r}; "
                f"expected one of {', '.join(PHASES)}."
            )


def order_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by decreasing resolution (increasing µm/px), then teacher, baseline, distill, finetune.

    The sort is stable, so methods of the same phase keep the order they were given in.
    """
    _check_rows(rows)
    return sorted(rows, key=lambda row: (float(row["mpp"]), PHASES.index(row["phase"])))


def _escape(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _format_gflops(gflops: float | None) -> str:
    if gflops is None:
        return "–"
    return f"{gflops:.0f}" if gflops >= 100 else f"{gflops:.3g}"


def _caption(rows: Sequence[dict[str, Any]]) -> str:
    counts = sorted({row["metrics"]["n"] for row in rows})
    n_text = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    boot = rows[0]["metrics"].get("bootstrap", {})
    if boot.get("resamples"):
        interval = (f"with {100.0 * boot['ci']:g}% percentile bootstrap confidence intervals "
                    f"({boot['resamples']} resamples)")
    else:
        interval = "without confidence intervals"
    return (f"Test-set metrics in percent {interval}; N = {n_text} test items. "
            "F1, precision and recall are macro averages over classes.")


def _class_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [name for name in row["metrics"]["classes"] if name not in names]
    return names


def render_markdown(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """The results as GitHub Markdown: a table grouped by magnification, then per-class F1,
    then, for steps trained with several seeds, the table over seeds.

    Magnification and input size are written on the first row of each group only, as in
    the paper's tables; the per-class table repeats them so each row stands alone. The
    first two tables show each step's lowest seed.
    """
    groups = seed_groups(rows)
    ordered = order_rows(first_seed_rows(rows))
    lines: list[str] = []
    if title:
        lines += [f"## {title}", ""]
    spread = {g["name"]: g for g in groups}
    seeds_note = (" Where a step was trained with several seeds, its row is the lowest seed's and the last "
                  "column the macro F1 over all of them (mean ± sample SD, number of seeds)." if spread else "")
    lines += [
        _caption(ordered) + seeds_note,
        "",
        "| Magnification | Input (px) | Method | GFLOPs | Accuracy | F1 | Precision | Recall |"
        + (" F1 over seeds |" if spread else ""),
        "|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if spread else ""),
    ]
    previous_group = None
    for row in ordered:
        group = (row["magnification"], float(row["mpp"]))
        first = group != previous_group
        previous_group = group
        magnification = _escape(row["magnification"]) if first else ""
        input_px = str(row.get("input_px", "–")) if first else ""
        metrics = " | ".join(format_percent_ci(row["metrics"][key]) for _, key in _TABLE_METRICS)
        over = ""
        if spread:
            g = spread.get(row["name"])
            over = (f" {g['summary']['macro_f1']['mean']:.1f} ± {g['summary']['macro_f1']['sd']:.1f} "
                    f"({len(g['seeds'])}) |" if g else " – |")
        lines.append(
            f"| {magnification} | {input_px} | {_escape(row['method'])} "
            f"| {_format_gflops(row.get('gflops'))} | {metrics} |{over}"
        )

    classes = _class_names(ordered)
    lines += [
        "",
        "Per-class F1 (%):",
        "",
        "| Magnification | Method | " + " | ".join(_escape(name) for name in classes) + " |",
        "|---|---|" + "---:|" * len(classes),
    ]
    for row in ordered:
        per_class = row["metrics"]["per_class"]
        cells = [f"{100.0 * per_class[name]['f1']:.1f}" if name in per_class else "–"
                 for name in classes]
        lines.append(f"| {_escape(row['magnification'])} | {_escape(row['method'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + render_seeds(groups) + render_seed_differences(rows)


def _has_gflops(row: dict[str, Any]) -> bool:
    gflops = row.get("gflops")
    return gflops is not None and bool(np.isfinite(gflops)) and gflops > 0


def _plottable(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    kept = []
    for row in rows:
        if not _has_gflops(row):
            logger.warning("result row %r has no positive GFLOPs; left out of the plot", row["name"])
            continue
        kept.append(row)
    return kept


def plot_accuracy_vs_gflops(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write a PNG of accuracy (%, with CI error bars) against GFLOPs on a log axis.

    One line per method through its magnifications, each point labelled with its
    magnification; a teacher is a single star. Rows without positive GFLOPs are left
    out (with a warning); if none remain this raises ``LowmagError``.
    """
    # matplotlib is imported here so that metrics-only users never pay for it. The
    # Figure is built on an Agg canvas directly, never through pyplot, so no global
    # backend is switched and no figure is left registered anywhere.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spread = {g["name"]: g["summary"]["accuracy"] for g in seed_groups(rows)}
    rows = _plottable(order_rows(first_seed_rows(rows)))
    if not rows:
        raise LowmagError(f"cannot plot {path}: no result row has a positive GFLOPs value.")
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(row["method"], []).append(row)

    fig = Figure(figsize=(7.0, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels: dict[tuple[float, str], float] = {}
    for method, members in series.items():
        members = sorted(members, key=lambda row: row["gflops"])
        x = np.array([row["gflops"] for row in members], dtype=float)
        acc = [_plotted_accuracy(row, spread) for row in members]
        y = np.array([100.0 * entry["value"] for entry in acc])
        has_ci = all(entry.get("ci_low") is not None for entry in acc)
        yerr = (np.array([[y_i - 100.0 * e["ci_low"], 100.0 * e["ci_high"] - y_i]
                          for y_i, e in zip(y, acc)]).T if has_ci else None)
        if all(row["phase"] == "teacher" for row in members):
            style = {"fmt": "*", "markersize": 14, "color": "black"}
        else:
            style = {"fmt": "-o", "markersize": 5}
        ax.errorbar(x, y, yerr=yerr, capsize=3, label=method, **style)
        for x_i, y_i, row in zip(x, y, members):
            key = (float(x_i), str(row["magnification"]))
            labels[key] = max(labels.get(key, -np.inf), float(y_i))
    # One label per (GFLOPs, magnification), beside its highest point: methods at the
    # same magnification share an x and would otherwise print it on top of each other.
    for (x_i, magnification), y_i in labels.items():
        ax.annotate(magnification, (x_i, y_i), xytext=(5, 5),
                    textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))

    # Plain decimals on the major ticks; minor-tick labels crowd each other on short ranges.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("GFLOPs per tile (log scale)")
    ax.set_ylabel("Accuracy (%)\n(mean ± SD over seeds, else 95% CI)" if spread else "Accuracy (%, 95% CI)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    fig.clear()
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _plotted_accuracy(row: dict[str, Any], spread: dict[str, dict[str, float]]) -> dict[str, float]:
    """A point's accuracy: the mean ± SD over seeds where there are several, else the row's
    own value with its CI (as fractions, like the metrics)."""
    if row["name"] not in spread:
        return row["metrics"]["accuracy"]
    s = spread[row["name"]]
    return {"value": s["mean"] / 100, "ci_low": (s["mean"] - s["sd"]) / 100, "ci_high": (s["mean"] + s["sd"]) / 100}


def _format_wall_time(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _meta_header(meta: dict[str, Any]) -> list[str]:
    lines = []
    shown = [key for key in _META_LABELS if meta.get(key) is not None]
    shown += [key for key, value in meta.items()
              if key not in _META_LABELS and key != "title"
              and isinstance(value, (str, int, float, bool))]
    for key in shown:
        value = meta[key]
        if key == "wall_time_s" or (key == "wall_time" and isinstance(value, (int, float))):
            text = _format_wall_time(value)
        elif key in ("command", "git_sha"):
            text = f"`{value}`"
        else:
            text = str(value)
        lines.append(f"- {_META_LABELS.get(key, key)}: {text}")
    return lines


def _to_json(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | Path,
                 meta: dict[str, Any]) -> dict[str, Path]:
    """Write results.json, results.md and accuracy_vs_gflops.png into ``out_dir``, atomically.

    ``meta`` (command, machine, wall_time_s, git_sha, ... as available) goes into the JSON
    whole and, where its items are plain values, into the Markdown header. The plot is
    skipped with a warning when no row has GFLOPs. Returns ``{"json", "markdown"[, "plot"]}``.
    """
    _check_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps({"meta": meta, "results": list(rows), "over_seeds": seed_groups(rows),
                           "seed_differences": seed_differences(rows)}, indent=2,
                          ensure_ascii=False, default=_to_json)
    except (TypeError, ValueError) as err:
        raise LowmagError(f"cannot write {out_dir / JSON_NAME}: {err}") from err

    paths: dict[str, Path] = {}
    if any(_has_gflops(row) for row in rows):
        paths["plot"] = plot_accuracy_vs_gflops(rows, out_dir / PLOT_NAME)
    else:
        logger.warning("no result row has GFLOPs; %s not written", out_dir / PLOT_NAME)

    lines = [f"# {meta.get('title') or 'distill-train results'}", ""]
    header = _meta_header(meta)
    if header:
        lines += header + [""]
    markdown = "\n".join(lines) + "\n" + render_markdown(rows)
    if "plot" in paths:
        markdown += f"\n![Accuracy against GFLOPs]({PLOT_NAME})\n"
    paths["markdown"] = out_dir / MARKDOWN_NAME
    atomic_write_text(paths["markdown"], markdown)
    paths["json"] = out_dir / JSON_NAME
    atomic_write_text(paths["json"], text + "\n")
    logger.info("wrote %s", ", ".join(str(path) for path in paths.values()))
    return paths
