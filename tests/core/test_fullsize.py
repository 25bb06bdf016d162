"""Full-size bench slides are made of real tissue, at the tissue's µm/px, never upsampled."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from lowmag import fullsize
from lowmag.fullsize import pieces_from_slide, pieces_from_tiles, write_full_size_slide
from lowmag.slide import open_slide
from lowmag.tissue import find_tissue

pytestmark = pytest.mark.shared_data


def test_a_generated_slide_holds_its_pieces_of_real_tissue_at_the_source_resolution(slides_dir, tmp_path):
    pieces, mpp = pieces_from_slide(slides_dir / "aperio" / "CMU-1-Small-Region.svs")
    assert mpp == pytest.approx(0.499) and pieces and pieces[0].shape[0] > 1000
    layout = write_full_size_slide(tmp_path / "slide.tif", pieces, mpp, 9000, 6000, 6, seed=2)
    assert not list(tmp_path.glob("*.part"))
    with open_slide(tmp_path / "slide.tif") as slide:
        assert (slide.info.width, slide.info.height) == (9000, 6000)
        assert slide.info.mpp == pytest.approx(mpp, rel=1e-6)
        assert len(slide.info.levels) >= 5  # a real pyramid, halving
        boxes = find_tissue(slide).boxes
    # Every placed piece is found as tissue (a piece may split where its glass shows through).
    for x, y, w, h in layout.pieces:
        inside = [b for b in boxes if x - 50 <= b.x and b.x + b.width <= x + w + 50
                  and y - 50 <= b.y and b.y + b.height <= y + h + 50]
        assert inside, (x, y, w, h)
    # Tissue pixels are the source's own: a piece's pixels are a rotation/flip of a source crop.
    assert all(p.dtype == np.uint8 for p in pieces)


def test_tiles_rebuild_their_source_crops_and_are_never_upsampled():
    from tests.conftest import KATHER as kather_dir

    if not (kather_dir / "tiles.csv").is_file():
        pytest.skip(f"Kather 2016 tiles not found at {kather_dir}")
    crops = pieces_from_tiles(kather_dir, 0.495, 0.499, limit=2)
    assert len(crops) == 2 and all(min(c.shape[:2]) >= 150 for c in crops)
    with pytest.raises(ValueError, match="upsample"):
        pieces_from_tiles(kather_dir, 0.495, 0.25)


def test_bench_slides_command_writes_them_once(slides_dir, tmp_path, monkeypatch):
    from lowmag.edge.cli import main

    monkeypatch.setattr(fullsize, "BENCH_SLIDES", {"small-a.tif": (5000, 4000, 3), "small-b.tif": (6000, 4000, 4)})
    args = ["bench-slides", str(tmp_path / "out"), "--tissue", str(slides_dir / "aperio" / "CMU-1-Small-Region.svs")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "writing" in first.stderr and "small-b.tif (6,000 x 4,000 px, 4 pieces" in first.stderr  # progress
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tif")}
    assert set(written) == {"small-a.tif", "small-b.tif"}
    again = CliRunner().invoke(main, args)  # the same sources: kept, not made again
    assert again.exit_code == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tif")} == written


def test_bench_slides_refuse_what_they_cannot_use_naming_the_file_and_the_fix(slides_dir, tmp_path):
    from lowmag.edge.cli import main

    cmu1 = str(slides_dir / "aperio" / "CMU-1-Small-Region.svs")
    no_csv = tmp_path / "tiles"
    no_csv.mkdir()
    bad_csv = tmp_path / "bad"
    bad_csv.mkdir()
    (bad_csv / "tiles.csv").write_text("path,label\na.png,x\n")
    cases = [
        (["--tissue", cmu1, "--tiles", str(no_csv)], "tiles.csv: not found"),
        (["--tissue", cmu1, "--tiles", str(bad_csv)], "lacks the column(s) source_image, row, col"),
        (["--tissue", str(slides_dir / "tiny" / "small.svs")], "holds no tissue"),
    ]
    for extra, words in cases:
        result = CliRunner().invoke(main, ["bench-slides", str(tmp_path / "out"), *extra])
        assert result.exit_code == 1, result.output
        assert words in result.output and "Fix:" in result.output, result.output
    assert not (tmp_path / "out").exists()  # nothing written
