"""Knowing when not to answer: the training data's fingerprint against real and altered tissue."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lowmag.errors import SpecError
from lowmag.fingerprint import Fingerprint, StainStats, image_stats, usable
from lowmag.reader import read_at_mpp
from lowmag.slide import open_slide
from lowmag.synthetic import write_variant
from lowmag.tissue import find_tissue

from ..conftest import BUNDLE_MPP, kather_split, read_tiles


def judge_slide(fingerprint: Fingerprint, path: Path, assume_mpp: float | None = None):
    """As the edge runner does: tissue step, then statistics of the pieces read at the model's µm/px."""
    with open_slide(path, assume_mpp=assume_mpp) as slide:
        finding = find_tissue(slide)
        stats = StainStats()
        for box in finding.boxes:
            stats.add(read_at_mpp(slide, BUNDLE_MPP, box.region))
    modality = () if finding.modality.brightfield else (finding.modality.reason,)
    return finding, fingerprint.judge(stats.features(), stats.histogram(), modality)


@pytest.fixture(scope="module")
def fingerprint(he_fingerprint) -> Fingerprint:
    return Fingerprint(he_fingerprint)


def test_the_threshold_lets_held_out_he_tiles_pass_and_test_tiles_raise_few_alarms(fingerprint):
    data = fingerprint.data
    assert data["held_out_pass_rate"] >= 0.98 and data["threshold"] >= 4.0 and not fingerprint.check()
    test = [image_stats(rgb) for rgb in read_tiles(kather_split(every=3)["test"])]
    checked = [fingerprint.judge(*stats) for stats in test if usable(stats[0])]
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


def test_statistics_accumulate_over_pieces_as_over_one_image(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        rgb = read_at_mpp(slide, BUNDLE_MPP)
    whole = StainStats()
    whole.add(rgb)
    halves = StainStats()
    halves.add(rgb[:, : rgb.shape[1] // 2])
    halves.add(rgb[:, rgb.shape[1] // 2:])
    a, b = whole.features(), halves.features()
    for name in ("od_total", "od_r_share", "eosin_share", "saturation", "tissue_fraction"):
        assert a[name] == pytest.approx(b[name], rel=1e-3), name
    assert np.allclose(whole.histogram(), halves.histogram())


def test_a_damaged_fingerprint_is_refused_with_the_spec(he_fingerprint, tmp_path):
    from lowmag.spec import ModelSpec, Normalization, new_provenance

    tampered = {**he_fingerprint, "threshold": 1000.0}  # someone silenced the check by hand
    assert Fingerprint(tampered).check() == ["the fingerprint does not match its sha256 (edited or damaged)"]
    spec = ModelSpec(classes=("a", "b"), target_mpp=2.0, normalization=Normalization((0, 0, 0), (1, 1, 1)),
                     architecture="resnet18", provenance=new_provenance(), fingerprint=he_fingerprint)
    with pytest.raises(SpecError, match="fingerprint: the fingerprint does not match its sha256"):
        dataclasses.replace(spec, fingerprint=tampered)
    assert ModelSpec.from_dict(spec.to_dict()).fingerprint == he_fingerprint  # round trip through JSON
