"""``lowmag``: look at slides the way lowmag will read them.

``lowmag info`` reports what a slide says about itself, ``lowmag read`` writes it at a
magnification as PNG, ``lowmag tissue`` finds its tissue pieces, and
``lowmag compare-paths`` measures how much reading from the pyramid differs from
resampling the full-resolution level.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lowmag.cli_support import ResolutionType, assume_mpp_option, handle_errors, stage_group


main = stage_group("Inspect, read and locate tissue on whole-slide images as lowmag does.")


@main.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@assume_mpp_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@handle_errors
def info(slides: tuple[Path, ...], assume_mpp: float | None, as_json: bool) -> None:
    """Format, size, pyramid levels, µm/px and associated images of each slide."""
    from lowmag.reader import verify_pyramid
    from lowmag.resolution import format_magnification
    from lowmag.slide import open_slide

    reports = []
    for path in slides:
        with open_slide(path, assume_mpp=assume_mpp) as slide:
            unusable = sorted(verify_pyramid(slide))
            data = slide.info.to_dict()
            data["unusable_levels"] = unusable
            reports.append(data)
            if as_json:
                continue
            i = slide.info
            click.echo(f"{i.path}")
            click.echo(f"  format            {i.format}")
            click.echo(f"  size              {i.width} x {i.height} px")
            click.echo(
                f"  µm/px             {i.mpp_x:.4g} x {i.mpp_y:.4g} ({i.mpp_source}); "
                f"{format_magnification(i.mpp)} in lowmag's notation (10x = 1 µm/px)"
            )
            power = f"{i.objective_power:g}x" if i.objective_power else "not recorded"
            click.echo(f"  objective power   {power}")
            click.echo(f"  associated images {', '.join(i.associated_images) or 'none'}")
            click.echo("  levels            index  size            downsample  µm/px    magnification")
            for level in i.levels:
                note = "  (unusable: lowmag reads finer levels)" if level.index in unusable else ""
                click.echo(
                    f"                    {level.index:<6} {f'{level.width} x {level.height}':<15} "
                    f"{level.downsample:<11.4g} {level.mpp_x:<8.4g} "
                    f"{format_magnification(level.mpp_x)}{note}"
                )
    if as_json:
        click.echo(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))


@main.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path(exists=True, path_type=Path))
@click.option("--mag", "target", type=ResolutionType(), required=True,
              help="Target resolution: '1.25x' (10x = 1 µm/px), '8um', or 'scan/4'.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG to write.")
@click.option("--exact", is_flag=True, help="Resample from level 0 instead of the nearest finer pyramid level.")
@click.option("--region", metavar="X,Y,W,H", default=None, help="Level-0 rectangle to read (default: whole slide).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=200_000_000, show_default=True,
              help="Refuse outputs larger than this many pixels.")
@assume_mpp_option
@handle_errors
def read(slide_path: Path, target, out: Path, exact: bool, region: str | None,
         max_pixels: int, assume_mpp: float | None) -> None:
    """Write SLIDE (or a region) at a target magnification as a PNG."""
    from lowmag.draw import save_png
    from lowmag.reader import read_at_mpp, resolve_target_mpp
    from lowmag.slide import open_slide

    box = _parse_region(region) if region else None
    with open_slide(slide_path, assume_mpp=assume_mpp) as slide:
        mpp = resolve_target_mpp(slide, target)
        pixels = read_at_mpp(slide, mpp, box, exact=exact, max_output_pixels=max_pixels)
    save_png(pixels, out)
    click.echo(f"{out}: {pixels.shape[1]} x {pixels.shape[0]} px at {mpp:.4g} µm/px ({target})")


@main.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path(exists=True, path_type=Path))
@click.option("--thumbnail", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG thumbnail with the boxes drawn on it.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the boxes as JSON to this file ('-' for stdout).")
@click.option("--min-area-um2", type=click.FloatRange(min=0), default=None,
              help="Smallest tissue piece kept, in µm² (default 10000).")
@assume_mpp_option
@handle_errors
def tissue(slide_path: Path, thumbnail: Path | None, json_path: Path | None,
           min_area_um2: float | None, assume_mpp: float | None) -> None:
    """Locate the tissue pieces of SLIDE; boxes in level-0 pixels and µm."""
    import dataclasses

    from lowmag.io import atomic_write_text
    from lowmag.slide import open_slide
    from lowmag.tissue import TissueParams, find_tissue

    params = TissueParams()
    if min_area_um2 is not None:
        params = dataclasses.replace(params, min_area_um2=min_area_um2)
    with open_slide(slide_path, assume_mpp=assume_mpp) as slide:
        boxes, _, modality = find_tissue(slide, params)
        if thumbnail is not None:
            _write_thumbnail(slide, boxes, thumbnail)
    report = {"slide": str(slide_path), "modality": modality.kind, "modality_reason": modality.reason or None,
              "tissue": [b.to_dict() for b in boxes]}
    if json_path is not None and str(json_path) == "-":
        click.echo(json.dumps(report, indent=2))
        return
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    if not modality.brightfield:
        click.echo(f"{slide_path}: {modality.reason}")
    if not boxes:
        click.echo(f"{slide_path}: no tissue found")
    for n, b in enumerate(boxes, 1):
        click.echo(
            f"{slide_path}: piece {n}: x={b.x} y={b.y} {b.width}x{b.height} px "
            f"({b.width_um / 1000:.2f} x {b.height_um / 1000:.2f} mm, tissue {b.tissue_area_um2 / 1e6:.3f} mm²)"
        )
    if thumbnail is not None:
        click.echo(f"thumbnail: {thumbnail}")


@main.command("compare-paths")
@click.argument("slides", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--mags", default="0.625x,1.25x,2.5x,5x", show_default=True,
              help="Comma-separated target magnifications.")
@assume_mpp_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a Markdown table.")
@handle_errors
def compare_paths(slides: tuple[Path, ...], mags: str, assume_mpp: float | None, as_json: bool) -> None:
    """Measure pyramid reading against the exact level-0 protocol on each slide."""
    from lowmag.compare import compare_read_paths
    from lowmag.resolution import Resolution
    from lowmag.slide import open_slide

    targets = [Resolution.parse(m) for m in mags.split(",") if m.strip()]
    rows = []
    with click.progressbar(slides, label="comparing", file=sys.stderr) as bar:
        for path in bar:
            with open_slide(path, assume_mpp=assume_mpp) as slide:
                rows += [r.to_dict() for r in compare_read_paths(slide, targets)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo("| slide | target | size | level used | mean abs diff | p99 abs diff | PSNR dB | pyramid s | level-0 s |")
    click.echo("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(
            f"| {Path(r['slide']).name} | {r['target']} | {r['width']}x{r['height']} | {r['level']} "
            f"| {r['mean_abs_diff']:.2f} | {r['p99_abs_diff']:.0f} | {r['psnr_db']:.1f} "
            f"| {r['pyramid_seconds']:.3f} | {r['exact_seconds']:.3f} |"
        )


def _parse_region(text: str):
    from lowmag.reader import Region

    try:
        x, y, w, h = (int(v) for v in text.split(","))
        return Region(x, y, w, h)
    except ValueError:
        raise click.BadParameter(f"{text!r}: give X,Y,W,H as four integers in level-0 pixels", param_hint="--region")


def _write_thumbnail(slide, boxes, path: Path) -> None:
    from lowmag.draw import draw_boxes, save_png
    from lowmag.reader import mpp_for_longest_side, read_at_mpp

    info = slide.info
    pixels = read_at_mpp(slide, mpp_for_longest_side(slide, 1024))
    scale = (pixels.shape[1] / info.width, pixels.shape[0] / info.height)
    save_png(draw_boxes(pixels, boxes, scale), path)


if __name__ == "__main__":  # pragma: no cover
    main()
