"""The pyramid check run on a second handle beside the tissue step: same answers as checking
first, and a level the check rules out is never behind a result."""

from __future__ import annotations

import numpy as np
import pytest

from lowmag.errors import SlideReadError
from lowmag.reader import choose_level, verify_pyramid
from lowmag.slide import Slide, open_slide
from lowmag.tissue import analysis_mpp, find_tissue, find_tissue_checked_beside

from .test_pyramid_check import as_ycbcr


class WrongColours(Slide):
    """A real slide whose one level decodes without error to YCbCr taken for RGB (as the
    shared DICOM series' levels do): only the pyramid check can tell."""

    def __init__(self, path, level):
        self._slide = open_slide(path)
        self._level = level
        self.info = self._slide.info
        self.reads: list[int] = []

    def read_region(self, level, x, y, w, h):
        self.reads.append(level)
        pixels = self._slide.read_region(level, x, y, w, h)
        return as_ycbcr(pixels) if level == self._level else pixels

    def close(self):
        self._slide.close()


def _same(a, b) -> None:
    assert a.boxes == b.boxes
    assert np.array_equal(a.overview, b.overview)
    assert a.modality == b.modality


def test_the_overview_read_from_a_level_the_check_rules_out_is_found_again(synthetic_slide):
    with open_slide(synthetic_slide) as healthy:
        level = choose_level(healthy, analysis_mpp(healthy))
        target = healthy.info.levels[-1].mpp_x
    assert level > 0  # the overview comes from a pyramid level, which the damage then hits
    with WrongColours(synthetic_slide, level) as first:
        verify_pyramid(first, up_to_mpp=target)
        expected = find_tissue(first)
    with WrongColours(synthetic_slide, level) as slide:
        got = find_tissue_checked_beside(slide, lambda: WrongColours(synthetic_slide, level), target)
        assert slide.reads.count(level) == 1  # the speculative overview read it...
        assert slide.unreadable_levels == first.unreadable_levels == {level}  # ...the check ruled it out...
    _same(got, expected)  # ...and the answer is the one from a finer level


def test_a_healthy_pyramid_is_checked_once_and_not_read_twice(synthetic_slide):
    with open_slide(synthetic_slide) as first:
        target = first.info.levels[-1].mpp_x
        expected = find_tissue(first)
    with WrongColours(synthetic_slide, level=-1) as slide:  # no level damaged
        got = find_tissue_checked_beside(slide, lambda: open_slide(synthetic_slide), target)
        overview_level = choose_level(slide, analysis_mpp(slide))
        assert slide.reads == [overview_level]  # one read: the check ran on the other handle
        assert slide.pyramid_verified and slide.unreadable_levels == frozenset()
        assert verify_pyramid(slide, up_to_mpp=target) == frozenset()  # nothing left to check
        assert slide.reads == [overview_level]
    _same(got, expected)


def test_an_error_of_the_check_is_raised_after_the_tissue_step(synthetic_slide):
    def reopen():
        raise SlideReadError(synthetic_slide, "the file changed while it was read", "scan it again.")

    with open_slide(synthetic_slide) as slide:
        with pytest.raises(SlideReadError, match="changed while it was read"):
            find_tissue_checked_beside(slide, reopen, slide.info.levels[-1].mpp_x)
        assert not slide.pyramid_verified


@pytest.mark.parametrize("name", ["generic-tiff/CMU-1-Small-Region-pyramid.tif", "dicom/CMU-1-Small-Region",
                                  "aperio/CMU-1-Small-Region.svs"])
def test_on_the_real_slides_the_answer_and_the_verdict_are_those_of_checking_first(slides_dir, name):
    path = slides_dir / name
    target = 7.92  # a 1.25x student: the TIFF's and the DICOM series' coarse levels
    with open_slide(path) as first:
        expected = find_tissue(first)
        verdict = verify_pyramid(first, up_to_mpp=target)
    with open_slide(path) as slide:
        got = find_tissue_checked_beside(slide, lambda: open_slide(path), target)
        assert slide.unreadable_levels == verdict  # the DICOM series: {1, 2, 3, 4}
    _same(got, expected)
