#!/usr/bin/env bash
# Issue 15's throughput report: what a slide costs at the size labs scan, against the floor
# and the conventional 20x pipeline (FP32 ONNX and INT8 OpenVINO), on this machine.
#   bash docs/edge-bench-fullsize.sh        (about 25 min on 2 cores; needs ../shared/data)
# 1. a 1.25x student and its teacher, one epoch each (train/configs/kather2016-bench-1.25x.toml:
#    the graphs and inputs of trained models, predictions meaningless);
# 2. their bundles: the student as OpenVINO INT8 and ONNX FP32, the teacher as ONNX FP32 and
#    OpenVINO INT8 (what a lab would deploy at 20x);
# 3. full-size slides of real tissue (edge-classify bench-slides, kept in .bench/slides);
# 4. edge-classify bench on them and on the real CMU-1 region in three formats.
# Stop other work first: the numbers are timings.
set -euo pipefail
SHARED=${SHARED:-../shared/data}
RUN=${RUN:-runs/kather2016-bench-1.25x}
BUNDLES=${BUNDLES:-runs/kather2016-bench-1.25x-bundles}
OUT=${OUT:-docs/edge-bench-fullsize}
CMU1="$SHARED/slides/aperio/CMU-1-Small-Region.svs"

distill-train run train/configs/kather2016-bench-1.25x.toml --out "$RUN"
STUDENT="$RUN/steps/distill-labeled-both-scan_16"
TEACHER="$RUN/steps/teacher-scan"
# At 7.92 µm/px no 224 px window of the CMU-1 region is half tissue: the student calibrates
# on tumour and stroma tiles; the teacher on the CMU-1 region.
TILES=(--calibration "$SHARED/kather2016/01_TUMOR" --calibration "$SHARED/kather2016/02_STROMA"
       --calibration-mpp 0.495)
[ -d "$BUNDLES/student-openvino-int8" ] || export-student "$STUDENT" --target openvino --precision int8 \
  --out "$BUNDLES/student-openvino-int8" "${TILES[@]}" --calibration-size 200
[ -d "$BUNDLES/student-onnx-fp32" ] || export-student "$STUDENT" --target onnx --precision fp32 \
  --out "$BUNDLES/student-onnx-fp32" "${TILES[@]}" --calibration-size 200
[ -d "$BUNDLES/teacher-onnx-fp32" ] || export-student "$TEACHER" --target onnx --precision fp32 \
  --out "$BUNDLES/teacher-onnx-fp32" --calibration "$CMU1" --calibration-size 50
[ -d "$BUNDLES/teacher-openvino-int8" ] || export-student "$TEACHER" --target openvino --precision int8 \
  --out "$BUNDLES/teacher-openvino-int8" --calibration "$CMU1" --calibration-size 100

edge-classify bench-slides .bench/slides --tissue "$CMU1" --tiles "$SHARED/kather2016"

edge-classify bench --models "$BUNDLES/student-openvino-int8" "$BUNDLES/student-onnx-fp32" \
  --slides .bench/slides/fullsize-20x15mm.tif .bench/slides/fullsize-30x22mm.tif "$CMU1" \
  "$SHARED/slides/generic-tiff/CMU-1-Small-Region-pyramid.tif" "$SHARED/slides/dicom/CMU-1-Small-Region" \
  --reference "$BUNDLES/teacher-onnx-fp32" "$BUNDLES/teacher-openvino-int8" --reference-repeats 1 \
  --repeats 3 --out "$OUT"
