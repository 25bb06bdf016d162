#!/usr/bin/env bash
# What `edge-classify --level-tolerance` changes, on trained models (issue 15, item 6):
#   bash docs/level-tolerance.sh      (about 45 min on 2 cores, most of it training; needs ../shared/data
#                                      and the full-size slides of docs/edge-bench-fullsize.sh in .bench/slides)
# 1. the default recipe's 20x teacher and 1.25x student, one seed (train/configs/kather2016-1.25x.toml);
# 2. the student as ONNX FP32 and OpenVINO INT8, the teacher as ONNX FP32;
# 3. docs/level-tolerance.py: the students on the real CMU-1 region (three formats) and the
#    full-size slides, exact against 1 % and 2 %; the teacher on the held-out test tiles seen
#    -4 .. +4 % off its scale.
set -euo pipefail
SHARED=${SHARED:-../shared/data}
RUN=${RUN:-runs/kather2016-1.25x}
BUNDLES=${BUNDLES:-runs/kather2016-1.25x-bundles}
OUT=${OUT:-docs/level-tolerance}
SLIDES=$SHARED/slides

distill-train run train/configs/kather2016-1.25x.toml --out "$RUN"
distill-train splits "$RUN" --out "$RUN-splits"
STUDENT="$RUN/steps/distill-aux-both-scan_16"
TEACHER="$RUN/steps/teacher-scan"
CAL=(--calibration "$RUN-splits/unlabeled" --calibration-mpp 0.495)
# The held-out tiles gate the export and fit the temperature, as a lab's bundle would be made.
LABELED=(--eval-images "$RUN-splits/test" --val-images "$RUN-splits/val" --mpp 0.495 --center-crop 144)
[ -d "$BUNDLES/student-onnx-fp32" ] || export-student "$STUDENT" --target onnx --precision fp32 \
  --out "$BUNDLES/student-onnx-fp32" "${CAL[@]}" "${LABELED[@]}" --calibration-size 200
[ -d "$BUNDLES/student-openvino-int8" ] || export-student "$STUDENT" --target openvino --precision int8 \
  --out "$BUNDLES/student-openvino-int8" "${CAL[@]}" "${LABELED[@]}" --calibration-size 200
[ -d "$BUNDLES/teacher-onnx-fp32" ] || export-student "$TEACHER" --target onnx --precision fp32 \
  --out "$BUNDLES/teacher-onnx-fp32" "${CAL[@]}" --calibration-size 50

python docs/level-tolerance.py --bundle "$BUNDLES/student-onnx-fp32" --bundle "$BUNDLES/student-openvino-int8" \
  --slide "$SLIDES/generic-tiff/CMU-1-Small-Region-pyramid.tif" --slide "$SLIDES/aperio/CMU-1-Small-Region.svs" \
  --slide "$SLIDES/dicom/CMU-1-Small-Region" \
  --slide .bench/slides/fullsize-20x15mm.tif --slide .bench/slides/fullsize-30x22mm.tif \
  --tolerance 1 --tolerance 2 \
  --labeled-bundle "$BUNDLES/teacher-onnx-fp32" --images "$RUN-splits/test" --mpp 0.495 --center-crop 144 \
  --out "$OUT"
