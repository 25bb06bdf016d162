"""Cut labeled tiles from the demo slide for a tiny distill-train run.

Labels come from lowmag's own tissue mask: a tile that is almost all tissue is "tissue",
one with almost none is "background"; mixed tiles are left out. Tiles of one 4x4 block of
the grid share a group, so the split never puts neighbours on both sides.
Usage: make_tiles.py SLIDE OUT_DIR   (tiles are written at 1 µm/px, 64 px)
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pyvips

from lowmag import open_slide, read_at_mpp
from lowmag.tissue import tissue_mask

MPP, SIDE = 1.0, 64


def main(slide_path: str, out: str) -> None:
    root = Path(out)
    with open_slide(slide_path) as slide:
        rgb = read_at_mpp(slide, MPP)
    mask = tissue_mask(rgb, MPP)
    rows = []
    for y in range(0, rgb.shape[0] - SIDE + 1, SIDE):
        for x in range(0, rgb.shape[1] - SIDE + 1, SIDE):
            fraction = mask[y : y + SIDE, x : x + SIDE].mean()
            label = "tissue" if fraction > 0.9 else "background" if fraction < 0.02 else None
            if label is None:
                continue
            rel = f"{label}/{y}_{x}.png"
            (root / label).mkdir(parents=True, exist_ok=True)
            tile = np.ascontiguousarray(rgb[y : y + SIDE, x : x + SIDE])
            pyvips.Image.new_from_array(tile, interpretation="srgb").pngsave(str(root / rel))
            rows.append({"path": rel, "label": label, "block": f"{y // (4 * SIDE)}_{x // (4 * SIDE)}"})
    with open(root / "tiles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "block"])
        writer.writeheader()
        writer.writerows(rows)
    counts = {name: sum(r["label"] == name for r in rows) for name in ("tissue", "background")}
    print(f"{len(rows)} tiles at {MPP} µm/px in {root}: {counts}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
