"""``edge-classify``: classify every new slide a scanner writes, on a CPU or a small GPU (no torch).

``run`` classifies existing slides once, ``watch`` follows a scanner's output folder for
months, ``status`` summarises what an output folder's ledger holds.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from lowmag.cli_support import ManyValuesCommand, handle_errors, stage_group

logger = logging.getLogger("lowmag.edge")

main = stage_group("Classify every new slide a scanner writes, on a CPU or a small GPU (no torch).")


LEVEL_TOLERANCE_HELP = ("Use a pyramid level within PCT % of the model's µm/px as stored, without resampling: "
                        "faster (no resample; a level up to PCT % coarser spares decoding a finer one), but the "
                        "model sees tissue up to PCT % off its scale. 0 = always resample exactly. "
                        "docs/level-tolerance/results.md measures what 1-2 % change.")


def _engine_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by run and watch: the model, the runtime and the per-slide pipeline."""
    options = [
        click.option("--model", "model", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Bundle folder written by export-student."),
        click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Output folder: results/, summary.csv, ledger.sqlite."),
        click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]), default="auto",
                     show_default=True, help="Runtime; auto = the bundle's own, on the fastest device present."),
        click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Inference threads per worker (default: the runtime's choice, all cores)."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Slides classified at once (each worker holds its own model session)."),
        click.option("--max-piece-px", type=click.IntRange(min=16), default=2048, show_default=True,
                     help="Tissue pieces larger than this (pixels at the model's magnification) are tiled."),
        click.option("--pixel-budget", type=click.IntRange(min=1), default=256_000_000, show_default=True,
                     help="Refuse a slide whose tissue at the model's magnification exceeds this many pixels."),
        click.option("--review-threshold", type=click.FloatRange(0, 1), default=0.6, show_default=True,
                     help="needs_review when the slide's calibrated confidence is below this."),
        click.option("--ood", type=click.Choice(["flag", "refuse"]), default="flag", show_default=True,
                     help="Slides unlike the model's training data (fluorescence, IHC, greyscale, out of focus...): "
                          "flag = classify, set needs_review and give the reasons; refuse = record as failed."),
        click.option("--level-tolerance", type=click.FloatRange(0, 5), default=0.0, show_default=True, metavar="PCT",
                     help=LEVEL_TOLERANCE_HELP),
        click.option("--assume-mpp", type=click.FloatRange(min=0, min_open=True), default=None, metavar="UM_PER_PX",
                     help="Level-0 µm/px for slides without one (applies to every slide: use with care)."),
        click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True,
                     help="Tries for a slide whose failure may be transient (read or I/O errors)."),
        click.option("--quarantine", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Move slides that failed for good into this folder."),
        click.option("--rebuild-engine", is_flag=True,
                     help="TensorRT: build an engine for this GPU into the local cache when the bundle's does not match."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _setup(model: Path, out: Path, backend: str, device: str, threads: int | None, workers: int,
           max_piece_px: int, pixel_budget: int, review_threshold: float, ood: str, level_tolerance: float,
           assume_mpp: float | None, max_attempts: int, quarantine: Path | None, rebuild_engine: bool,
           retry_delay_s: float, settle_s: float = 2.0):
    from lowmag.bundle import load_bundle
    from lowmag.edge.backends import choose_backend
    from lowmag.edge.pipeline import PipelineConfig
    from lowmag.edge.runner import RunnerOptions

    bundle = load_bundle(model)
    choice = choose_backend(bundle, backend, device)
    for warning in choice.warnings:
        logger.warning(warning)
    config = PipelineConfig(max_piece_px=max_piece_px, pixel_budget=pixel_budget,
                            review_threshold=review_threshold, assume_mpp=assume_mpp, ood=ood,
                            level_tolerance=level_tolerance / 100.0)
    if not bundle.spec.fingerprint:
        logger.warning("%s has no fingerprint of its training data (exported by an older lowmag): slides are only "
                       "checked for being brightfield, not for being like the training data. Re-export it with "
                       "export-student --refresh-fingerprint to add one.", bundle.directory)
    options = RunnerOptions(workers=workers, threads=threads, max_attempts=max_attempts, retry_delay_s=retry_delay_s,
                            settle_s=settle_s,
                            quarantine=quarantine, rebuild_engine=rebuild_engine)
    logger.info("model %s: %s, %s %s, %s classes; runtime %s", bundle.directory, bundle.spec.magnification,
                bundle.target, bundle.precision, len(bundle.spec.classes), choice.describe())
    return bundle, choice, config, options


def _log_to_stderr(verbose: int) -> None:
    """One timestamped line per slide; the root level stays as -v set it.

    A crash inside a native library (a slide decoder, a runtime) leaves every thread's
    Python stack in the log instead of a bare exit code.
    """
    faulthandler.enable(all_threads=True)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def _on_signals(handler: Callable[[], None]) -> None:
    """SIGTERM/SIGINT: the first asks for a clean stop, a second one exits at once."""
    state = {"count": 0}

    def handle(signum: int, frame: Any) -> None:
        state["count"] += 1
        if state["count"] > 1:
            logger.warning("second signal: exiting now; slides in hand are re-queued on the next start")
            logging.shutdown()
            os._exit(130)
        logger.warning("%s: finishing or releasing the slides in hand, then stopping", signal.Signals(signum).name)
        handler()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


class _StopRequest:
    """A stop asked for before there is anything to stop (the start: the ledger's recovery,
    the model's compilation) is kept and passed on once the watcher or batch exists, so a
    SIGTERM at any moment after the handlers are installed ends in a clean stop (exit 0),
    never in the default handler's death by signal."""

    def __init__(self) -> None:
        self.requested = False
        self.target: Callable[[], None] | None = None

    def __call__(self) -> None:
        self.requested = True
        if self.target is not None:
            self.target()

    def attach(self, target: Callable[[], None]) -> None:
        self.target = target
        if self.requested:
            target()


def _exit_if_stuck(stuck: list, timeout: float, max_attempts: int) -> None:
    """Slides still in hand after the stop's timeout (a decode or inference call that cannot
    be interrupted): exit now, *holding* the output lock until the process is gone, so no
    second process claims them while this one still works on them. They stay 'processing':
    the next start counts the attempt, and one that outlasts every stop ends failed."""
    if not stuck:
        return
    for job in stuck:
        logger.warning("still classifying %s after %g s; exiting without it: the next start tries it again "
                       "(attempt %d of %d)", job.shown, timeout, job.attempts + 1, max_attempts)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


@main.command("run")
@click.argument("slides", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@_engine_options
@click.option("--reprocess", is_flag=True, help="Classify again slides already done (default: skip them).")
@click.option("--retry-delay", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds before the first retry of a transient failure (doubles each time).")
@click.pass_context
@handle_errors
def run_command(ctx: click.Context, slides: tuple[Path, ...], reprocess: bool, retry_delay: float,
                **kwargs: Any) -> None:
    """Classify SLIDES (files, DICOM folders, or folders searched for slides) once, with a progress bar.

    Slides already done with the same size and mtime are skipped; failed ones are tried again.
    Exits 1 when any slide failed (each failure is in summary.csv and `edge-classify status`).
    """
    from lowmag.edge.batch import run_batch

    _log_to_stderr(ctx.find_root().params.get("verbose", 0))
    stop = _StopRequest()
    _on_signals(stop)  # before the model loads: a stop during the start is a clean one
    bundle, choice, config, options = _setup(retry_delay_s=retry_delay, **kwargs)
    report = run_batch(list(slides), kwargs["out"], bundle, choice, config, options, reprocess=reprocess,
                       install_signals=stop.attach)
    click.echo(report.summary())
    _exit_if_stuck(report.stuck, 60.0, options.max_attempts)
    if report.failed:
        raise click.ClickException(f"{report.failed} of {report.total} slide(s) failed; "
                                   f"see edge-classify status --out {kwargs['out']}")


@main.command("watch")
@click.argument("scans", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_engine_options
@click.option("--poll", is_flag=True, help="Poll the folder instead of filesystem events (network shares).")
@click.option("--poll-interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds between polls with --poll.")
@click.option("--settle", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="A slide is complete when its size and mtime stayed the same this many seconds.")
@click.option("--rescan-interval", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds between full rescans (catch slides whose events were missed).")
@click.option("--retry-delay", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds before the first retry of a transient failure (doubles each time).")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="On SIGTERM, seconds to let the slides in hand finish before releasing them.")
@click.pass_context
@handle_errors
def watch_command(ctx: click.Context, scans: Path, poll: bool, poll_interval: float, settle: float,
                  rescan_interval: float, retry_delay: float, shutdown_timeout: float, **kwargs: Any) -> None:
    """Classify every slide that appears under SCANS, once it is completely written, until stopped.

    Stop it with SIGTERM or Ctrl-C: slides in hand finish (or go back to the queue), and a
    restart resumes where it stopped. One watcher per --out folder.
    """
    from lowmag.edge.batch import open_output, wait_until_writable
    from lowmag.edge.runner import EdgeRunner
    from lowmag.edge.watcher import Watcher, WatchOptions

    _log_to_stderr(ctx.find_root().params.get("verbose", 0))
    out: Path = kwargs["out"]
    if out.resolve() == scans.resolve():
        raise click.UsageError("--out must not be the watched folder itself; use a folder beside it.")
    stop = _StopRequest()
    _on_signals(stop)  # before the ledger's recovery and the model's compilation: see _StopRequest
    bundle, choice, config, options = _setup(retry_delay_s=retry_delay, settle_s=settle, **kwargs)
    wait_until_writable(out)
    with open_output(out, options.max_attempts) as ledger:
        runner = EdgeRunner(out, ledger, bundle, choice, config, options)
        runner.check_backend()
        exclude = [p for p in (out, options.quarantine) if p is not None]
        watcher = Watcher(scans, runner, WatchOptions(settle_s=settle, poll=poll, poll_interval_s=poll_interval,
                                                      rescan_interval_s=rescan_interval,
                                                      shutdown_timeout_s=shutdown_timeout), exclude=exclude)
        stop.attach(watcher.request_stop)
        started = time.time()
        stuck = watcher.run()
        _exit_if_stuck(stuck, shutdown_timeout, options.max_attempts)
        logger.info("stopped after %.0f s; %s", time.time() - started, ledger.counts())


@main.command("bench", cls=ManyValuesCommand, many=("--models", "--slides", "--reference"))
@click.option("--models", "models", multiple=True, required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Bundle folders to compare (repeat the option, or give several after one --models).")
@click.option("--slides", "slides", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="Slides, DICOM folders, or folders searched for slides (repeat the option, or give "
                   "several after one --slides).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Labeled images, one subfolder per class, for macro F1 with its 95% CI.")
@click.option("--mpp", "images_mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="µm/px of the --images.")
@click.option("--center-crop", type=click.IntRange(min=1), default=None,
              help="Centre-crop labeled images to this many pixels (at their own resolution) first.")
@click.option("--reference", "references", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Full-resolution model bundle(s) for the conventional reference (224 px patches at 20x); give "
                   "several to compare against each, e.g. an FP32 ONNX and the INT8 OpenVINO bundle a lab would "
                   "deploy at 20x.")
@click.option("--reference-mpp", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True)
@click.option("--reference-repeats", type=click.IntRange(min=1), default=None,
              help="Measured runs of the reference per slide, no warm-up (default: --repeats after --warmup); "
                   "one run of a full-size slide takes minutes.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnxruntime", "openvino", "tensorrt"]),
              help="Only these runtimes (default: every runtime that can run each bundle here).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--max-piece-px", type=click.IntRange(min=16), default=2048, show_default=True)
@click.option("--level-tolerance", type=click.FloatRange(0, 5), default=0.0, show_default=True, metavar="PCT",
              help=LEVEL_TOLERANCE_HELP)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder: results.json, report.md, report.html and plots/.")
@click.pass_context
@handle_errors
def bench_command(ctx: click.Context, models: tuple[Path, ...], slides: tuple[Path, ...], images: Path | None,
                  images_mpp: float | None, center_crop: int | None, references: tuple[Path, ...], reference_mpp: float,
                  reference_repeats: int | None,
                  backends: tuple[str, ...], repeats: int, warmup: int, threads: int | None, max_piece_px: int,
                  level_tolerance: float, out: Path) -> None:
    """What each student costs and how well it classifies on this machine, next to the
    conventional 20x reference, as results.json, report.md and report.html in --out."""
    from lowmag.edge.bench import BenchOptions, run_bench
    from lowmag.edge.bench_report import write_report
    from lowmag.edge.pipeline import PipelineConfig

    _log_to_stderr(ctx.find_root().params.get("verbose", 0))
    if images is not None and images_mpp is None:
        raise click.UsageError("--images needs --mpp (the µm/px of the labeled images).")
    options = BenchOptions(repeats=repeats, warmup=warmup, threads=threads, backends=backends, images=images,
                           images_mpp=images_mpp, center_crop=center_crop, references=references,
                           reference_mpp=reference_mpp, reference_repeats=reference_repeats,
                           config=PipelineConfig(max_piece_px=max_piece_px, level_tolerance=level_tolerance / 100.0))
    with contextlib.ExitStack() as bars:
        def progress(total: int) -> Callable[[], None]:
            bar = bars.enter_context(click.progressbar(length=total, label="benchmarking (slide x runtime)",
                                                       file=click.get_text_stream("stderr")))
            return lambda: bar.update(1)

        results = run_bench(models, slides, options, progress)
    results["command"] = "edge-classify " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    for path in write_report(results, out):
        click.echo(f"wrote {path}")


@main.command("bench-slides")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tissue", "tissue", required=True, type=click.Path(exists=True, path_type=Path),
              help="A real slide (with its µm/px) whose tissue is laid out on the generated slides.")
@click.option("--tiles", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Labeled tiles with a tiles.csv naming each tile's source crop, row and column (Kather "
                   "2016): their source crops become more pieces.")
@click.option("--tiles-mpp", type=click.FloatRange(min=0, min_open=True), default=0.495, show_default=True)
@handle_errors
def bench_slides_command(out: Path, tissue: Path, tiles: Path | None, tiles_mpp: float) -> None:
    """Write full-size slides (20 x 15 mm and 30 x 22.5 mm, tiled JPEG pyramids) of real tissue
    into OUT, for `edge-classify bench --slides OUT` (about 3 minutes on 2 cores, 1.5 GB; kept
    when already there)."""
    from lowmag.fullsize import bench_slides

    def progress(path: Path, width: int, height: int, pieces: int) -> None:
        click.echo(f"writing {path} ({width:,} x {height:,} px, {pieces} pieces of tissue)...", err=True)

    for path in bench_slides(out, tissue, tiles, tiles_mpp, progress):
        click.echo(f"{path} ({path.stat().st_size / 1e6:.0f} MB)")


@main.command("status")
@click.option("--out", "out", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The output folder of edge-classify run or watch.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--failures", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many failed and queued slides to list.")
@handle_errors
def status_command(out: Path, as_json: bool, failures: int) -> None:
    """Summarise the ledger: done, failed with reasons, queued, throughput; whether a watcher runs."""
    import json

    from lowmag.edge.status import format_summary, summarise

    summary = summarise(out, failures)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


if __name__ == "__main__":  # pragma: no cover
    main()
