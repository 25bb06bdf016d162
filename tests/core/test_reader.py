"""read_at_mpp on synthetic pyramids whose geometry and µm/px are known."""

import numpy as np
import pytest

from lowmag.errors import Interrupted, SlideTooLargeError, UnsupportedSlideError
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


class RecordingSlide:
    """Wraps an open slide and records the size of every block it is asked to decode."""

    def __init__(self, slide) -> None:
        self._slide = slide
        self.blocks: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def read_region(self, level, x, y, width, height):
        self.blocks.append((width, height))
        return self._slide.read_region(level, x, y, width, height)


def test_every_block_a_read_decodes_is_bounded_even_for_a_very_wide_region(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        whole = read_at_mpp(slide, 8.0, exact=True)
        recording = RecordingSlide(slide)
        # k = 8 rows of the 2048 px width would exceed 4096 px: k-row strips are cut into columns.
        bounded = read_at_mpp(recording, 8.0, exact=True, stripe_pixels=4096)
    assert max(w * h for w, h in recording.blocks) <= 4096
    assert len(recording.blocks) > 100
    assert np.array_equal(whole, bounded)  # the block size never changes the pixels


def test_a_read_refuses_to_decode_more_than_its_budget_and_stops_when_asked(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        with pytest.raises(SlideTooLargeError, match="would decode 2,048 x 1,536 = 3,145,728 pixels from pyramid "
                                                     "level 0.*give the slide a pyramid"):
            read_at_mpp(slide, 1.0, exact=True, max_source_pixels=1_000_000)
        asked = []

        def stop_after_three() -> bool:
            asked.append(1)
            return len(asked) > 3

        with pytest.raises(Interrupted):
            read_at_mpp(slide, 1.0, exact=True, stripe_pixels=4096, should_stop=stop_after_three)
    assert len(asked) == 4


def test_a_slide_declaring_a_size_no_glass_slide_has_is_refused_on_opening(tmp_path):
    from tests.hostile import write_huge_header_tiff

    path = write_huge_header_tiff(tmp_path / "huge.tif")
    with pytest.raises(UnsupportedSlideError, match="500 x 500 mm, larger than any glass slide"):
        open_slide(path)
