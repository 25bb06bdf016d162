"""Opening files: formats, µm/px sources and clear refusals."""

import numpy as np
import pytest

from lowmag.errors import ImplausibleMppError, MissingMppError, SlideReadError, UnsupportedSlideError
from lowmag.reader import read_at_mpp
from lowmag.slide import open_slide
from lowmag.synthetic import make_synthetic_slide


def test_synthetic_pyramid_reports_levels_and_mpp(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        info = slide.info
    assert info.format == "generic-tiff"
    assert (info.width, info.height) == (2048, 1536)
    assert [lv.downsample for lv in info.levels] == [1.0, 2.0, 4.0, 8.0]
    assert info.mpp == pytest.approx(0.5) and info.mpp_source == "metadata"
    assert info.levels[3].mpp_x == pytest.approx(4.0)
    assert info.to_dict()["mpp"] == pytest.approx(0.5)


def test_72_dpi_tags_are_refused_and_assume_mpp_overrides(tmp_path):
    path = make_synthetic_slide(tmp_path / "72dpi.tif", 512, 512, mpp=None)
    with pytest.raises(ImplausibleMppError, match=r"72dpi.tif.*352.8.*--assume-mpp"):
        open_slide(path)
    with open_slide(path, assume_mpp=0.25) as slide:
        assert slide.info.mpp == 0.25 and slide.info.mpp_source == "assumed"


def test_assume_mpp_must_itself_be_plausible(synthetic_slide):
    with pytest.raises(ImplausibleMppError, match="--assume-mpp 500"):
        open_slide(synthetic_slide, assume_mpp=500)


def test_plain_png_needs_its_mpp_and_then_reads_like_a_slide(tmp_path):
    import pyvips

    rgba = np.zeros((150, 150, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:10, :10, 3] = 0  # transparent corner flattens to white
    path = tmp_path / "tile.png"
    pyvips.Image.new_from_array(rgba, interpretation="srgb").pngsave(str(path))
    with pytest.raises(MissingMppError, match=r"tile.png.*--assume-mpp"):
        open_slide(path)
    with open_slide(path, assume_mpp=0.495) as slide:
        assert slide.info.format == "image/png" and len(slide.info.levels) == 1
        pixels = read_at_mpp(slide, 0.99)  # 2x down
        full = slide.read_region(0, 0, 0, 150, 150)
    assert pixels.shape == (75, 75, 3)
    assert tuple(full[0, 0]) == (255, 255, 255) and tuple(full[50, 50]) == (200, 0, 0)


def test_missing_file_unknown_format_and_empty_folder(tmp_path):
    with pytest.raises(UnsupportedSlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    junk = tmp_path / "notes.txt"
    junk.write_text("not a slide")
    with pytest.raises(UnsupportedSlideError, match=r"notes.txt.*Fix:"):
        open_slide(junk)
    with pytest.raises(UnsupportedSlideError, match="without DICOM"):
        open_slide(tmp_path)


def test_truncated_slide_is_refused_or_fails_reading_with_a_clear_error(synthetic_slide, tmp_path):
    data = synthetic_slide.read_bytes()
    cut = tmp_path / "half-written.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises((UnsupportedSlideError, SlideReadError)) as err:
        with open_slide(cut) as slide:
            read_at_mpp(slide, 0.5)
    assert "half-written.tif" in str(err.value)
