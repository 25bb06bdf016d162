"""Every real slide in ../shared/data/slides opens, reads and yields tissue; bad ones are refused."""

import numpy as np
import pytest

from lowmag.errors import ImplausibleMppError, MissingMppError, UnsupportedSlideError
from lowmag.reader import read_at_mpp, verify_pyramid
from lowmag.resolution import magnification_to_mpp
from lowmag.slide import open_slide
from lowmag.tissue import analysis_mpp, locate_tissue, tissue_mask

pytestmark = pytest.mark.shared_data

# path, --assume-mpp, expected level-0 µm/px, expected level count, whether it holds tissue
READABLE = [
    ("aperio/CMU-1-Small-Region.svs", None, 0.499, 1, True),
    ("aperio/TCGA-CR-7395-frozen-jp2k-no-mpp.svs", 0.25, 0.25, 2, True),
    ("generic-tiff/CMU-1-Small-Region-pyramid.tif", None, 0.499, 5, True),
    ("dicom/CMU-1-Small-Region", None, 0.499, 5, True),
    ("tiny/small.svs", None, 0.499, 1, False),
    ("tiny/boxes_0.dcm", None, 0.499, 1, False),
    ("tiny/boxes_1.dcm", None, 0.499, 1, False),
]
MAGS = ["0.625x", "1.25x", "2.5x", "5x"]


@pytest.mark.parametrize("name, assume, mpp, n_levels, has_tissue", READABLE, ids=[r[0] for r in READABLE])
def test_readable_slide_reports_itself_and_reads_at_every_student_magnification(
    slides_dir, name, assume, mpp, n_levels, has_tissue
):
    with open_slide(slides_dir / name, assume_mpp=assume) as slide:
        info = slide.info
        assert info.mpp == pytest.approx(mpp, rel=1e-3)
        assert info.mpp_source == ("assumed" if assume else "metadata")
        assert len(info.levels) == n_levels
        assert info.levels[0].width == info.width and info.levels[0].downsample == 1.0
        for mag in MAGS:
            target = magnification_to_mpp(float(mag[:-1]))
            pixels = read_at_mpp(slide, mag)
            assert abs(pixels.shape[1] - info.width * info.mpp_x / target) <= 1, mag
            assert abs(pixels.shape[0] - info.height * info.mpp_y / target) <= 1, mag


@pytest.mark.parametrize(
    "name, assume", [r[:2] for r in READABLE if r[4]], ids=[r[0] for r in READABLE if r[4]]
)
def test_tissue_boxes_cover_the_tissue(slides_dir, name, assume):
    with open_slide(slides_dir / name, assume_mpp=assume) as slide:
        boxes = locate_tissue(slide)
        mpp = analysis_mpp(slide)
        rgb = read_at_mpp(slide, mpp)
        info = slide.info
    assert boxes, "tissue expected"
    mask = tissue_mask(rgb, mpp)
    covered = np.zeros_like(mask)
    sx, sy = rgb.shape[1] / info.width, rgb.shape[0] / info.height
    for b in boxes:
        covered[int(b.y * sy) : int(np.ceil((b.y + b.height) * sy)), int(b.x * sx) : int(np.ceil((b.x + b.width) * sx))] = True
        assert 0 <= b.x and b.x + b.width <= info.width and b.y + b.height <= info.height
        assert b.width_um == pytest.approx(b.width * info.mpp_x)
    assert (mask & covered).sum() >= 0.97 * mask.sum()


def test_tiny_slides_hold_no_tissue_and_say_so_with_an_empty_list(slides_dir):
    with open_slide(slides_dir / "tiny/small.svs") as slide:
        assert locate_tissue(slide) == []


def test_the_same_region_reads_the_same_from_svs_tiff_and_dicom(slides_dir):
    """The DICOM series has broken pyramid levels; lowmag must still read true pixels."""
    reads = {}
    for name in ("aperio/CMU-1-Small-Region.svs", "generic-tiff/CMU-1-Small-Region-pyramid.tif",
                 "dicom/CMU-1-Small-Region"):
        with open_slide(slides_dir / name) as slide:
            reads[name] = read_at_mpp(slide, "1.25x").astype(np.float32)
            if name.startswith("dicom"):
                assert verify_pyramid(slide) == {1, 2, 3, 4}
    svs = reads["aperio/CMU-1-Small-Region.svs"]
    assert np.abs(reads["dicom/CMU-1-Small-Region"] - svs).mean() < 1.0  # read from level 0
    assert np.abs(reads["generic-tiff/CMU-1-Small-Region-pyramid.tif"] - svs).mean() < 6.0


def test_jp2k_slide_without_mpp_is_refused_until_assumed(slides_dir):
    path = slides_dir / "aperio/TCGA-CR-7395-frozen-jp2k-no-mpp.svs"
    with pytest.raises(MissingMppError) as err:
        open_slide(path)
    assert "TCGA-CR-7395-frozen-jp2k-no-mpp.svs" in str(err.value)
    assert "--assume-mpp" in str(err.value)


@pytest.mark.parametrize(
    "name, error, words",
    [
        ("bad/dicom-no-pixel-spacing.dcm", UnsupportedSlideError, "DICOM"),
        ("bad/untiled-ihc-no-mpp.tif", MissingMppError, "--assume-mpp"),
        ("bad/synthetic-boxes-implausible-mpp.tiff", ImplausibleMppError, "352.9 µm/px"),
    ],
)
def test_bad_files_are_refused_with_a_message_naming_file_and_fix(slides_dir, name, error, words):
    with pytest.raises(error) as err:
        open_slide(slides_dir / name)
    message = str(err.value)
    assert name.split("/")[1] in message and "Fix:" in message and words in message


def test_synthetic_boxes_are_not_tissue_even_with_an_assumed_mpp(slides_dir):
    with open_slide(slides_dir / "bad/synthetic-boxes-implausible-mpp.tiff", assume_mpp=1.0) as slide:
        assert locate_tissue(slide) == []
