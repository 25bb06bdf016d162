"""Many workers in one process: libvips from several Python threads at once.

CI once lost a watcher to a segmentation fault with 2 workers on 200 slides. The fault was
a libvips worker thread calling a null function pointer while several Python threads ran
libvips operations; it reproduced in about 3 of 10 runs of 8 threads x 100 slides, and in
none of 16 once the edge runner turned libvips' operation cache off.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from lowmag.synthetic import Blob
from tests.edge.conftest import REPO


def test_the_runner_turns_off_the_libvips_operation_cache(onnx_bundle, tmp_path):
    pyvips = pytest.importorskip("pyvips")
    from lowmag.bundle import load_bundle
    from lowmag.edge.backends import choose_backend
    from lowmag.edge.ledger import Ledger
    from lowmag.edge.runner import EdgeRunner

    before = pyvips.cache_get_max()
    try:
        pyvips.cache_set_max(100)
        bundle = load_bundle(onnx_bundle)
        ledger = Ledger(tmp_path)
        try:
            EdgeRunner(tmp_path, ledger, bundle, choose_backend(bundle))
        finally:
            ledger.close()
        assert pyvips.cache_get_max() == 0
    finally:
        pyvips.cache_set_max(before)


_STRESS = """
import sys, threading
from pathlib import Path
from lowmag.bundle import load_bundle
from lowmag.edge.backends import choose_backend, open_session
from lowmag.edge.pipeline import PipelineConfig, SlideClassifier
from lowmag.edge.results import write_slide_outputs
from lowmag.edge.runner import vips_for_worker_threads

vips_for_worker_threads()
bundle = load_bundle(Path(sys.argv[1]))
slide, out = Path(sys.argv[2]), Path(sys.argv[3])
choice = choose_backend(bundle)
errors = []

def work(k):
    try:
        classifier = SlideClassifier(bundle, open_session(bundle, choice, 1), PipelineConfig())
        for i in range(120):
            result = classifier.classify(slide, [slide])
            write_slide_outputs(out / str(k), f"s{i}.tif", result, bundle, choice, 1, 0.6)
    except Exception as error:
        errors.append(repr(error))

threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("errors", errors)
sys.exit(1 if errors else 0)
"""


@pytest.mark.slow
def test_eight_threads_classify_960_slides_in_one_process_without_a_crash(onnx_bundle, slide_factory, tmp_path):
    """What the workers do, 8 at once on one slide file, as the runner configures libvips
    (about 90 s on 2 cores; without the fix it crashed in about a third of the runs)."""
    one = slide_factory("threads.tif", 384, 384, blobs=(Blob(192, 192, 150, 150),))
    result = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _STRESS, str(onnx_bundle), str(one),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert len(list((tmp_path / "out").glob("*/results/*.json"))) == 960
