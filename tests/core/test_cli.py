"""The `lowmag` command as a user runs it."""

import json

import pyvips
import pytest
from click.testing import CliRunner

from lowmag.cli import main


@pytest.fixture
def runner():
    return CliRunner()


def test_info_text_and_json(runner, synthetic_slide):
    result = runner.invoke(main, ["info", str(synthetic_slide)])
    assert result.exit_code == 0, result.output
    assert "generic-tiff" in result.output and "2048 x 1536" in result.output and "0.5" in result.output
    result = runner.invoke(main, ["info", "--json", str(synthetic_slide)])
    data = json.loads(result.output)
    assert data["mpp"] == pytest.approx(0.5) and len(data["levels"]) == 4 and data["unusable_levels"] == []


def test_read_writes_a_png_of_the_expected_size(runner, synthetic_slide, tmp_path):
    out = tmp_path / "low.png"
    result = runner.invoke(main, ["read", str(synthetic_slide), "--mag", "1.25x", "--out", str(out)])
    assert result.exit_code == 0, result.output
    image = pyvips.Image.new_from_file(str(out))
    assert (image.width, image.height) == (128, 96)


def test_read_region_and_bad_region(runner, synthetic_slide, tmp_path):
    out = tmp_path / "r.png"
    ok = runner.invoke(main, ["read", str(synthetic_slide), "--mag", "5x", "--region", "0,0,400,200", "--out", str(out)])
    assert ok.exit_code == 0 and pyvips.Image.new_from_file(str(out)).width == 100
    bad = runner.invoke(main, ["read", str(synthetic_slide), "--mag", "5x", "--region", "0,0", "--out", str(out)])
    assert bad.exit_code == 2 and "X,Y,W,H" in bad.output


def test_bad_magnification_is_a_usage_error(runner, synthetic_slide, tmp_path):
    result = runner.invoke(main, ["read", str(synthetic_slide), "--mag", "fast", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "1.25x" in result.output


def test_tissue_thumbnail_and_json(runner, synthetic_slide, tmp_path):
    thumb, boxes = tmp_path / "thumb.png", tmp_path / "boxes.json"
    result = runner.invoke(main, ["tissue", str(synthetic_slide), "--thumbnail", str(thumb), "--json", str(boxes)])
    assert result.exit_code == 0, result.output
    assert result.output.count(": piece ") == 2
    data = json.loads(boxes.read_text())
    assert len(data["tissue"]) == 2 and {"x", "y", "width_um", "tissue_area_um2"} <= set(data["tissue"][0])
    drawn = pyvips.Image.new_from_file(str(thumb)).numpy()
    box = data["tissue"][0]
    scale = drawn.shape[1] / 2048
    x, y = int(round(box["x"] * scale)), int(round(box["y"] * scale))
    assert tuple(drawn[y + 20, x][:3]) == (0, 160, 60)  # the box outline is drawn


def test_refused_file_exits_1_with_file_and_fix(runner, tmp_path):
    from lowmag.synthetic import make_synthetic_slide

    path = make_synthetic_slide(tmp_path / "scanner-72dpi.tif", 256, 256, mpp=None)
    result = runner.invoke(main, ["info", str(path)])
    assert result.exit_code == 1
    assert "scanner-72dpi.tif" in result.output and "--assume-mpp" in result.output
    assert "Traceback" not in result.output
    ok = runner.invoke(main, ["info", str(path), "--assume-mpp", "0.5"])
    assert ok.exit_code == 0 and "assumed" in ok.output


def test_compare_paths_reports_a_table(runner, synthetic_slide):
    result = runner.invoke(main, ["compare-paths", str(synthetic_slide), "--mags", "1.25x,5x", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output[result.output.index("["):])
    assert [r["target"] for r in rows] == ["1.25x", "5x"]
    assert all(0 <= r["mean_abs_diff"] < 6 for r in rows)
    assert [r["level"] for r in rows] == [3, 2]  # 8 and 2 µm/px levels


def test_several_values_after_one_flag_read_as_the_flag_repeated():
    import click
    from click.testing import CliRunner

    from lowmag.cli_support import ManyValuesCommand

    @click.command(cls=ManyValuesCommand, many=("--models", "--slides"))
    @click.option("--models", multiple=True)
    @click.option("--slides", multiple=True)
    @click.option("--out")
    def command(models, slides, out):
        click.echo(f"{list(models)} {list(slides)} {out}")

    def run(*args):
        result = CliRunner().invoke(command, list(args))
        assert result.exit_code == 0, result.output
        return result.output.strip()

    assert run("--models", "a", "b", "--slides", "x", "y", "--out", "o") == "['a', 'b'] ['x', 'y'] o"
    assert run("--models", "a", "--models", "b") == "['a', 'b'] [] None"
    assert run("--models=a", "b", "--out", "o", "--models", "c") == "['a', 'b', 'c'] [] o"
    # a value after an ordinary option is still an unexpected argument
    refused = CliRunner().invoke(command, ["--out", "o", "stray"])
    assert refused.exit_code == 2 and "stray" in refused.output
