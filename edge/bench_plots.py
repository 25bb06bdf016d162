"""The bench report's plots as plain SVG: no plotting library on a workstation, and the
HTML report embeds them inline, so it is one self-contained file.

- ``f1_vs_gflops``: macro F1 against GFLOPs per slide on a log axis, one series per data
  regime the students were trained in (like the paper's Figure 3), the reference as a star;
- ``latency``: median latency per slide by bundle, backend and precision (p90 as a whisker);
- ``stages``: the per-stage split of each run's median slide, as stacked bars.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any, Sequence

from lowmag.edge.pipeline import STAGES

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#7f7f7f")


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
            f'<title>{escape(title)}</title><rect width="100%" height="100%" fill="white"/>'
            + "".join(body) + "</svg>\n")


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    font = 'font-family="sans-serif"' + ("" if "font-size" in extra else ' font-size="12"')
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {font} {extra}>{escape(text)}</text>'


def f1_vs_gflops(points: Sequence[dict[str, Any]], title: str = "Macro F1 against GFLOPs per slide") -> str:
    """``points``: dicts with gflops, f1 (percent), series, label; series 'reference' is a star."""
    width, height, left, right, top, bottom = 720, 400, 60, 230, 30, 50
    usable = [p for p in points if p.get("gflops") and p.get("f1") is not None]
    body = [_text(width / 2, 18, title, "middle", 'font-weight="bold"')]
    if not usable:
        body.append(_text(width / 2, height / 2, "no labeled images were given: no accuracy to plot", "middle"))
        return _svg(width, height, body, title)
    xs = [math.log10(p["gflops"]) for p in usable]
    ys = [p["f1"] for p in usable]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs)) + (1 if math.floor(min(xs)) == math.ceil(max(xs)) else 0)
    y0, y1 = max(0.0, math.floor(min(ys) / 5) * 5 - 5), min(100.0, math.ceil(max(ys) / 5) * 5 + 5)
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    body.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>')
    for decade in range(x0, x1 + 1):
        body.append(f'<line x1="{px(decade):.1f}" y1="{top}" x2="{px(decade):.1f}" y2="{top + plot_h}" stroke="#ddd"/>')
        body.append(_text(px(decade), top + plot_h + 16, f"{10 ** decade:g}", "middle"))
    for tick in range(int(y0), int(y1) + 1, 5 if y1 - y0 <= 40 else 10):
        body.append(f'<line x1="{left}" y1="{py(tick):.1f}" x2="{left + plot_w}" y2="{py(tick):.1f}" stroke="#eee"/>')
        body.append(_text(left - 6, py(tick) + 4, f"{tick}", "end"))
    body.append(_text(left + plot_w / 2, height - 12, "GFLOPs per slide (log scale)", "middle"))
    body.append(_text(16, top + plot_h / 2, "macro F1 (%)", "middle", f'transform="rotate(-90 16 {top + plot_h / 2})"'))
    series = sorted({p["series"] for p in usable}, key=lambda s: (s == "reference", s))
    for i, name in enumerate(series):
        colour = "#000" if name == "reference" else COLOURS[i % len(COLOURS)]
        members = sorted((p for p in usable if p["series"] == name), key=lambda p: p["gflops"])
        # One line through the mean F1 at each cost (bundles of one student differ only by precision
        # and runtime); every bundle is a dot, and each cost is labelled once.
        costs = sorted({p["gflops"] for p in members})
        means = [(c, sum(p["f1"] for p in members if p["gflops"] == c) / sum(p["gflops"] == c for p in members))
                 for c in costs]
        if len(means) > 1:
            body.append('<polyline fill="none" stroke="{}" points="{}"/>'.format(
                colour, " ".join(f"{px(math.log10(c)):.1f},{py(f):.1f}" for c, f in means)))
        for p in members:
            x, y = px(math.log10(p["gflops"])), py(p["f1"])
            body.append(f'<polygon points="{_star(x, y)}" fill="{colour}"/>' if name == "reference"
                        else f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}" fill-opacity="0.8"/>')
        for c, f in means:
            label = next(p.get("label", "") for p in members if p["gflops"] == c)
            body.append(_text(px(math.log10(c)) + 7, py(f) - 7, label, extra='font-size="10"'))
        ly = top + 16 + 18 * i
        body.append(f'<circle cx="{width - right + 16}" cy="{ly - 4}" r="4" fill="{colour}"/>'
                    + _text(width - right + 26, ly, name))
    return _svg(width, height, body, title)


def _star(x: float, y: float, r: float = 7) -> str:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r / 2.5
        angle = math.pi / 2 + k * math.pi / 5
        points.append(f"{x + radius * math.cos(angle):.1f},{y - radius * math.sin(angle):.1f}")
    return " ".join(points)


def latency(rows: Sequence[dict[str, Any]], title: str = "Median latency per slide (ms), p90 as whisker") -> str:
    """``rows``: dicts with label, median, p90."""
    left, right, bar, gap = 330, 60, 18, 8
    width = 760
    height = 40 + len(rows) * (bar + gap) + 30
    top = 34
    peak = max([r["p90"] or r["median"] for r in rows] + [1.0])
    scale = (width - left - right) / peak
    body = [_text(width / 2, 18, title, "middle", 'font-weight="bold"')]
    for i, r in enumerate(rows):
        y = top + i * (bar + gap)
        colour = COLOURS[r.get("group", i) % len(COLOURS)]
        body.append(_text(left - 8, y + bar - 5, r["label"], "end"))
        body.append(f'<rect x="{left}" y="{y}" width="{r["median"] * scale:.1f}" height="{bar}" fill="{colour}"/>')
        if r.get("p90"):
            xp = left + r["p90"] * scale
            body.append(f'<line x1="{left + r["median"] * scale:.1f}" y1="{y + bar / 2}" x2="{xp:.1f}" '
                        f'y2="{y + bar / 2}" stroke="#333"/><line x1="{xp:.1f}" y1="{y + 3}" x2="{xp:.1f}" '
                        f'y2="{y + bar - 3}" stroke="#333"/>')
        body.append(_text(left + r["median"] * scale + 4, y + bar - 5, f"{r['median']:.0f}",
                          extra='font-size="10"'))
    return _svg(width, height, body, title)


def stages(rows: Sequence[dict[str, Any]], title: str = "Where the time goes: median ms per stage") -> str:
    """``rows``: dicts with label and stages_ms."""
    left, right, bar, gap, top = 330, 40, 18, 8, 56
    width = 760
    height = top + len(rows) * (bar + gap) + 20
    peak = max([sum(r["stages_ms"].get(s, 0) for s in STAGES) for r in rows] + [1.0])
    scale = (width - left - right) / peak
    body = [_text(width / 2, 18, title, "middle", 'font-weight="bold"')]
    for k, stage in enumerate(STAGES):
        x = left - 200 + k * 80
        body.append(f'<rect x="{x}" y="28" width="10" height="10" fill="{COLOURS[k % len(COLOURS)]}"/>'
                    + _text(x + 14, 37, stage, extra='font-size="10"'))
    for i, r in enumerate(rows):
        y = top + i * (bar + gap)
        body.append(_text(left - 8, y + bar - 5, r["label"], "end"))
        x = float(left)
        for k, stage in enumerate(STAGES):
            w = r["stages_ms"].get(stage, 0) * scale
            if w > 0:
                body.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" '
                            f'fill="{COLOURS[k % len(COLOURS)]}"><title>{stage}: '
                            f'{r["stages_ms"].get(stage, 0):.0f} ms</title></rect>')
                x += w
    return _svg(width, height, body, title)
