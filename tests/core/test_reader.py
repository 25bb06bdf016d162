"""read_at_mpp on synthetic pyramids whose geometry and µm/px are known."""

import numpy as np
import pytest

from lowmag.errors import SlideTooLargeError
from lowmag.reader import Region, choose_level, output_size, read_at_mpp
from lowmag.resolution import Resolution
from lowmag.slide import open_slide

from ..conftest import SYNTHETIC_MPP, SYNTHETIC_SIZE


@pytest.mark.parametrize("mag", ["0.625x", "1.25x", "2.5x", "5x", "10x"])
def test_size_matches_the_physical_extent(synthetic_slide, mag):
    target = Resolution.parse(mag).to_mpp()
    with open_slide(synthetic_slide) as slide:
        pixels = read_at_mpp(slide, mag)
    w, h = SYNTHETIC_SIZE
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
    assert abs(pixels.shape[1] - w * SYNTHETIC_MPP / target) <= 1
    assert abs(pixels.shape[0] - h * SYNTHETIC_MPP / target) <= 1


def test_level_choice_is_the_coarsest_level_at_least_as_fine(synthetic_slide):
    with open_slide(synthetic_slide) as slide:  # levels at 0.5, 1, 2, 4 µm/px
        assert choose_level(slide, 0.5) == 0
        assert choose_level(slide, 0.9) == 0
        assert choose_level(slide, 1.0) == 1
        assert choose_level(slide, 3.9) == 2
        assert choose_level(slide, 4.0) == 3
        assert choose_level(slide, 16.0) == 3


def test_pyramid_and_level0_paths_agree_closely(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        for mag in ("1.25x", "2.5x", "5x"):
            pyramid = read_at_mpp(slide, mag).astype(np.float32)
            exact = read_at_mpp(slide, mag, exact=True).astype(np.float32)
            assert pyramid.shape == exact.shape
            assert np.abs(pyramid - exact).mean() < 6.0, mag


def test_striped_reading_gives_the_same_pixels(synthetic_slide):
    """Memory-bounded stripes must not leave seams: results equal a one-block read."""
    with open_slide(synthetic_slide) as slide:
        for mag, exact in (("1.25x", True), ("5x", True), ("2.5x", False)):
            whole = read_at_mpp(slide, mag, exact=exact)
            striped = read_at_mpp(slide, mag, exact=exact, stripe_pixels=5000)
            np.testing.assert_array_equal(whole, striped)


def test_region_read_matches_the_same_part_of_a_whole_read(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        whole = read_at_mpp(slide, 2.0, exact=True)  # 4x down: 512 x 384
        part = read_at_mpp(slide, 2.0, Region(400, 800, 640, 480), exact=True)
    assert part.shape == (120, 160, 3)
    inner = np.abs(part[8:-8, 8:-8].astype(int) - whole[208:312, 108:252].astype(int))
    assert inner.mean() < 2.0


def test_region_outside_the_slide_reads_as_background(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        pixels = read_at_mpp(slide, 1.0, Region(SYNTHETIC_SIZE[0] - 100, 0, 400, 200))
    assert pixels.shape == (100, 200, 3)
    assert pixels[:, 120:].min() == 255


def test_pixel_budget_refuses_before_reading(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        assert output_size(slide, 0.5) == SYNTHETIC_SIZE
        with pytest.raises(SlideTooLargeError, match="two-pieces.tif.*budget"):
            read_at_mpp(slide, 0.5, max_output_pixels=1000)


def test_relative_resolution_uses_the_scan(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        pixels = read_at_mpp(slide, "scan/8")
    assert pixels.shape[:2] == (SYNTHETIC_SIZE[1] // 8, SYNTHETIC_SIZE[0] // 8)
