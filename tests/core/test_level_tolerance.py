"""``as_stored_within`` / ``edge-classify --level-tolerance``: a pyramid level within a few
percent of the model's µm/px is used as stored; nothing changes without it (issue 15, item 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowmag.reader import Region, choose_level, output_size, read_at_mpp, read_size, stored_window
from lowmag.slide import open_slide
from lowmag.synthetic import Blob, make_synthetic_slide
from tests.edge.conftest import edge


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    # 0.499 µm/px like the CMU-1 scans: level 4 is 7.984 µm/px.
    return make_synthetic_slide(tmp_path_factory.mktemp("tolerance") / "s.tif", 4096, 3072, mpp=0.499,
                                blobs=[Blob(1200, 1500, 700, 900), Blob(3100, 1200, 500, 450)])


def test_a_level_within_the_tolerance_is_returned_as_stored(slide_path):
    region = Region(500, 600, 1900, 1700)
    with open_slide(slide_path) as slide:
        level = slide.info.levels[4]
        assert level.mpp_x == pytest.approx(7.984, abs=1e-3)
        target = 7.92  # level 4 is 0.8 % coarser
        exact = read_at_mpp(slide, target, region)
        stored = read_at_mpp(slide, target, region, as_stored_within=0.01)
        x, y, w, h = stored_window(level, region)
        raw = slide.read_region(4, x, y, w, h)
        assert choose_level(slide, target) == 4  # the same level without a tolerance, but resampled
        assert exact.shape[:2][::-1] == output_size(slide, target, region)
        assert stored.shape[:2][::-1] == read_size(slide, target, region, 0.01) == (w, h)
        assert np.array_equal(stored, raw)
        assert exact.shape != stored.shape  # 120 x 107 resampled, 119 x 106 as stored
        # exact=True (training, parity checks) never takes the shortcut.
        assert np.array_equal(read_at_mpp(slide, target, region, exact=True, as_stored_within=0.05),
                              read_at_mpp(slide, target, region, exact=True))


def test_a_level_beyond_the_tolerance_is_resampled_from_a_finer_one(slide_path):
    region = Region(0, 0, 4096, 3072)
    with open_slide(slide_path) as slide:
        target = 7.984 / 1.015  # level 4 is 1.5 % coarser
        assert choose_level(slide, target, 0.01) == 3
        assert read_size(slide, target, region, 0.01) == output_size(slide, target, region)
        assert np.array_equal(read_at_mpp(slide, target, region, as_stored_within=0.01),
                              read_at_mpp(slide, target, region))
        assert choose_level(slide, target, 0.02) == 4
        assert read_at_mpp(slide, target, region, as_stored_within=0.02).shape[:2] == (192, 256)


def test_stored_windows_of_neighbouring_tiles_abut():
    from lowmag.slide import LevelInfo

    level = LevelInfo(4, 1000, 800, 16.03, 8.0, 8.0)
    left, right = Region(1000, 500, 777, 300), Region(1777, 500, 901, 300)
    (x0, _, w0, _), (x1, _, w1, _) = stored_window(level, left), stored_window(level, right)
    assert x0 + w0 == x1 and w1 >= 1
    # Rounded to the nearest level pixel, never past the level's edge.
    assert stored_window(level, Region(16000 - 5, 0, 200, 10))[0] + stored_window(
        level, Region(16000 - 5, 0, 200, 10))[2] <= 1000


def test_edge_classify_records_the_level_it_read_and_refuses_a_tolerance_over_5(tmp_path):
    from tests.models import make_bundle

    # A 5x model (2.0 µm/px) on a slide at 0.5075 µm/px: level 2 is 2.03 µm/px, 1.5 % coarser.
    slide = make_synthetic_slide(tmp_path / "coarse.tif", 1024, 768, mpp=0.5075,
                                 blobs=[Blob(300, 380, 200, 250), Blob(800, 300, 160, 160)])
    bundle = make_bundle(tmp_path / "bundle", "onnx", temperature=2.0)
    docs = {}
    for pct in ("0", "2"):
        out = tmp_path / f"out{pct}"
        done = edge("run", str(slide), "--model", str(bundle), "--out", str(out), "--threads", "1",
                    "--level-tolerance", pct)
        assert done.returncode == 0, done.stderr
        docs[pct] = json.loads((out / "results" / "coarse.tif.json").read_text())
    assert docs["0"]["reading"] == {"level": 1, "level_mpp": pytest.approx(1.015, abs=1e-3), "resampled": True,
                                    "level_tolerance_pct": 0.0}
    assert docs["2"]["reading"] == {"level": 2, "level_mpp": pytest.approx(2.03, abs=1e-3), "resampled": False,
                                    "level_tolerance_pct": 2.0}
    boxes = [[p["box_px"] for p in d["tissue"]] for d in docs.values()]
    assert boxes[0] == boxes[1] and len(boxes[0]) == 2  # the tissue step does not depend on it
    def pixels(doc):
        return sum(p["input_px"]["width"] * p["input_px"]["height"] for p in doc["tissue"])

    # As stored, a piece is its level's window: 1.5 % fewer pixels a side than at 2.0 µm/px.
    assert pixels(docs["2"]) < pixels(docs["0"])
    assert [p["label"] for p in docs["2"]["tissue"]] == [p["label"] for p in docs["0"]["tissue"]] == ["pink"] * 2

    refused = edge("run", str(slide), "--model", str(bundle), "--out", str(tmp_path / "x"), "--level-tolerance", "6")
    assert refused.returncode == 2 and "--level-tolerance" in refused.stderr and "0<=x<=5" in refused.stderr
