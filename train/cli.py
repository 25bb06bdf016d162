"""``distill-train``: Teacher-to-student resolution distillation (DiPalma et al.) on a GPU server or CPU."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import click

from lowmag.cli_support import configure_logging, handle_errors, stage_group

main = stage_group(
    "Teacher-to-student resolution distillation (DiPalma et al.) on a GPU server or CPU.\n\n"
    "Every phase reads the same experiment CONFIG.toml and writes into one run folder "
    "(--out); `run` does all phases in order and resumes where an interrupted run stopped. "
    "Launch any command with `torchrun --nproc_per_node=N -m lowmag.train.cli ...` for data "
    "parallelism over N GPUs.",
)


def _experiment_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every phase shares: the config, the run folder, device and logging."""

    @click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Run folder (default: runs/<experiment name>). Reused on rerun.")
    @click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: the config's, else auto).")
    @click.option("--epochs", type=click.IntRange(min=1), default=None,
                  help="Override the epochs of every phase (quick trials).")
    @click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
    @functools.wraps(func)
    def wrapper(config: Path, out: Path | None, device: str | None, epochs: int | None, verbose: int, **kwargs: Any) -> Any:
        configure_logging(max(verbose, 1))
        exp = _open_experiment(config, out, device, epochs)
        return func(exp, **kwargs)

    return handle_errors(wrapper)


def _open_experiment(config_path: Path, out: Path | None, device: str | None, epochs: int | None):
    from lowmag.train.config import load_config
    from lowmag.train.engine import make_runtime
    from lowmag.train.experiment import Experiment

    overrides: dict[str, Any] = {}
    if device:
        overrides["runtime"] = {"device": device}
    if epochs:
        for phase in ("teacher", "student", "finetune"):
            overrides[phase] = {"epochs": epochs}
    config = load_config(config_path, overrides)
    runtime = make_runtime(config.runtime)
    return Experiment(config, out or Path("runs") / config.name, runtime)


def _seed_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--seed K``: the step with another training seed, in RUN/seed-K/ (what ``extra_seeds``
    does for the headline steps), e.g. to repeat a step the run trained with one seed only."""
    @click.option("--seed", type=click.IntRange(min=0), default=None,
                  help="Train with this training seed instead of the config's, into RUN/seed-<SEED>/ on the same "
                       "split and from that seed's teacher; the report gathers it with the other seeds.")
    @functools.wraps(func)
    def wrapper(exp: Any, seed: int | None, **kwargs: Any) -> Any:
        return func(exp if seed is None or seed == exp.config.seed else exp.for_seed(seed), **kwargs)

    return wrapper


def _resolution_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--resolution", required=True,
                        help="Student resolution as in the config, e.g. scan/4 or 5x.")(func)


@main.command()
@_experiment_command
@_seed_option
def teacher(exp) -> None:
    """Train the high-resolution teacher (Adam, cross-entropy) on the labeled split."""
    from lowmag.train.experiment import Step

    _train_and_evaluate(exp, Step("teacher", exp.config.teacher_resolution))


@main.command()
@_resolution_option
@_experiment_command
@_seed_option
def baseline(exp, resolution: str) -> None:
    """Train a student from scratch at RESOLUTION on the labeled split (the comparison)."""
    from lowmag.train.experiment import Step

    _train_and_evaluate(exp, Step("baseline", resolution))


@main.command()
@_resolution_option
@click.option("--regime", type=click.Choice(["labeled", "labeled+unlabeled"]), default="labeled", show_default=True)
@click.option("--pixel", type=click.Choice(["both", "maxpool", "bicubic", "none"]), default=None,
              help="Pixel-loss resizing (default: the config's).")
@click.option("--attention-weight", type=click.FloatRange(min=0), default=None,
              help="Weight of the Grad-CAM attention term (default: the config's).")
@_experiment_command
@_seed_option
def distill(exp, resolution: str, regime: str, pixel: str | None, attention_weight: float | None) -> None:
    """Distil the teacher into a student at RESOLUTION (soft + pixel [+ attention] loss)."""
    from lowmag.train.experiment import Step

    d = exp.config.distill
    step = Step("distill", resolution, regime, pixel or d.pixel,
                d.attention_weight if attention_weight is None else attention_weight)
    _train_and_evaluate(exp, step)


@main.command()
@_resolution_option
@click.option("--regime", type=click.Choice(["labeled", "labeled+unlabeled"]), default="labeled", show_default=True)
@_experiment_command
@_seed_option
def finetune(exp, resolution: str, regime: str) -> None:
    """Fine-tune only the FC layer of a distilled student on labeled low-resolution images."""
    from lowmag.train.experiment import Step

    d = exp.config.distill
    _train_and_evaluate(exp, Step("finetune", resolution, regime, d.pixel, d.attention_weight))


@main.command()
@_experiment_command
def run(exp) -> None:
    """Carry out the whole experiment: every step, its evaluation, and the report.

    Finished steps (a complete checkpoint) are skipped and an interrupted step continues
    from its last finished epoch, so rerunning the same command resumes.
    """
    from lowmag.train.experiment import headline_steps, plan_steps

    started = time.time()
    steps = plan_steps(exp.config)
    extra = headline_steps(exp.config) if exp.config.extra_seed_steps == "headline" else steps
    plan = [(exp, step) for step in steps] + [(exp.for_seed(seed), step) for seed in exp.config.extra_seeds
                                             for step in extra]
    click.echo(f"{len(plan)} steps: {', '.join(s.name for s in steps)}"
               + (f"; then {', '.join(s.name for s in extra)} for seeds {list(exp.config.extra_seeds)}"
                  if exp.config.extra_seeds else ""), err=True)
    for i, (seeded, step) in enumerate(plan, 1):
        click.echo(f"[{i}/{len(plan)}] {step.name} (seed {seeded.training_seed})", err=True)
        _train_and_evaluate(seeded, step, quiet=True)
        if exp.runtime.is_main:  # counted step by step: an invocation stopped later keeps its time
            now = time.time()
            _add_wall_time(exp, now - started)
            started = now
    if exp.runtime.is_main:
        _write_report(exp, plan, started)


def _add_wall_time(exp, seconds: float) -> float:
    """Add ``seconds`` to RUN/wall_time.json (the run's time over all its invocations, the
    report's "Wall time"); returns the new total."""
    from lowmag.io import atomic_write_text

    path = exp.run_dir / "wall_time.json"
    total = (json.loads(path.read_text())["seconds"] if path.is_file() else 0.0) + seconds
    atomic_write_text(path, json.dumps({"seconds": total}))
    return total


def _train_and_evaluate(exp, step, quiet: bool = False) -> None:
    from lowmag.metrics import format_metrics_table
    from lowmag.train.phases import evaluate_step, run_step

    folder = run_step(exp, step)
    exp.cache(exp.config.evaluation.split, step.resolution)  # collective: every rank joins the build
    if exp.runtime.is_main:
        row = evaluate_step(exp, step)
        if not quiet:
            click.echo(format_metrics_table(row["metrics"]))
        m = row["metrics"]
        click.echo(
            f"{step.name}: macro F1 {100 * m['macro_f1']['value']:.1f}, accuracy "
            f"{100 * m['accuracy']['value']:.1f} on {m['n']} {exp.config.evaluation.split} images; "
            f"checkpoint {folder}",
            err=True,
        )
    exp.runtime.barrier()


def _write_report(exp, plan, started: float) -> None:
    import platform
    import sys

    from lowmag.provenance import git_sha
    from lowmag.train.phases import evaluate_step
    from lowmag.train.report import write_report

    rows = [evaluate_step(seeded, step) for seeded, step in plan]
    total = _add_wall_time(exp, time.time() - started)
    meta = {
        "title": f"{exp.config.name}: resolution-based distillation",
        "command": " ".join(["distill-train", *sys.argv[1:]]),
        "machine": ", ".join(f"{k}: {v}" for k, v in exp.runtime.describe().items()) + f" ({platform.system()})",
        "wall_time_s": round(total, 1),
        "git_sha": git_sha(),
        "config": exp.config.to_dict(),
    }
    paths = write_report(rows, exp.run_dir / "report", meta)
    click.echo(f"report: {paths['markdown']}", err=True)


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, path_type=Path),
              help="A checkpoint folder (or its lowmag.json).")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image folder with one subfolder per class, named as the checkpoint's classes.")
@click.option("--mpp", required=True, type=click.FloatRange(min=0, min_open=True),
              help="µm/px of the images in --images.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the metrics with their CIs as JSON here.")
@click.option("--center-crop", type=click.IntRange(min=1), default=None, metavar="PX",
              help="Take a centred square of PX source pixels first (the training crop, e.g. 144).")
@click.option("--bootstrap", type=click.IntRange(min=0), default=10_000, show_default=True,
              help="Bootstrap resamples for the 95% CIs (0: none).")
@click.option("--device", default="auto", show_default=True)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@handle_errors
def evaluate(checkpoint: Path, images: Path, mpp: float, out: Path | None, center_crop: int | None,
             bootstrap: int, device: str, verbose: int) -> None:
    """Evaluate a checkpoint on any labeled image folder, at the checkpoint's magnification.

    Images are downsampled from --mpp to the checkpoint's µm/px with the core reader, as in
    training. Prints the metrics table; --out writes them as JSON.
    """
    import tempfile

    from lowmag.io import atomic_write_text
    from lowmag.labeled import scan_image_folder
    from lowmag.metrics import format_metrics_table
    from lowmag.train.cache import build_cache_with_progress
    from lowmag.train.checkpoint import load_checkpoint
    from lowmag.train.config import RuntimeConfig
    from lowmag.train.engine import make_runtime
    from lowmag.train.phases import evaluate_model

    configure_logging(verbose)
    model, spec = load_checkpoint(checkpoint)
    _, items = scan_image_folder(images, scan_mpp=mpp, classes=spec.classes, crop_px=center_crop)
    runtime = make_runtime(RuntimeConfig(device=device))
    with tempfile.TemporaryDirectory(prefix="lowmag-eval-") as tmp:
        cache = build_cache_with_progress(items, spec.target_mpp, Path(tmp), f"reading at {spec.target_mpp:g} µm/px")
        metrics = evaluate_model(model, cache, [i.label for i in items], spec, runtime, bootstrap)
        del cache
    click.echo(f"{checkpoint}: {len(items)} images from {images} read at {spec.target_mpp:g} µm/px "
               f"({spec.magnification}), input {metrics['input_px']} px, {metrics['gflops']:.4g} GFLOPs")
    click.echo(format_metrics_table(metrics))
    if out:
        result = {"checkpoint": str(checkpoint), "images": str(images), "source_mpp": mpp,
                  "target_mpp": spec.target_mpp, "magnification": spec.magnification,
                  "center_crop": center_crop, "metrics": metrics}
        atomic_write_text(out, json.dumps(result, indent=1))
        click.echo(f"wrote {out}", err=True)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@handle_errors
def report(run_dir: Path) -> None:
    """Rebuild the report (JSON, Markdown, PNG) from the evaluated steps of RUN_DIR, the
    runs of its extra seeds (RUN_DIR/seed-*/) included."""
    from lowmag.train.report import gather_rows, write_report

    rows = gather_rows(run_dir)
    if not rows:
        raise click.ClickException(f"{run_dir}: no evaluated steps (steps/*/metrics.json); run `distill-train run` first")
    timing = run_dir / "wall_time.json"
    previous = run_dir / "report" / "results.json"
    meta = {"title": f"{run_dir.name}: resolution-based distillation"}
    if previous.is_file():  # keep the command, machine and git SHA of the run that made it
        meta.update(json.loads(previous.read_text()).get("meta", {}))
    if timing.is_file():
        meta["wall_time_s"] = json.loads(timing.read_text())["seconds"]
    paths = write_report(rows, run_dir / "report", meta)
    click.echo(paths["markdown"])


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to fill with one subfolder per split.")
@handle_errors
def splits(run_dir: Path, out: Path) -> None:
    """Link each split's image files into OUT/<split>/<class>/ (unlabeled: OUT/unlabeled/).

    The held-out test and validation images of a run then serve as --eval-images and
    --val-images of export-student, and the unlabeled ones as its --calibration set.
    Only for runs on image folders; files are linked, never copied or changed.
    """
    import os

    listing = run_dir / "splits.json"
    if not listing.is_file():
        raise click.ClickException(f"{listing} not found; RUN_DIR must be a distill-train run folder")
    items = json.loads(listing.read_text())["items"]
    counts = {}
    for split, keys in items.items():
        for key in keys:
            path = Path(key.split("@", 1)[0]).resolve()
            if not path.is_file():
                raise click.ClickException(f"{path} (listed in {listing}) is missing; restore the training images")
            folder = out / split if split == "unlabeled" else out / split / path.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            link = folder / path.name
            if not link.exists():
                os.symlink(path, link)
            counts[split] = counts.get(split, 0) + 1
    click.echo(", ".join(f"{split} {n}" for split, n in counts.items()) + f" images linked under {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
