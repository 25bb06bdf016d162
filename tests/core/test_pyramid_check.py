"""Pyramid levels that decode wrongly or not at all are detected and skipped."""

import numpy as np
import pytest

from lowmag.errors import SlideReadError
from lowmag.reader import read_at_mpp, verify_pyramid
from lowmag.slide import open_slide


class DamagedLevel:
    """Wraps a real slide; one level returns swapped colours or fails to decode."""

    def __init__(self, slide, level, mode):
        self._slide, self._level, self._mode = slide, level, mode
        self.info = slide.info
        self.unreadable_levels = frozenset()
        self.pyramid_verified = False
        self.reads = []

    def mark_level_unreadable(self, level, error):
        self.unreadable_levels = self.unreadable_levels | {level}

    def read_region(self, level, x, y, w, h):
        self.reads.append(level)
        pixels = self._slide.read_region(level, x, y, w, h)
        if level == self._level:
            if self._mode == "error":
                raise SlideReadError(self.info.path, "Dimensional mismatch reading JPEG")
            return as_ycbcr(pixels)  # frames stored as YCbCr but labelled RGB
        return pixels


def as_ycbcr(rgb):
    """The JPEG YCbCr values of RGB pixels, as a viewer shows them when taken for RGB."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["colours", "error"])
def test_damaged_level_is_skipped_and_the_result_matches_a_healthy_read(synthetic_slide, mode):
    with open_slide(synthetic_slide) as healthy:
        expected = read_at_mpp(healthy, 4.0)
        damaged = DamagedLevel(open_slide(synthetic_slide), level=3, mode=mode)
        assert verify_pyramid(damaged) == {3}
        got = read_at_mpp(damaged, 4.0)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 6
    assert damaged.reads[-1] == 2  # the finer level was used


def test_healthy_pyramid_keeps_every_level(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        assert verify_pyramid(slide) == frozenset()
        assert slide.pyramid_verified
