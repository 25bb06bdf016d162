"""Speed of exported students on this machine, next to PyTorch eager.

For each bundle, and for the PyTorch checkpoint it came from, one forward pass is timed
on inputs of realistic size at the bundle's magnification: square tissue pieces of given
side lengths in millimetres (a piece of side s mm is s·1000/µm-per-px pixels across) and a
batch of tiles. Latency is the median and 90th percentile over repeats after warm-up;
throughput is tissue area per second. Every runtime gets the same thread count.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lowmag.bundle import Bundle, load_bundle
from lowmag.errors import LowmagError


@dataclass(frozen=True)
class Case:
    """One input: ``batch`` images of ``side`` px, covering ``area_mm2`` of tissue in all."""

    name: str
    batch: int
    side: int
    area_mm2: float


def cases_for(mpp: float, piece_mm: Sequence[float], tile_um: float, tile_batch: int) -> list[Case]:
    cases = []
    for mm in piece_mm:
        side = max(16, int(round(mm * 1000 / mpp)))
        cases.append(Case(f"{mm:g} mm piece", 1, side, (side * mpp / 1000) ** 2))
    if tile_batch:
        side = max(16, int(round(tile_um / mpp)))
        cases.append(Case(f"{tile_batch} tiles of {tile_um:g} µm", tile_batch, side,
                          tile_batch * (side * mpp / 1000) ** 2))
    return cases


def tissue_pixels(batch: int, side: int, seed: int = 0) -> np.ndarray:
    """H&E-like pixels (the synthetic slide's texture); speed does not depend on content."""
    from lowmag.synthetic import Blob, synthetic_pixels

    big = side + 2
    image = synthetic_pixels(big, big, [Blob(big // 2, big // 2, big, big)], seed=seed)[:side, :side]
    return np.ascontiguousarray(np.broadcast_to(image, (batch, side, side, 3)))


def time_call(run: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float], case: Case) -> dict[str, Any]:
    median = statistics.median(times)
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_ms": round(1000 * median, 2), "p90_ms": round(1000 * p90, 2),
            "mm2_per_s": round(case.area_mm2 / median, 3), "images_per_s": round(case.batch / median, 2),
            "repeats": len(times)}


def _eager(bundle: Bundle, threads: int) -> Callable[[np.ndarray], Any]:
    """PyTorch eager on the bundle's source checkpoint (hash-checked), with the same graph."""
    import torch

    from lowmag.export.onnx_graph import StudentGraph
    from lowmag.train.checkpoint import load_checkpoint

    source = Path(bundle.spec.export["source_checkpoint"]["path"])
    if not source.is_dir():
        raise LowmagError(f"{bundle.directory}: its source checkpoint {source} is gone; "
                          "PyTorch eager cannot be timed without it (pass --no-eager).")
    model, spec = load_checkpoint(source)
    graph = StudentGraph(model, spec).eval()
    torch.set_num_threads(threads)

    def run(pixels: np.ndarray) -> Any:
        with torch.inference_mode():
            return graph(torch.from_numpy(pixels))

    return run


def bench_bundles(paths: Sequence[Path], *, piece_mm: Sequence[float], tile_um: float, tile_batch: int,
                  threads: int, warmup: int, repeats: int, eager: bool = True,
                  progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Time every bundle (and PyTorch eager once per source checkpoint); returns the results."""
    from lowmag.runtimes import open_bundle

    bundles = [load_bundle(p) for p in paths]
    rows: list[dict[str, Any]] = []
    eager_done: set[str] = set()
    for bundle in bundles:
        spec = bundle.spec
        cases = cases_for(spec.target_mpp, piece_mm, tile_um, tile_batch)
        runners: list[tuple[str, str, str, Callable[[np.ndarray], Any]]] = []
        source = spec.export["source_checkpoint"]["path"]
        if eager and source not in eager_done:
            runners.append(("pytorch-eager", "fp32", source, _eager(bundle, threads)))
            eager_done.add(source)
        session = open_bundle(bundle, threads=threads)
        runners.append((session.backend, bundle.precision, str(bundle.directory), session.run))
        for backend, precision, where, run in runners:
            for case in cases:
                progress(f"{spec.magnification} {backend} {precision}: {case.name} ({case.batch}x{case.side} px)")
                pixels = tissue_pixels(case.batch, case.side)
                times = time_call(lambda: run(pixels), warmup, repeats)
                gate = spec.export.get("gate", {}).get("accuracy") or {}
                rows.append({
                    "magnification": spec.magnification, "mpp": spec.target_mpp, "backend": backend,
                    "precision": precision, "source": where, "case": case.name, "batch": case.batch,
                    "side_px": case.side, "area_mm2": round(case.area_mm2, 4),
                    "macro_f1_change": gate.get("macro_f1_change") if backend != "pytorch-eager" else 0.0,
                    **_summary(times, case),
                })
    _add_speedups(rows)
    return {"machine": machine(threads), "settings": {
        "piece_mm": list(piece_mm), "tile_um": tile_um, "tile_batch": tile_batch, "threads": threads,
        "warmup": warmup, "repeats": repeats}, "rows": rows}


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    eager = {(r["mpp"], r["case"]): r["median_ms"] for r in rows if r["backend"] == "pytorch-eager"}
    for row in rows:
        base = eager.get((row["mpp"], row["case"]))
        row["speedup_vs_eager"] = round(base / row["median_ms"], 2) if base else None


def machine(threads: int) -> dict[str, Any]:
    from lowmag.export.pipeline import tool_versions
    from lowmag.provenance import cpu_info, memory_gib

    cpu = cpu_info()
    return {"cpu": cpu["model"], "isa": cpu["isa"], "cores": cpu["cores"], "threads_used": threads,
            "memory_gib": memory_gib(),
            "os": platform.platform(), "tools": tool_versions()}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, {m['memory_gib']} GiB; "
        f"{m['threads_used']} threads per runtime. "
        + ", ".join(f"{k} {v}" for k, v in m["tools"].items() if k in ("torch", "onnxruntime", "openvino")),
        "",
        "| magnification | input | bundle | runtime | precision | median ms | p90 ms | mm²/s | speed-up vs eager | macro-F1 change (gate) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        change = "" if r["macro_f1_change"] is None else f"{r['macro_f1_change']:+.2f}"
        speedup = "" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        lines.append(
            f"| {r['magnification']} | {r['case']} ({r['batch']}×{r['side_px']} px) | {Path(r['source']).name} | {r['backend']} | "
            f"{r['precision']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['mm2_per_s']:.3g} | "
            f"{speedup} | {change} |"
        )
    return "\n".join(lines) + "\n"
