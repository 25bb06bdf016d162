"""Calibration sets drawn from real slides, real and synthetic tiles, and their cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from lowmag.calibration import sampling
from lowmag.calibration.sampling import CalibrationSet, sample_calibration_set
from lowmag.errors import CalibrationError
from lowmag.synthetic import Blob, synthetic_pixels

from ..conftest import SHARED_DATA

KATHER = SHARED_DATA / "kather2016"
SLIDE_ARGS = dict(size=40, holdout=6, patch_px=64, seed=3)  # 64 px at 1.98 µm/px: ~37 windows a slide


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    import pyvips

    path.parent.mkdir(parents=True, exist_ok=True)
    pyvips.Image.new_from_array(np.ascontiguousarray(pixels), interpretation="srgb").pngsave(str(path))
    return path


def _tissue_tile(side: int, seed: int) -> np.ndarray:
    return synthetic_pixels(side, side, [Blob(side // 2, side // 2, side, side)], seed=seed)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def slide_set(slides_dir, tmp_path_factory) -> tuple[CalibrationSet, list[str]]:
    """One sampling of the real slides folder, with the warnings it logged."""
    records = _Records()
    log = logging.getLogger("lowmag.calibration.sampling")
    log.addHandler(records)
    try:
        result = sample_calibration_set(
            [slides_dir], 1.98, cache_dir=tmp_path_factory.mktemp("cache"), **SLIDE_ARGS
        )
    finally:
        log.removeHandler(records)
    return result, records.messages


@pytest.mark.shared_data
def test_real_slides_give_tissue_windows_from_several_slides(slide_set):
    result, _ = slide_set
    m = result.manifest
    assert m["counts"] == {"calibration": 40, "holdout": 6}
    assert (len(result.images), len(result.holdout)) == (40, 6)
    for image in result.images + result.holdout:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    contributing = [s for s in m["sources"] if s["n_calibration"] + s["n_holdout"] > 0]
    # The CMU region as SVS, generic TIFF and DICOM series; round-robin shares them evenly.
    assert len(contributing) == 3
    assert {s["n_calibration"] + s["n_holdout"] for s in contributing} <= {15, 16}
    assert sum(s["n_calibration"] for s in m["sources"]) == 40
    assert all(item["tissue_fraction"] >= sampling.WINDOW_MIN_TISSUE for item in m["items"])
    assert all(item["shape"] == [64, 64] for item in m["items"])
    assert (result.directory / "manifest.json").is_file()


@pytest.mark.shared_data
def test_bad_and_tissue_free_files_are_skipped_with_a_warning(slide_set, slides_dir):
    result, warnings = slide_set
    by_path = {Path(s["path"]).name: s for s in result.manifest["sources"]}
    for bad in sorted((slides_dir / "bad").iterdir()):
        assert any(bad.name in message for message in warnings), bad
        assert by_path[bad.name]["skipped_reason"]
    assert "TCGA-CR-7395-frozen-jp2k-no-mpp.svs" in " ".join(warnings)  # no µm/px: skipped
    assert by_path["small.svs"]["skipped_reason"].startswith("no tissue")
    assert any("fewer than 300" in message for message in warnings)


@pytest.mark.shared_data
def test_same_seed_same_set_and_second_call_reads_nothing(slide_set, slides_dir, tmp_path, monkeypatch):
    first, _ = slide_set
    fresh = sample_calibration_set([slides_dir], 1.98, cache_dir=tmp_path, **SLIDE_ARGS)
    assert fresh.manifest["key"] == first.manifest["key"]
    assert fresh.manifest["items"] == first.manifest["items"]
    assert all(np.array_equal(a, b) for a, b in zip(fresh.images + fresh.holdout, first.images + first.holdout))

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(sampling, "open_slide", refuse)
    monkeypatch.setattr(sampling, "read_at_mpp", refuse)
    again = sample_calibration_set([slides_dir], 1.98, cache_dir=tmp_path, **SLIDE_ARGS)
    assert again.manifest == fresh.manifest
    assert all(np.array_equal(a, b) for a, b in zip(again.images, fresh.images))


@pytest.mark.shared_data
def test_holdout_is_disjoint_from_calibration(slide_set):
    items = slide_set[0].manifest["items"]
    where = {role: {(i["source"], tuple(i["region"])) for i in items if i["role"] == role}
             for role in ("calibration", "holdout")}
    assert len(where["calibration"]) == 40 and len(where["holdout"]) == 6
    assert not where["calibration"] & where["holdout"]


@pytest.mark.shared_data
def test_kather_tiles_are_read_whole_at_the_target_mpp(tmp_path, caplog):
    if not KATHER.is_dir():
        pytest.skip(f"Kather 2016 tiles not found at {KATHER}")
    tiles = tmp_path / "tiles"
    for folder in ("01_TUMOR", "04_LYMPHO", "08_EMPTY"):
        for path in sorted((KATHER / folder).glob("*.png"))[:3]:
            (tiles / folder).mkdir(parents=True, exist_ok=True)
            (tiles / folder / path.name).symlink_to(path.resolve())
    with pytest.raises(CalibrationError, match=r"01_TUMOR/.*\.png.*image_mpp"):
        sample_calibration_set([tiles], 1.98, cache_dir=tmp_path / "cache")

    with caplog.at_level(logging.WARNING, logger="lowmag.calibration.sampling"):
        result = sample_calibration_set([tiles], 1.98, image_mpp=0.495, cache_dir=tmp_path / "cache")
    assert len(result.images) == 6  # the blank 08_EMPTY tiles are not tissue
    assert all(image.shape == (38, 38, 3) for image in result.images)  # 150 px * 0.495 / 1.98
    for source in result.manifest["sources"]:
        assert source["kind"] == "image"
        assert ("08_EMPTY" in source["path"]) == ("skipped_reason" in source)
    assert all(item["region"] == [0, 0, 150, 150] for item in result.manifest["items"])
    assert "6 images" in caplog.text and "unreliable" in caplog.text


def test_plain_images_small_and_large(tmp_path):
    folder = tmp_path / "images"
    for i in range(4):
        _write_png(folder / f"tile{i}.png", _tissue_tile(100, seed=i))
    big = np.full((768, 1024, 3), 246, np.uint8)
    big[100:700, 100:900] = _tissue_tile(800, seed=9)[:600]
    _write_png(folder / "sub" / "large.png", big)
    result = sample_calibration_set([folder], 1.0, size=20, patch_px=64, image_mpp=0.5,
                                    cache_dir=tmp_path / "cache")
    counts = {Path(s["path"]).name: s["n_calibration"] for s in result.manifest["sources"]}
    # Round-robin: each 100 px tile (50 px at 1 µm/px, used whole) once; the rest from the
    # large image, cut into 64 px windows (128 px at its 0.5 µm/px).
    assert counts == {"tile0.png": 1, "tile1.png": 1, "tile2.png": 1, "tile3.png": 1, "large.png": 16}
    shapes = {tuple(item["shape"]): item["region"][2:] for item in result.manifest["items"]}
    assert shapes == {(50, 50): [100, 100], (64, 64): [128, 128]}


def test_half_written_cache_is_rebuilt_and_other_seeds_differ(tmp_path):
    folder = tmp_path / "images"
    for i in range(6):
        _write_png(folder / f"tile{i}.png", _tissue_tile(64, seed=i))
    args = dict(size=4, holdout=2, image_mpp=0.5, cache_dir=tmp_path / "cache")
    first = sample_calibration_set([folder], 0.5, **args)
    (first.directory / "manifest.json").unlink()  # as if interrupted before the last write
    rebuilt = sample_calibration_set([folder], 0.5, **args)
    assert rebuilt.manifest["items"] == first.manifest["items"]
    assert (rebuilt.directory / "manifest.json").is_file()
    (rebuilt.directory / "images.npz").unlink()  # a listed file gone: rebuilt too
    assert sample_calibration_set([folder], 0.5, **args).manifest["items"] == first.manifest["items"]
    other = sample_calibration_set([folder], 0.5, **{**args, "seed": 1})
    assert other.directory != first.directory
    assert other.manifest["items"] != first.manifest["items"]


def test_no_tissue_anywhere_is_an_error_naming_the_sources(tmp_path):
    folder = tmp_path / "blank"
    for i in range(3):
        _write_png(folder / f"white{i}.png", np.full((120, 120, 3), 250, np.uint8))
    with pytest.raises(CalibrationError, match=r"blank.*enough tissue"):
        sample_calibration_set([folder], 1.0, image_mpp=0.5, cache_dir=tmp_path / "cache")


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(CalibrationError, match="nowhere.svs: calibration source not found"):
        sample_calibration_set([tmp_path / "nowhere.svs"], 1.0, cache_dir=tmp_path / "cache")
