"""Per-slide time of the edge pipeline, for a before/after comparison of two commits on the
same machine in one sitting (issue 15). Run it with the code under test importable as
``lowmag`` (for an old commit, lay that commit out as the installed package would:
lowmag/ with edge/, train/, export/ and calibration/ copied in as subpackages, and put the
folder first on PYTHONPATH):

    python docs/edge-before-after.py                                   # this checkout
    PYTHONPATH=/tmp/oldpkg python docs/edge-before-after.py             # another commit

Needs the bundles of docs/edge-bench-fullsize.sh and ../shared/data. Stop other work first.
"""

import statistics
import time
from pathlib import Path

import lowmag
from lowmag.bundle import load_bundle
from lowmag.edge.backends import choose_backend, open_session
from lowmag.edge.pipeline import SlideClassifier

BUNDLES = Path("runs/kather2016-bench-1.25x-bundles")
SLIDES = [".bench/slides/fullsize-20x15mm.tif", ".bench/slides/fullsize-30x22mm.tif",
          "../shared/data/slides/aperio/CMU-1-Small-Region.svs",
          "../shared/data/slides/generic-tiff/CMU-1-Small-Region-pyramid.tif",
          "../shared/data/slides/dicom/CMU-1-Small-Region"]

print("lowmag from", Path(lowmag.__file__).parent)
for name in ("student-openvino-int8", "student-onnx-fp32"):
    bundle = load_bundle(BUNDLES / name)
    classifier = SlideClassifier(bundle, open_session(bundle, choose_backend(bundle), None))
    for slide in SLIDES:
        seconds = []
        for _ in range(3):
            tick = time.perf_counter()
            result = classifier.classify(Path(slide))
            seconds.append(time.perf_counter() - tick)
        ms = result.timer.ms()
        print(f"{name} {Path(slide).name}: first {seconds[0] * 1000:.0f} ms, then {statistics.median(seconds[1:]) * 1000:.0f} "
              f"ms; tissue {ms['tissue']:.0f} ms, hash {ms['hash']:.0f} ms")
