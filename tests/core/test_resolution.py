import pytest

from lowmag.errors import ResolutionError
from lowmag.resolution import (
    Resolution,
    format_magnification,
    is_plausible_mpp,
    magnification_to_mpp,
    mpp_to_magnification,
)


@pytest.mark.parametrize(
    "mag, mpp", [(10, 1.0), (20, 0.5), (5, 2.0), (2.5, 4.0), (1.25, 8.0), (0.625, 16.0)]
)
def test_paper_notation_ten_x_is_one_micron_per_pixel(mag, mpp):
    assert magnification_to_mpp(mag) == pytest.approx(mpp)
    assert mpp_to_magnification(mpp) == pytest.approx(mag)


@pytest.mark.parametrize(
    "text, unit, value, mpp",
    [
        ("1.25x", "mag", 1.25, 8.0),
        ("0.625X", "mag", 0.625, 16.0),
        ("8um", "mpp", 8.0, 8.0),
        ("0.5 µm/px", "mpp", 0.5, 0.5),
        ("2mpp", "mpp", 2.0, 2.0),
        ("scan/4", "scan", 4.0, 2.0),
        ("scan", "scan", 1.0, 0.5),
    ],
)
def test_parse_every_written_form(text, unit, value, mpp):
    r = Resolution.parse(text)
    assert (r.unit, r.value) == (unit, value)
    assert r.to_mpp(scan_mpp=0.5) == pytest.approx(mpp)
    assert Resolution.parse(str(r)) == r


@pytest.mark.parametrize("text", ["", "1.25", "x", "-2x", "0x", "scan/0", "fast"])
def test_unreadable_resolution_explains_the_accepted_forms(text):
    with pytest.raises(ResolutionError, match="1.25x.*8um.*scan/4"):
        Resolution.parse(text)


def test_relative_resolution_needs_the_slide():
    with pytest.raises(ResolutionError, match="slide"):
        Resolution.parse("scan/2").to_mpp()


def test_labels_and_plausibility():
    assert format_magnification(8.0) == "1.25x"
    assert format_magnification(16.0) == "0.625x"
    assert format_magnification(0.5) == "20x"
    assert is_plausible_mpp(0.25) and is_plausible_mpp(16.0)
    assert not is_plausible_mpp(352.8) and not is_plausible_mpp(0.01)
