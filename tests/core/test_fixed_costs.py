"""Issue 15's cheaper fixed costs give the same answers as the straightforward code they replaced.

Each fast path is checked against the plain formula it stands for (kept here as the oracle),
on real pixels where the shared data is present; the lazy pyramid check and the stored-level
tissue overview are checked for what they must not change.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lowmag.draw import draw_boxes
from lowmag.reader import choose_level, read_at_mpp, verify_pyramid
from lowmag.slide import Slide, _composite, open_slide
from lowmag.tissue import TissueBox, TissueParams, analysis_mpp, brightness, colour_saturation, find_tissue

from tests.core.test_pyramid_check import DamagedLevel

GOLDEN = Path(__file__).parent / "real_slide_boxes.json"


def plain_composite(rgba, background):
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * a + np.asarray(background, np.float32) * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_compositing_blends_only_what_is_transparent_and_matches_the_full_formula():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (120, 90, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[-1, :, 3] = 0          # the transparent edge row a level's rounding adds
    rgba[10:20, 30:40, 3] = rng.integers(0, 255, (10, 10), dtype=np.uint8)  # partly transparent
    got = _composite(rgba, (250, 240, 230))
    assert got.flags.c_contiguous and got.dtype == np.uint8
    assert np.array_equal(got, plain_composite(rgba, (250, 240, 230)))
    opaque = rgba.copy()
    opaque[..., 3] = 255
    assert np.array_equal(_composite(opaque, (0, 0, 0)), opaque[..., :3])
    column = opaque.copy()  # a transparent right column, and one half-transparent pixel far from it
    column[:, -1, 3] = 0
    column[5, 7, 3] = 100
    assert np.array_equal(_composite(column, (250, 240, 230)), plain_composite(column, (250, 240, 230)))


def test_otsus_histogram_equals_numpys_on_bin_edges_and_outside_values():
    from lowmag.tissue import _histogram01

    edges = (np.arange(257) / 256).astype(np.float32)
    values = np.concatenate([
        np.random.default_rng(5).random(50_000, dtype=np.float32), edges,
        np.nextafter(edges, np.float32(-1)), np.nextafter(edges, np.float32(2)),
        np.float32([-0.25, 1.5, np.nan, np.inf]),
    ])
    for sample in (values, values[:50_000], values[-7 * 1000:].reshape(-1, 7)[:, :5]):
        expected = np.histogram(sample, bins=256, range=(0.0, 1.0))[0].astype(np.float64)
        assert np.array_equal(_histogram01(sample, 256), expected)


def test_saturation_and_brightness_equal_the_float_formulas_on_every_value():
    values = np.array([[[r, g, b]] for r in range(0, 256, 5) for g in range(256) for b in range(0, 256, 17)],
                      np.uint8)
    pixels = values.astype(np.float32)
    high = pixels.max(axis=2)
    assert np.array_equal(colour_saturation(values), (high - pixels.min(axis=2)) / np.maximum(high, 1.0))
    assert np.array_equal(brightness(values), pixels.mean(axis=2))


def libvips_draw_boxes(rgb, boxes, scale, labels, colours):
    """How thumbnails were drawn before issue 15 (one libvips draw per outline and label)."""
    import pyvips

    image = pyvips.Image.new_from_array(np.ascontiguousarray(rgb), interpretation="srgb")
    thickness = max(1, int(round(min(rgb.shape[:2]) / 300)))
    for i, box in enumerate(boxes):
        colour = list(colours[i])
        x, y = int(round(box.x * scale[0])), int(round(box.y * scale[1]))
        w, h = max(1, int(round(box.width * scale[0]))), max(1, int(round(box.height * scale[1])))
        for t in range(thickness):
            image = image.draw_rect(colour, x + t, y + t, max(1, w - 2 * t), max(1, h - 2 * t))
        mask = pyvips.Image.text(labels[i], dpi=max(60, image.width // 6), font="sans bold")
        if x + thickness + 2 < image.width and y + thickness + 2 < image.height:
            image = image.draw_mask(colour, mask, x + thickness + 2, y + thickness + 2)
    return image.numpy().reshape(rgb.shape)


def test_thumbnail_boxes_are_drawn_exactly_as_libvips_drew_them():
    rng = np.random.default_rng(0)
    thumb = rng.integers(100, 256, (768, 1024, 3), dtype=np.uint8)
    corners = rng.integers(0, 30000, (30, 4))
    boxes = [TissueBox(int(x), int(y), int(w), int(h), 0.5, 0.5, 1.0) for x, y, w, h in corners]
    boxes.append(TissueBox(39000, 29000, 5000, 5000, 0.5, 0.5, 1.0))  # runs off the image's corner
    labels = [f"{i} tumour 0.{i:02d}" for i in range(len(boxes))]
    colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in boxes]
    scale = (1024 / 40000, 768 / 30000)
    got = draw_boxes(thumb, boxes, scale, labels, colours=colours)
    assert np.array_equal(got, libvips_draw_boxes(thumb, boxes, scale, labels, colours))
    assert not np.array_equal(got, thumb)


def test_the_pyramid_is_checked_only_as_far_as_reads_need_and_then_on(synthetic_slide):
    with open_slide(synthetic_slide) as healthy:
        levels = healthy.info.levels
    damaged = DamagedLevel(open_slide(synthetic_slide), level=len(levels) - 1, mode="colours")
    fine_mpp = levels[1].mpp_x
    assert verify_pyramid(damaged, up_to_mpp=fine_mpp) == frozenset()
    assert max(damaged.reads) == 1  # nothing coarser than the read needs was decoded
    assert not damaged.pyramid_verified
    assert verify_pyramid(damaged) == {len(levels) - 1}  # the rest, when asked for
    assert damaged.pyramid_verified


def test_a_level_failing_only_at_its_edge_is_caught_by_the_read_itself(synthetic_slide):
    """Short frames at a level's edge may lie outside the check's windows: the read that
    meets them falls back to the finer level and yields the same pixels."""

    class EdgeFailure(DamagedLevel):
        def read_region(self, level, x, y, w, h):
            self.reads.append(level)
            info = self.info.levels[level]
            if level == self._level and x + w >= info.width:
                from lowmag.errors import SlideReadError

                raise SlideReadError(self.info.path, "Dimensional mismatch reading JPEG")
            return self._slide.read_region(level, x, y, w, h)

    with open_slide(synthetic_slide) as healthy:
        expected = read_at_mpp(healthy, 4.0)
        slide = EdgeFailure(open_slide(synthetic_slide), level=3, mode="error")
        got = read_at_mpp(slide, 4.0)
    assert 3 in slide.unreadable_levels
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 6


def test_a_large_slide_finds_its_tissue_on_a_stored_level_without_resampling(tmp_path):
    from lowmag.synthetic import Blob, make_synthetic_slide

    # 16 x 12 mm at 2 µm/px: the 2048 px overview would need 7.8 µm/px; the 2000 px level
    # at 8 µm/px is read as stored instead.
    path = make_synthetic_slide(tmp_path / "wide.tif", 8000, 6000, mpp=2.0,
                                blobs=[Blob(2000, 3000, 900, 1200), Blob(6000, 2500, 700, 600)])
    with open_slide(path) as slide:
        mpp = analysis_mpp(slide)
        stored = [level for level in slide.info.levels if abs(level.mpp_x - mpp) < 1e-9]
        assert len(stored) == 1 and max(stored[0].width, stored[0].height) == 2000
        finding = find_tissue(slide)
    assert finding.overview.shape[:2] == (stored[0].height, stored[0].width)
    assert len(finding.boxes) == 2
    (a, b) = finding.boxes
    assert abs(a.x - 1100) < 120 and abs(b.x - 5300) < 120  # where the pieces are, within a few 16 µm px


def test_small_slides_keep_their_analysis_resolution():
    from lowmag.slide import LevelInfo, SlideInfo

    class Stub:
        unreadable_levels = frozenset()
        info = SlideInfo("x", "stub", 2220, 2967, (LevelInfo(0, 2220, 2967, 1.0, 0.499, 0.499),
                                                   LevelInfo(1, 555, 741, 4.0, 1.996, 1.996)),
                         0.499, 0.499, "metadata", 20.0)

    assert analysis_mpp(Stub()) == TissueParams().min_mpp


@pytest.mark.shared_data
def test_real_slides_keep_the_boxes_they_had_before_issue_15(slides_dir):
    """Boxes recorded at e2a3f1b, before any of issue 15's changes; exact on the machine that
    recorded them, within a pixel of the 2 µm/px analysis image (4 level-0 pixels) elsewhere,
    where libvips' vector paths may round a float differently."""
    golden = json.loads(GOLDEN.read_text())
    for name, entry in golden.items():
        with open_slide(slides_dir / name, assume_mpp=entry["assume_mpp"]) as slide:
            assert sorted(verify_pyramid(slide)) == entry["unreadable"]
            boxes = [[b.x, b.y, b.width, b.height] for b in find_tissue(slide).boxes]
        assert len(boxes) == len(entry["boxes"]), name
        for got, want in zip(boxes, entry["boxes"]):
            assert np.abs(np.subtract(got, want[:4])).max() <= 4, (name, got, want)


@pytest.mark.parametrize("k", [2, 3, 4, 7, 8, 16, 17, 40])
def test_box_averaging_equals_the_float_mean_for_every_sum(k):
    """Every possible sum of a k x k square (0 to 255 k²) once (a sample for large squares,
    with every sum at and beside a half), plus random squares."""
    from lowmag.reader import box_mean

    n = k * k
    halves = (np.arange(255)[:, None] * n + n // 2 + np.array([-1, 0, 1])).ravel()
    sums = np.union1d(np.arange(0, 255 * n + 1, max(1, (255 * n) // 4000)), halves[halves <= 255 * n])
    cells = np.zeros((len(sums), n), np.int64)
    for i in range(n):  # spread each sum over the square's pixels, each at most 255
        cells[:, i] = np.clip(sums - 255 * i, 0, 255)
    rng = np.random.default_rng(k)
    cells = np.concatenate([cells, rng.integers(0, 256, (500, n))])
    side = int(np.ceil(np.sqrt(len(cells))))
    cells = np.concatenate([cells, np.zeros((side * side - len(cells), n), np.int64)])
    squares = cells.reshape(side, side, k, k).transpose(0, 2, 1, 3).reshape(side * k, side * k)
    pixels = np.repeat(squares[..., None], 3, axis=2).astype(np.uint8)
    pixels[..., 1] = 255 - pixels[..., 1]
    plain = pixels.reshape(side, k, side, k, 3).mean(axis=(1, 3), dtype=np.float32)
    assert np.array_equal(box_mean(pixels, k), np.clip(np.rint(plain), 0, 255).astype(np.uint8))


def test_compositing_a_read_only_pixel_does_not_write_into_it():
    rgba = np.array([[[10, 20, 30, 128]]], np.uint8)
    rgba.setflags(write=False)  # as np.asarray of a PIL image is
    got = _composite(rgba, (255, 255, 255))
    assert np.array_equal(got, plain_composite(rgba, (255, 255, 255)))


def test_the_check_goes_on_from_a_usable_level_when_its_reference_failed_a_read(synthetic_slide):
    """A read fell back from the level the lazy check last verified (an edge frame failed):
    checking coarser levels later must compare them with a usable level, not fail."""
    from lowmag.errors import SlideReadError

    class FailsLater(DamagedLevel):
        failing = False

        def read_region(self, level, x, y, w, h):
            self.reads.append(level)
            if self.failing and level == 1:
                raise SlideReadError(self.info.path, "Dimensional mismatch reading JPEG")
            return self._slide.read_region(level, x, y, w, h)

    slide = FailsLater(open_slide(synthetic_slide), level=1, mode="error")
    assert verify_pyramid(slide, up_to_mpp=slide.info.levels[1].mpp_x) == frozenset()
    slide.failing = True
    slide.mark_level_unreadable(1, ValueError("an edge frame failed to decode"))
    assert verify_pyramid(slide) == {1}
    assert slide.pyramid_verified


def test_the_mask_morphology_step_by_step_equals_the_lazy_chain():
    """tissue_mask computes each closing/opening step into memory; the pixels must be those
    of the one lazy libvips chain it replaced (on a speckled mask with holes and specks)."""
    import pyvips

    from lowmag.tissue import _dilate, _erode, _otsu, tissue_mask

    rng = np.random.default_rng(11)
    rgb = np.full((300, 420, 3), 235, np.uint8)
    for _ in range(40):  # stained blobs of many sizes, some touching, on glass with specks
        y, x, r = rng.integers(0, 300), rng.integers(0, 420), rng.integers(2, 40)
        yy, xx = np.ogrid[:300, :420]
        rgb[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = (200, 120, 170)
    rgb[rng.random((300, 420)) < 0.05] = (235, 235, 235)  # holes
    rgb[rng.random((300, 420)) < 0.01] = (190, 100, 160)  # specks
    for mpp in (2.0, 4.0, 16.0):
        params = TissueParams()
        signal = pyvips.Image.new_from_array(colour_saturation(rgb)).gaussblur(1.0, precision="float").numpy()
        mask = pyvips.Image.new_from_array((signal > max(_otsu(signal), params.min_saturation)).astype(np.uint8) * 255)
        close_r, open_r = max(1, round(params.close_um / mpp)), max(1, round(params.open_um / mpp))
        lazy = _dilate(_erode(_erode(_dilate(mask, close_r), close_r), open_r), open_r).numpy() > 127
        got = tissue_mask(rgb, mpp, params)
        assert got.any() and not got.all()
        assert np.array_equal(got, lazy), mpp


class NoMoreDecoding(Slide):
    """A slide that counts its reads of level 0 and can be told to refuse them."""

    def __init__(self, path):
        self._slide = open_slide(path)
        self.info = self._slide.info
        self.level0_reads = 0
        self.refuse = False

    def read_region(self, level, x, y, w, h):
        if level == 0:
            assert not self.refuse, "level 0 decoded again"
            self.level0_reads += 1
        return self._slide.read_region(level, x, y, w, h)

    def mark_level_unreadable(self, level, error):
        super().mark_level_unreadable(level, error)
        self._slide.mark_level_unreadable(level, error)  # reopens a handle a failed read left in error

    def close(self):
        self._slide.close()


def _one_level_slide(tmp_path):
    import pyvips

    from lowmag.synthetic import default_blobs, synthetic_pixels

    path = tmp_path / "one-level.tif"  # a scanner's single-level export: no coarser level at all
    pixels = synthetic_pixels(1500, 1100, default_blobs(1500, 1100), seed=4)
    pyvips.Image.new_from_array(pixels, interpretation="srgb").tiffsave(
        str(path), tile=True, tile_width=256, tile_height=256, compression="jpeg", Q=90, xres=2000.0, yres=2000.0,
        resunit="cm")
    return path


@pytest.mark.parametrize("where", ["synthetic", "svs", "dicom"])
def test_level0_decoded_for_the_overview_is_sliced_for_the_pieces_with_the_same_pixels(tmp_path, where):
    """A slide without a usable coarser level decodes level 0 once: the model's pieces are cut
    from the overview's decode, pixel for pixel what reading them again gives."""
    from lowmag.edge.pipeline import PipelineConfig, tile_regions
    from lowmag.reader import output_size

    if where == "synthetic":
        path = _one_level_slide(tmp_path)
    else:
        from tests.conftest import SLIDES

        path = SLIDES / ("aperio/CMU-1-Small-Region.svs" if where == "svs" else "dicom/CMU-1-Small-Region")
        if not path.exists():
            pytest.skip(f"{path} not found")
    target = 7.92  # a 1.25x student
    with NoMoreDecoding(path) as slide, open_slide(path) as plain:
        verify_pyramid(slide, up_to_mpp=target)
        assert choose_level(slide, target) == 0
        slide.level0_reads = 0  # the check's windows
        finding = find_tissue(slide, keep_level0=True)
        assert finding.boxes and slide.level0_reads == 1 and slide.decoded_level0 is not None
        # Only on request: a caller holding many slides open (calibration) must not hold each level 0.
        assert find_tissue(plain).boxes == finding.boxes and plain.decoded_level0 is None
        slide.refuse = True
        regions = [r for box in finding.boxes
                   for r in tile_regions(box, output_size(slide, target, box.region), PipelineConfig().max_piece_px)]
        for region in regions:
            assert np.array_equal(read_at_mpp(slide, target, region), read_at_mpp(plain, target, region))
    assert slide.decoded_level0 is None  # dropped when the slide is closed
