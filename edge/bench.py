"""``edge-classify bench``: what each student costs and how well it classifies, on this machine.

For every bundle x runtime that can run it here, on real slides:

- latency per slide: each slide goes through the whole edge pipeline (``SlideClassifier``)
  ``warmup`` times unmeasured, then ``repeats`` times; median and 90th percentile, the
  median of each stage, and slides per hour (3600 s over the mean of the per-slide medians);
- GFLOPs per slide at the slide's real tissue sizes (``lowmag.edge.flops``), bundle size on
  disk, peak resident memory while it ran, threads;
- macro F1 with its 95% bootstrap CI (``lowmag.metrics``) when labeled images are given
  (a folder with one subfolder per class, at a known µm/px).

The conventional reference, measured in the same run when a full-resolution bundle is
given: the same tissue boxes tiled into 224 px patches at 0.5 µm/px (20x) read from
level 0 (``exact=True``), every patch with at least ``min_tile_tissue`` tissue run
through the full-resolution model. Each student row then states its per-slide speed-up
and FLOP reduction against it. Torch-free, like the rest of the edge runner.
"""

from __future__ import annotations

import logging
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from lowmag.bundle import Bundle, load_bundle
from lowmag.concurrency import in_background
from lowmag.edge.backends import (
    BackendChoice, choose_backend, open_session, openvino_gpu_available, ort_cuda_available, tensorrt_available,
)
from lowmag.edge.batch import units_of
from lowmag.edge.flops import bundle_gflops, model_gflops
from lowmag.edge.pipeline import (
    MIN_INPUT_SIDE, PipelineConfig, SlideClassifier, Timer, content_hash, pad_to, tile_regions,
    tiles_to_run, timed_read, tissue_fraction,
)
from lowmag.edge.results import write_slide_outputs
from lowmag.errors import LowmagError
from lowmag.labeled import Item, scan_image_folder
from lowmag.reader import choose_level, level_window, output_size, read_at_mpp, read_size, verify_pyramid
from lowmag.runtimes import RuntimeUnavailableError, logits_of
from lowmag.slide import open_slide
from lowmag.tissue import find_tissue, locate_tissue

logger = logging.getLogger("lowmag.edge")

RESULTS_SCHEMA = "lowmag.edge.bench/1"
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class BenchOptions:
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    backends: tuple[str, ...] = ()  # empty: every runtime that can run the bundle here
    images: Path | None = None
    images_mpp: float | None = None
    center_crop: int | None = None
    #: Full-resolution bundles, each a conventional reference (e.g. FP32 ONNX and INT8 OpenVINO).
    references: tuple[Path, ...] = ()
    reference_mpp: float = 0.5
    reference_patch: int = 224
    #: Measured runs of the reference per slide (None: ``repeats``), without warm-up: on a
    #: full-size slide one run takes minutes.
    reference_repeats: int | None = None
    config: PipelineConfig = field(default_factory=PipelineConfig)


# -- what can run a bundle here --------------------------------------------------------
def runnable(bundle: Bundle, wanted: Sequence[str] = ()) -> list[BackendChoice]:
    """Every runtime x device that can run ``bundle`` here (or only the ``wanted`` runtimes)."""
    candidates: list[tuple[str, str]] = []
    if bundle.target == "tensorrt":
        candidates.append(("tensorrt", "gpu"))
    if bundle.target in ("onnx", "tensorrt"):
        candidates.append(("onnxruntime", "cpu"))
        if ort_cuda_available():
            candidates.append(("onnxruntime", "gpu"))
    if bundle.target in ("onnx", "openvino"):
        candidates.append(("openvino", "cpu"))
        if openvino_gpu_available():
            candidates.append(("openvino", "gpu"))
    choices = []
    for backend, device in candidates:
        if wanted and backend not in wanted:
            continue
        if backend == "tensorrt" and not tensorrt_available():
            logger.warning("%s: TensorRT is not available here; its engine is not benchmarked", bundle.directory)
            continue
        try:
            choices.append(choose_backend(bundle, backend, device))
        except RuntimeUnavailableError as error:
            logger.warning("%s", error)
    return choices


# -- measurements ----------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant figures (GFLOPs span 1e-9 to 1e3)."""
    return float(f"{value:.{digits}g}")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bundle_bytes(bundle: Bundle) -> int:
    """Bytes of the bundle's files (model, weights, sidecars)."""
    return sum((bundle.directory / name).stat().st_size for name in bundle.files.values())


Run = Callable[[Path, Sequence[Path]], tuple[dict[str, float], dict[str, Any]]]


#: Keys of a run's timings that are CPU time, not stages (``with_cpu``).
CPU_KEYS = {"cpu": "cpu_ms", "hash_cpu": "hash_cpu_ms"}


def with_cpu(timer: Timer) -> dict[str, float]:
    """A run's stage milliseconds plus its CPU milliseconds: ``cpu`` for the whole process
    (every thread: runtimes, libvips, the hash) since the timer started, ``hash_cpu`` for the
    hash's own thread. On a machine with n cores a slide cannot take less wall time than
    cpu / n."""
    ms = timer.ms()
    ms["cpu"] = round((time.process_time() - timer.cpu_started) * 1000.0, 1)
    ms["hash_cpu"] = round(timer.cpu_beside.get("hash", 0.0) * 1000.0, 1)
    return ms


def time_slides(run: Run, slides: list, warmup: int, repeats: int,
                progress: Callable[[], None]) -> list[dict[str, Any]]:
    """Per slide: ``run`` called warmup + repeats times; it returns (stage ms, facts of the slide)."""
    rows = []
    for unit in slides:
        files = unit.files()
        first = [run(unit.path, files)[0]["total"] for _ in range(warmup)]
        outcomes = [run(unit.path, files) for _ in range(repeats)]
        calls = [ms for ms, _ in outcomes]
        progress()
        totals = [c["total"] for c in calls]
        rows.append({
            "slide": str(unit.path), "relative": unit.relative,
            "median_ms": round(statistics.median(totals), 1), "p90_ms": round(percentile(totals, 0.9), 1),
            # The first run of a slide: new input shapes make OpenVINO prepare each one, as a
            # watcher's every new slide does (the repeats find them prepared).
            "first_ms": first[0] if first else None,
            "stages_ms": {k: round(statistics.median(c[k] for c in calls), 1) for k in calls[0]
                          if k != "total" and k not in CPU_KEYS},
            **{field: round(statistics.median(c[k] for c in calls), 1) for k, field in CPU_KEYS.items()
               if k in calls[0]},
            **outcomes[-1][1],
        })
    return rows


def per_slide_summary(per_slide: list[dict[str, Any]]) -> dict[str, Any]:
    """Median latency, slides per hour, mean GFLOPs and median stage times over the slides."""
    if not per_slide:
        return {"median_ms_per_slide": None, "slides_per_hour": None, "gflops_per_slide": None, "stages_ms": {},
                "floor_ratio_median": None}
    medians = [row["median_ms"] for row in per_slide]
    ratios = [row["floor_ratio"] for row in per_slide if row.get("floor_ratio")]
    return {
        "floor_ratio_median": round(statistics.median(ratios), 2) if ratios else None,
        "median_ms_per_slide": round(statistics.median(medians), 1),
        "slides_per_hour": round(3600_000 / statistics.mean(medians)),
        "gflops_per_slide": significant(statistics.mean(r["gflops"] for r in per_slide)),
        "stages_ms": {k: round(statistics.median(r["stages_ms"][k] for r in per_slide), 1)
                      for k in per_slide[0]["stages_ms"]},
    }


def bench_student(bundle: Bundle, choice: BackendChoice, slides: list, options: BenchOptions,
                  progress: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """One bundle on one runtime: latency, stages, GFLOPs, memory, and accuracy when labeled."""
    reset_peak_rss()
    session = open_session(bundle, choice, options.threads)
    classifier = SlideClassifier(bundle, session, options.config)

    def run(path: Path, files: Sequence[Path]) -> tuple[dict[str, float], dict[str, Any]]:
        result = classifier.classify(path, files)
        # The outputs are written as the edge runner writes them (timed as "write"), then dropped.
        write_slide_outputs(scratch, path.name, result, bundle, choice, options.threads,
                            options.config.review_threshold)
        sizes = [size for piece in result.pieces for size in piece.inputs]
        return with_cpu(result.timer), {"gflops": significant(bundle_gflops(choice.model, sizes)),
                                        "label": result.label, "pieces": len(result.pieces), "inputs": len(sizes)}

    with tempfile.TemporaryDirectory(prefix="lowmag-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        per_slide = time_slides(run, slides, options.warmup, options.repeats, progress)
    peak_mb = peak_rss_mb()  # the runs', before the floor holds its inputs
    for slide_row, unit in zip(per_slide, slides):
        floor = floor_ms(bundle, session, unit.path, options)
        slide_row["floor_ms"] = floor
        slide_row["floor_ratio"] = round(slide_row["median_ms"] / floor["total"], 2) if floor["total"] else None
    row = {
        "bundle": bundle.directory.name, "path": str(bundle.directory), "target": bundle.target,
        "regime": training_regime(bundle),
        "precision": bundle.precision, "magnification": bundle.spec.magnification,
        "mpp": bundle.spec.target_mpp, "backend": choice.backend, "device": choice.device,
        "threads": options.threads or _default_threads(), "bundle_bytes": bundle_bytes(bundle),
        "slides": per_slide,
        "p90_ms_per_slide": round(percentile([r["p90_ms"] for r in per_slide], 0.9), 1) if per_slide else None,
        **per_slide_summary(per_slide),
    }
    if options.images is not None:
        row["accuracy"] = labeled_accuracy(bundle, session, options)
    row["peak_rss_mb"] = peak_mb
    return row


def floor_ms(bundle: Bundle, session, path: Path, options: BenchOptions, repeats: int = 3) -> dict[str, float]:
    """The least a slide can cost this student, measured here: decoding, at the pyramid level
    the student reads, exactly the pixels of the tissue pieces the pipeline found, plus the
    model on the inputs the pipeline ran (a piece cut into tiles skips its near-blank ones, as
    the pipeline does); median of ``repeats``, each on a freshly opened slide (no decoded
    tile cached from the last); milliseconds, and ``cpu``: the process's CPU milliseconds for
    both (every thread). Nothing else: no pyramid check, tissue finding, resampling, outputs or
    hash."""
    config = options.config
    target = float(bundle.spec.target_mpp)
    tolerance = config.level_tolerance
    with open_slide(path, assume_mpp=config.assume_mpp) as slide:
        regions: list = []
        inputs: list = []
        verify_pyramid(slide, up_to_mpp=target * (1.0 + tolerance))
        for box in locate_tissue(slide, config.tissue):
            tiles = tile_regions(box, read_size(slide, target, box.region, tolerance), config.max_piece_px)
            pixels = (read_at_mpp(slide, target, region, as_stored_within=tolerance) for region in tiles)
            regions += tiles
            inputs += [pad_to(rgb, MIN_INPUT_SIDE, slide.info.background) for rgb, _ in
                       tiles_to_run(pixels, len(tiles), config.tissue.min_saturation, config.min_tile_tissue)]
        level = slide.info.levels[choose_level(slide, target, tolerance)]
    windows = [level_window(level, region) for region in regions]
    decode, infer, cpu = [], [], []
    for _ in range(repeats):
        with open_slide(path, assume_mpp=config.assume_mpp) as fresh:
            tick, cpu_tick = time.perf_counter(), time.process_time()
            for x, y, w, h in windows:
                fresh.read_region(level.index, x, y, w, h)
            decode.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        for image in inputs:
            logits_of(session, [image], batch_size=1)
        infer.append(time.perf_counter() - tick)
        cpu.append(time.process_time() - cpu_tick)
    ms = {"decode": statistics.median(decode) * 1000, "inference": statistics.median(infer) * 1000,
          "cpu": statistics.median(cpu) * 1000}
    return {k: round(v, 1) for k, v in {**ms, "total": ms["decode"] + ms["inference"]}.items()}


def _default_threads() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def training_regime(bundle: Bundle) -> str:
    """The data a student learned from, as distill-train records it (plot series)."""
    config = bundle.spec.provenance.config
    step = str(config.get("step", ""))
    if step.startswith("teacher"):
        return "teacher"
    if step.startswith("baseline"):
        return "baseline (labels, no teacher)"
    regime = config.get("regime")
    return f"distilled, {regime}" if regime else "unknown"


# -- accuracy on labeled images --------------------------------------------------------
def labeled_items(bundle: Bundle, options: BenchOptions) -> tuple[Item, ...]:
    """The labeled images in the bundle's class order; ``run_bench`` calls this before any
    timing, so a wrong folder fails at once rather than after the benchmark."""
    if options.images_mpp is None:
        raise LowmagError("--images needs --mpp: the µm/px of the labeled images.")
    return _scan_labeled(options.images, options.images_mpp, bundle.spec.classes, options.center_crop)


@lru_cache(maxsize=8)
def _scan_labeled(folder: Path, mpp: float, classes: tuple[str, ...], crop: int | None) -> tuple[Item, ...]:
    _, items = scan_image_folder(folder, scan_mpp=mpp, classes=classes, crop_px=crop, require_all_classes=False)
    return tuple(items)


def labeled_accuracy(bundle: Bundle, session, options: BenchOptions) -> dict[str, Any]:
    """Macro F1 on a labeled class folder, read as the export gate and training read it."""
    from lowmag.metrics import classification_metrics

    items = labeled_items(bundle, options)
    images = [item.read(bundle.spec.target_mpp) for item in items]
    logits = logits_of(session, images, batch_size=32)
    metrics = classification_metrics([item.label for item in items], logits.argmax(1), bundle.spec.classes,
                                     n_bootstrap=2000)
    return {"images": len(items), **{k: metrics[k] for k in ("accuracy", "macro_f1") if k in metrics}}


# -- the conventional reference --------------------------------------------------------
def bench_reference(bundle: Bundle, choice: BackendChoice, slides: list, options: BenchOptions,
                    progress: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Full-resolution model on 224 px patches at 0.5 µm/px read from level 0, per slide."""
    reset_peak_rss()
    session = open_session(bundle, choice, options.threads)
    patch = options.reference_patch
    mpp = options.reference_mpp
    gflops_per_patch = model_gflops(str(choice.model), patch, patch)

    def run(path: Path, files: Sequence[Path]) -> tuple[dict[str, float], dict[str, Any]]:
        # Timed like the students, every part in a stage: the hash beside the work (waited
        # for at the end), choosing the patches that hold tissue under "tissue", padding
        # the edge patches under "inference".
        timer = Timer()
        hashing = in_background(timer.beside("hash", lambda: content_hash(files)))
        try:
            facts = reference_run(path, timer)
        finally:  # waited for even when the run fails: no hash thread outlives its slide
            with timer.stage("hash"):
                hashing.result()
        return with_cpu(timer), facts

    def reference_run(path: Path, timer: Timer) -> dict[str, Any]:
        with timer.stage("open"):
            slide = open_slide(path, assume_mpp=options.config.assume_mpp)
        with slide:
            with timer.stage("tissue"):  # level 0 kept for the patches, as the students' pipeline keeps it
                boxes = find_tissue(slide, options.config.tissue, keep_level0=True).boxes
            patches = 0
            for box in boxes:
                size = output_size(slide, mpp, box.region)
                for region in tile_regions(box, size, patch):
                    rgb = timed_read(slide, mpp, region, timer, exact=True)
                    with timer.stage("tissue"):
                        empty = tissue_fraction(rgb, options.config.tissue.min_saturation) < options.config.min_tile_tissue
                    if empty:
                        continue
                    with timer.stage("inference"):
                        logits_of(session, [pad_to(rgb, patch, WHITE)], batch_size=1)  # as tiling tools pad edges
                    patches += 1
        return {"gflops": significant(patches * gflops_per_patch), "patches": patches}

    if options.reference_repeats is None:
        per_slide = time_slides(run, slides, options.warmup, options.repeats, progress)
    else:
        per_slide = time_slides(run, slides, 0, options.reference_repeats, progress)
    accuracy = labeled_accuracy(bundle, session, options) if options.images is not None else None
    return {
        "accuracy": accuracy,
        "bundle": bundle.directory.name, "path": str(bundle.directory), "precision": bundle.precision,
        "mpp": mpp, "patch_px": patch, "backend": choice.backend, "device": choice.device,
        "threads": options.threads or _default_threads(), "bundle_bytes": bundle_bytes(bundle),
        "gflops_per_patch": significant(gflops_per_patch), "slides": per_slide,
        **per_slide_summary(per_slide),
        "peak_rss_mb": peak_rss_mb(),
    }


# -- the whole run ---------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU, cores, RAM, GPU and library versions of the machine the numbers come from."""
    from lowmag import __version__
    from lowmag.provenance import cpu_info, memory_gib

    info: dict[str, Any] = {**cpu_info(), "python": platform.python_version(), "os": platform.platform(),
                            "lowmag": __version__, "ram_gib": memory_gib()}
    from lowmag.tensorrt import current_environment

    info["gpu"] = current_environment().get("gpu") or "none"
    import importlib.metadata as md

    for name in ("numpy", "pyvips", "openslide-python", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return info


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, all) CPU ticks since boot from Linux's /proc/stat; None elsewhere. Steal is the
    time a virtual machine's cores were runnable but another guest had the host's CPU."""
    try:
        with open("/proc/stat", encoding="ascii") as stat_file:
            fields = stat_file.readline().split()
        if not fields or fields[0] != "cpu" or len(fields) < 9:
            return None
        values = [int(v) for v in fields[1:9]]
    except (OSError, ValueError):
        return None
    return values[7], sum(values)  # user..steal; guest time is already within user


def steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of the machine's CPU time (all cores, busy or idle) taken by other guests between two ``cpu_ticks``."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100.0 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def run_bench(models: Sequence[Path], slide_paths: Sequence[Path], options: BenchOptions,
              progress: Callable[[int], Callable[[], None]] | None = None) -> dict[str, Any]:
    """Benchmark every bundle on every runtime here, and the reference; plain-data results."""
    slides = [unit for unit in units_of(list(slide_paths)) if not unit.skipped]
    readable = []
    for unit in slides:  # slides that cannot be classified are reported, not benchmarked
        try:
            with open_slide(unit.path, assume_mpp=options.config.assume_mpp):
                readable.append(unit)
        except LowmagError as error:
            logger.warning("not benchmarked: %s", error)
    if not readable:
        raise LowmagError(f"none of {', '.join(map(str, slide_paths))} holds a slide that opens; give slides "
                          "with a pixel size in their metadata (the warnings above give each one's reason).")
    bundles = [load_bundle(m) for m in models]
    plan = [(b, c) for b in bundles for c in runnable(b, options.backends)]
    references = [load_bundle(r) for r in options.references]
    if options.images is not None:  # a wrong labeled folder fails now, not after the timings
        for bundle in bundles + references:
            labeled_items(bundle, options)
    total = len(readable) * (len(plan) + len(references))
    tick = progress(total) if progress else (lambda: None)
    started, ticks = time.time(), cpu_ticks()
    ref_rows = [bench_reference(r, choose_backend(r), readable, options, tick) for r in references]
    rows = [bench_student(b, c, readable, options, tick) for b, c in plan]
    for row in rows:
        row["vs_references"] = [compare(row, ref) for ref in ref_rows]
        if ref_rows:
            row["vs_reference"] = row["vs_references"][0]
    host = machine()
    # A virtual machine's cores are shared: what other guests took during the run makes
    # sittings differ (10-20 % between runs of the same code here), so the report says it.
    host["cpu_steal_pct"] = steal_pct(ticks, cpu_ticks())
    return {
        "schema": RESULTS_SCHEMA, "machine": host, "started_at": started,
        "seconds": round(time.time() - started, 1),
        "options": {"repeats": options.repeats, "warmup": options.warmup, "threads": options.threads,
                    "max_piece_px": options.config.max_piece_px,
                    "level_tolerance_pct": round(options.config.level_tolerance * 100, 3),
                    "images": str(options.images or ""),
                    "images_mpp": options.images_mpp, "center_crop": options.center_crop,
                    "reference_mpp": options.reference_mpp, "reference_patch": options.reference_patch,
                    "reference_repeats": options.reference_repeats},
        "slides": [u.relative for u in readable], "skipped_slides": [str(u.path) for u in slides
                                                                     if u not in readable],
        "students": rows, "reference": ref_rows[0] if ref_rows else None, "references": ref_rows,
    }


def compare(row: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Per-slide speed-up and FLOP reduction of a student against the reference, same slides."""
    speedups, reductions = [], []
    for mine, theirs in zip(row["slides"], reference["slides"]):
        speedups.append(theirs["median_ms"] / mine["median_ms"])
        if mine["gflops"] > 0:
            reductions.append(theirs["gflops"] / mine["gflops"])
    return {
        "reference": reference["bundle"], "precision": reference["precision"], "backend": reference["backend"],
        "speedup_median": round(statistics.median(speedups), 2),
        "flop_reduction_median": round(statistics.median(reductions), 1) if reductions else None,
        "per_slide": [{"slide": m["relative"], "speedup": round(s, 2)} for m, s in zip(row["slides"], speedups)],
    }
