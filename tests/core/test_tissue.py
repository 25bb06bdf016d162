"""Tissue localisation on synthetic slides whose tissue pieces are known."""

import numpy as np
import pytest

from lowmag.slide import open_slide
from lowmag.synthetic import make_synthetic_slide
from lowmag.tissue import TissueParams, locate_tissue

from ..conftest import SYNTHETIC_BLOBS


def test_each_piece_gets_one_box_that_encloses_it_snugly(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        boxes = locate_tissue(slide)
    assert len(boxes) == len(SYNTHETIC_BLOBS)
    for blob in SYNTHETIC_BLOBS:
        bx, by, bw, bh = blob.bbox
        matches = [b for b in boxes if b.x <= bx + 8 and b.y <= by + 8
                   and b.x + b.width >= bx + bw - 8 and b.y + b.height >= by + bh - 8]
        assert len(matches) == 1, blob
        box = matches[0]
        # Snug: at most the 16 µm padding plus a couple of analysis pixels larger.
        assert box.width <= bw + 2 * (16 / 0.5) + 16 and box.height <= bh + 2 * (16 / 0.5) + 16
        ellipse_area_um2 = np.pi * blob.rx * blob.ry * 0.5 * 0.5
        assert box.tissue_area_um2 == pytest.approx(ellipse_area_um2, rel=0.1)
        assert box.to_dict()["width_um"] == pytest.approx(box.width * 0.5)


def test_blank_glass_yields_an_empty_list(tmp_path):
    path = make_synthetic_slide(tmp_path / "blank.tif", 1024, 768, mpp=0.5, blobs=[])
    with open_slide(path) as slide:
        assert locate_tissue(slide) == []


def test_flat_colour_patches_are_not_tissue(tmp_path):
    pixels = np.full((768, 1024, 3), 250, dtype=np.uint8)
    pixels[100:400, 100:500] = (255, 0, 0)
    pixels[300:700, 450:900] = (0, 0, 255)
    path = make_synthetic_slide(tmp_path / "boxes.tif", 1024, 768, mpp=0.5, pixels=pixels)
    with open_slide(path) as slide:
        assert locate_tissue(slide) == []


def test_minimum_area_drops_small_pieces(synthetic_slide):
    small_blob_um2 = np.pi * SYNTHETIC_BLOBS[1].rx * SYNTHETIC_BLOBS[1].ry * 0.25
    with open_slide(synthetic_slide) as slide:
        boxes = locate_tissue(slide, TissueParams(min_area_um2=small_blob_um2 * 1.5))
    assert len(boxes) == 1
