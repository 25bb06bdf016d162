"""``export-student``: Turn a trained student into a deployable ONNX / OpenVINO / TensorRT bundle."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lowmag.cli_support import configure_logging, handle_errors, stage_group

main = stage_group(
    "Turn a trained student into a deployable ONNX / OpenVINO / TensorRT bundle.\n\n"
    "\b\n  export-student CHECKPOINT --target onnx|openvino|tensorrt --precision fp32|fp16|int8 --out BUNDLE\n\n"
    "Every export runs the exported model next to the PyTorch model on real images and is "
    "refused (nothing written) when they disagree; the results go into the bundle's lowmag.json. "
    "`verify` checks a bundle, `bench` measures speed on this machine.",
    default="export",
)

_PATH = click.Path(path_type=Path)
_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@main.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--target", type=click.Choice(["onnx", "openvino", "tensorrt"]), default="onnx", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--out", required=True, type=_PATH, help="Bundle folder to write (must not exist unless --force).")
@click.option("--calibration", multiple=True, type=click.Path(exists=True, path_type=Path), metavar="PATH",
              help="Unlabeled slides, slide folders or image folders (repeatable): INT8 calibration and "
                   "held-out parity images, read at the model's magnification, tissue only.")
@click.option("--calibration-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="µm/px of plain images in --calibration (slides carry their own).")
@click.option("--calibration-size", type=click.IntRange(min=1), default=500, show_default=True,
              help="Calibration images to sample (a warning below 300).")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="How ONNX Runtime sets INT8 ranges (ONNX and TensorRT targets).")
@click.option("--nncf-preset", type=click.Choice(["performance", "mixed"]), default="performance", show_default=True,
              help="How NNCF quantizes activations (OpenVINO INT8): performance = symmetric; mixed = "
                   "asymmetric, for a student that loses too much macro F1 with the first.")
@click.option("--int8-activations", type=click.Choice(["auto", "uint8", "int8"]), default="auto", show_default=True,
              help="Q/DQ activation type for ONNX targets. auto: uint8 (asymmetric) for ONNX Runtime, 2.5x "
                   "faster on x86 CPUs; int8 (symmetric) for TensorRT, the form all three runtimes consume.")
@click.option("--calibration-cache", type=_PATH, default=None,
              help="Where sampled calibration sets are cached (default ~/.cache/lowmag/calibration).")
@click.option("--patch-px", type=click.IntRange(min=16), default=224, show_default=True,
              help="Side of the windows cut from slides for calibration and parity, in model pixels.")
@click.option("--parity-images", type=click.IntRange(min=0), default=64, show_default=True,
              help="Held-out calibration-source images the FP32 parity check runs on.")
@click.option("--eval-images", type=_DIR, default=None,
              help="Labeled image folder (one subfolder per class) for the accuracy gate.")
@click.option("--val-images", type=_DIR, default=None,
              help="Labeled validation folder to fit the temperature on (confidence calibration).")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="µm/px of the images in --eval-images and --val-images.")
@click.option("--center-crop", type=click.IntRange(min=1), default=None, metavar="PX",
              help="Centred square of PX source pixels taken from each labeled image (the training crop).")
@click.option("--max-f1-drop", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Largest macro-F1 drop (points) against PyTorch an FP16/INT8 export may have.")
@click.option("--allow-accuracy-drop", is_flag=True, help="Write the bundle even when the drop is larger (recorded).")
@click.option("--fp32-tolerance", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Largest absolute logit difference allowed for FP32 exports.")
@click.option("--features", is_flag=True, help="Also output the final feature map ('features').")
@click.option("--profile", default=None, metavar="MIN:OPT:MAX",
              help="TensorRT input shapes NxHxWx3:NxHxWx3:NxHxWx3 (default from the magnification).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Runtime threads for the gate.")
@click.option("--force", is_flag=True, help="Replace an existing --out bundle (only once the new one passed).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sampling.")
@click.option("--refresh-fingerprint", is_flag=True,
              help="Make the bundle's fingerprint of its training data from the --calibration images (threshold "
                   "on the held-out parity images) instead of keeping the checkpoint's: for checkpoints without "
                   "one, or to describe the slides a lab really scans.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@handle_errors
def export_command(checkpoint: Path, out: Path, profile: str | None, verbose: int, **options) -> None:
    """Export CHECKPOINT (a distill-train checkpoint folder) into a bundle folder."""
    from lowmag.export.pipeline import ExportOptions, export_student

    configure_logging(verbose)
    shapes = None
    if profile:
        from lowmag.tensorrt import parse_profile

        shapes = parse_profile(profile)
    options["calibration"] = tuple(options["calibration"])
    spec = export_student(checkpoint, out, ExportOptions(profile=shapes, progress=True, **options))
    click.echo(summarise(spec, out))


def summarise(spec, out: Path, verb: str = "wrote") -> str:
    """A few lines a person reads after an export: files, gate, temperature."""
    export = spec.export
    gate = export["gate"]
    parity = gate["parity"]
    lines = [
        f"{verb} {out}: {export['target']} {spec.precision}, {spec.magnification} ({spec.target_mpp:g} µm/px), "
        f"files {', '.join(sorted(set(export['files'].values())))}",
        f"gate passed: {parity['images']} real images, max |Δlogit| {parity['max_abs_logit_diff']:.3g}, "
        f"top-1 agreement {100 * parity['top1_agreement']:.1f}%",
    ]
    accuracy = gate.get("accuracy")
    if accuracy:
        lines.append(
            f"macro F1 on {accuracy['images']} labeled images: PyTorch {accuracy['macro_f1_pytorch']:.1f}%, "
            f"exported {accuracy['macro_f1_exported']:.1f}% ({accuracy['macro_f1_change']:+.2f} points)"
        )
    temperature = export["temperature"]
    if temperature.get("fitted"):
        lines.append(
            f"temperature {temperature['temperature']:.3g}: ECE {temperature['ece_before']:.3f} → "
            f"{temperature['ece_after']:.3f} on {temperature['images']} validation images"
            + ("" if temperature.get("applied", True) else f" (not applied: {temperature['why']}; spec keeps 1.0)")
        )
    from lowmag.fingerprint import Fingerprint

    fingerprint = spec.fingerprint
    problems = Fingerprint(fingerprint).check(float(spec.target_mpp)) if fingerprint else []
    if problems:
        # A checkpoint made by an older lowmag carries an older fingerprint: the bundle is
        # fine, but edge-classify will not use it (it warns once per bundle).
        lines.append(f"fingerprint of the training data NOT usable ({'; '.join(problems)}): edge-classify will only "
                     "check slides are brightfield; re-export with --refresh-fingerprint and --calibration to fix it")
    elif fingerprint:
        lines.append(f"fingerprint of the training data: {fingerprint['images']} images ({fingerprint['source']}), "
                     f"threshold {fingerprint['threshold']:g} ({fingerprint['held_out_windows']} held-out windows of "
                     f"{fingerprint['window_px']} px)")
    else:
        lines.append("no fingerprint of the training data: edge-classify will only check slides are brightfield "
                     "(pass --refresh-fingerprint with --calibration to add one)")
    if gate.get("warning"):
        lines.append(f"WARNING: {gate['warning']} (allowed by --allow-accuracy-drop)")
    return "\n".join(lines)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole lowmag.json.")
@handle_errors
def verify(bundle: Path, as_json: bool) -> None:
    """Check a bundle's files against its lowmag.json and print what it is."""
    from lowmag.bundle import load_bundle

    loaded = load_bundle(bundle)
    if as_json:
        click.echo(json.dumps(loaded.spec.to_dict(), indent=2))
        return
    click.echo(summarise(loaded.spec, loaded.directory, verb="bundle"))
    click.echo(f"all {len(loaded.spec.artifacts)} files match their sha256")


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--piece-mm", default="1,3", show_default=True,
              help="Side lengths (mm) of the square tissue pieces to time, comma-separated.")
@click.option("--tile-um", type=click.FloatRange(min=1), default=71.3, show_default=True,
              help="Side (µm) of the tiles in the tile-batch case (Kather's 144 px at 0.495 µm/px).")
@click.option("--tile-batch", type=click.IntRange(min=0), default=64, show_default=True,
              help="Tiles per batch in the tile case (0: no tile case).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads per runtime (default: all cores).")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--no-eager", is_flag=True, help="Skip PyTorch eager (needs the source checkpoints).")
@click.option("--out", type=_PATH, default=None, help="Write results.json and results.md into this folder.")
@handle_errors
def bench(bundles: tuple[Path, ...], piece_mm: str, tile_um: float, tile_batch: int, threads: int | None,
          warmup: int, repeats: int, no_eager: bool, out: Path | None) -> None:
    """Time BUNDLES on this machine next to PyTorch eager on their source checkpoints."""
    import os

    from lowmag.export.bench import bench_bundles, markdown
    from lowmag.io import atomic_write_text

    try:
        pieces = [float(v) for v in piece_mm.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{piece_mm!r} is not a comma-separated list of millimetres", param_hint="--piece-mm")
    result = bench_bundles(
        bundles, piece_mm=pieces, tile_um=tile_um, tile_batch=tile_batch, threads=threads or os.cpu_count() or 1,
        warmup=warmup, repeats=repeats, eager=not no_eager, progress=lambda text: click.echo(text, err=True),
    )
    table = markdown(result)
    click.echo(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(out / "results.md", table)
        click.echo(f"wrote {out}/results.json and results.md", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
