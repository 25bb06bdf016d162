"""Knowing when not to answer: the training data's fingerprint against real and altered tissue."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lowmag.fingerprint import Fingerprint, StainStats, image_windows
from lowmag.reader import read_at_mpp
from lowmag.slide import open_slide
from lowmag.synthetic import write_variant
from lowmag.tissue import find_tissue

from ..conftest import BUNDLE_MPP, kather_split, read_tiles


def judge_slide(fingerprint: Fingerprint, path: Path, assume_mpp: float | None = None):
    """As the edge runner does: tissue step, then statistics of the pieces read at the model's µm/px."""
    with open_slide(path, assume_mpp=assume_mpp) as slide:
        finding = find_tissue(slide)
        stats = fingerprint.stats()
        for box in finding.boxes:
            stats.add(read_at_mpp(slide, BUNDLE_MPP, box.region))
    modality = () if finding.modality.brightfield else (finding.modality.reason,)
    return finding, fingerprint.judge(stats.features(), stats.histogram(), modality)


@pytest.fixture(scope="module")
def fingerprint(he_fingerprint) -> Fingerprint:
    return Fingerprint(he_fingerprint)


def test_the_threshold_lets_held_out_he_tiles_pass_and_test_tiles_raise_few_alarms(fingerprint):
    data = fingerprint.data
    assert data["held_out_pass_rate"] >= 0.98 and data["threshold"] >= 4.0 and not fingerprint.check(BUNDLE_MPP)
    assert data["window_px"] == 37  # a Kather tile (150 px at 0.495 µm/px) at 2 µm/px
    checked = []
    for rgb in read_tiles(kather_split(every=3)["test"]):
        windows, histogram = image_windows(rgb, data["window_px"])
        checked += [fingerprint.judge(w, histogram) for w in windows]
    alarms = sum(v.out for v in checked)
    assert len(checked) > 150 and alarms / len(checked) <= 0.02, f"{alarms} of {len(checked)} test tiles flagged"


@pytest.mark.parametrize("name", ["aperio/CMU-1-Small-Region.svs", "generic-tiff/CMU-1-Small-Region-pyramid.tif",
                                  "dicom/CMU-1-Small-Region"])
def test_real_he_slides_from_another_lab_are_in_distribution(fingerprint, slides_dir, name):
    finding, verdict = judge_slide(fingerprint, slides_dir / name)
    assert finding.modality.brightfield and finding.boxes
    assert verdict.verdict == "in_distribution", verdict.to_dict()


@pytest.mark.parametrize("kind, reason", [
    ("fluorescence", "background is dark"),
    ("inverted", "background is dark"),
    ("greyscale", "no colour"),
    ("blurred", "out of focus"),
])
def test_slides_built_from_real_tissue_but_unlike_he_brightfield_are_flagged(fingerprint, slides_dir, tmp_path, kind,
                                                                              reason):
    path = write_variant(slides_dir / "aperio" / "CMU-1-Small-Region.svs", tmp_path / f"{kind}.tif", kind)
    finding, verdict = judge_slide(fingerprint, path)
    assert verdict.out and any(reason in r for r in verdict.reasons), verdict.to_dict()
    # The tissue step boxes the signal, never the whole slide.
    assert len(finding.boxes) == 1 and finding.boxes[0].width < 0.8 * 2220


def test_an_ihc_image_is_flagged_for_its_stain(fingerprint, slides_dir):
    _, verdict = judge_slide(fingerprint, slides_dir / "bad" / "untiled-ihc-no-mpp.tif", assume_mpp=2.0)
    assert verdict.out and any("stain" in r for r in verdict.reasons), verdict.to_dict()


def test_a_window_of_a_slide_is_measured_like_a_training_tile_of_that_size(fingerprint, slides_dir):
    """Train/serve skew guard: the statistics of a slide region cut into training-sized
    windows are the statistics of those windows read as separate images."""
    window = fingerprint.data["window_px"]
    with open_slide(slides_dir / "aperio" / "CMU-1-Small-Region.svs") as slide:
        rgb = read_at_mpp(slide, BUNDLE_MPP)
    region = rgb[300:300 + 4 * window, 150:150 + 3 * window]
    stats = fingerprint.stats()
    stats.add(region)
    as_slide = stats.window_features()
    as_tiles = [w for y in range(4) for x in range(3)
                for w in image_windows(region[y * window:(y + 1) * window, x * window:(x + 1) * window], window)[0]]
    assert len(as_slide) == len(as_tiles) > 0
    for a, b in zip(as_slide, as_tiles):
        for name in ("od_total", "od_g_share", "eosin_share", "saturation", "tissue_fraction"):
            assert a[name] == pytest.approx(b[name], rel=1e-5), name
        assert a["sharpness"] == pytest.approx(b["sharpness"], abs=0.15)  # edge pixels see their neighbours


def test_tinted_fluorescence_is_dark_but_black_padding_around_brightfield_is_not(slides_dir):
    from lowmag.tissue import analysis_mpp, overview_modality

    with open_slide(slides_dir / "aperio" / "CMU-1-Small-Region.svs") as slide:
        rgb = read_at_mpp(slide, analysis_mpp(slide))
    fluorescence = np.zeros_like(rgb)
    fluorescence[..., 1] = 255 - rgb.mean(axis=2).astype(np.uint8)
    fluorescence[fluorescence[..., 1] < 40] = (5, 10, 35)  # a tinted background, not pure black
    assert overview_modality(fluorescence).kind == "dark-background"
    padded = np.zeros((rgb.shape[0], 2 * rgb.shape[1], 3), np.uint8)  # half the slide unscanned black
    padded[:, : rgb.shape[1]] = rgb
    assert overview_modality(padded).kind == "brightfield"


def test_tight_training_colours_do_not_make_every_slide_out_of_distribution(slides_dir):
    """Stain-normalised training data has almost no colour spread; the scale floors keep a
    slide 0.01 off in colour share from scoring in the dozens."""
    with open_slide(slides_dir / "aperio" / "CMU-1-Small-Region.svs") as slide:
        rgb = read_at_mpp(slide, BUNDLE_MPP)
    stats = StainStats(37)  # the windows of the slide with tissue...
    stats.add(rgb)
    assert stats.window_features()
    y, x = next((y, x) for y in range(0, rgb.shape[0] - 37, 37) for x in range(0, rgb.shape[1] - 37, 37)
                if image_windows(rgb[y:y + 37, x:x + 37], 37)[0])
    tile = rgb[y:y + 37, x:x + 37]  # ...of which the first
    made = Fingerprint.build([tile] * 30, [tile] * 5, BUNDLE_MPP, source="one tile, thirty times")
    assert made.data["features"]["od_r_share"]["scale"] == 0.01
    shifted = dict(image_windows(tile, made.data["window_px"])[0][0])
    shifted["od_r_share"] += 0.01
    assert abs(made.judge(shifted).z["od_r_share"]) == pytest.approx(1.0, abs=0.05)


def test_a_damaged_or_foreign_fingerprint_is_reported_not_trusted(he_fingerprint):
    from lowmag.spec import ModelSpec, Normalization, new_provenance

    tampered = {**he_fingerprint, "threshold": 1000.0}  # someone silenced the check by hand
    assert Fingerprint(tampered).check() == ["the fingerprint does not match its sha256 (edited or damaged)"]
    assert "lowmag-fingerprint-9" in Fingerprint({**he_fingerprint, "version": "lowmag-fingerprint-9"}).check()[0]
    partial = {k: v for k, v in he_fingerprint.items() if k != "histogram"}
    assert Fingerprint(partial).check() == ["the fingerprint lacks histogram"]
    assert "the model reads 1" in Fingerprint(he_fingerprint).check(target_mpp=1.0)[0]
    spec = ModelSpec(classes=("a", "b"), target_mpp=2.0, normalization=Normalization((0, 0, 0), (1, 1, 1)),
                     architecture="resnet18", provenance=new_provenance(), fingerprint=he_fingerprint)
    assert ModelSpec.from_dict(spec.to_dict()).fingerprint == he_fingerprint  # round trip through JSON
    assert dataclasses.replace(spec, fingerprint=tampered).fingerprint == tampered  # loads; the edge ignores it
