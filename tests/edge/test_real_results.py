"""Issue 15's faster pipeline answers exactly as before on the real slides.

``real_slide_results.json`` holds what the pipeline said at e2a3f1b (before issue 15) for a
deterministic FP32 model (tests.models.make_bundle: mean colour, fixed weights) at 5x and
1.25x: each piece's box, input size and probabilities, and the slide's. Every piece must
keep its box and size, and every probability must stay within 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lowmag.bundle import load_bundle
from lowmag.edge.backends import choose_backend, open_session
from lowmag.edge.pipeline import PipelineConfig, SlideClassifier
from tests.models import make_bundle

pytestmark = pytest.mark.shared_data

RECORDED = json.loads((Path(__file__).parent / "real_slide_results.json").read_text())
ASSUMED = {"aperio/TCGA-CR-7395-frozen-jp2k-no-mpp.svs": 0.25}


@pytest.mark.parametrize("mpp", ["2.0", "8.0"])
def test_real_slides_get_the_same_pieces_and_probabilities_as_before(slides_dir, tmp_path, mpp):
    bundle = load_bundle(make_bundle(tmp_path / "bundle", "onnx", target_mpp=float(mpp), temperature=2.0))
    session = open_session(bundle, choose_backend(bundle), None)
    for name, by_mpp in RECORDED.items():
        want = by_mpp[mpp]
        result = SlideClassifier(bundle, session, PipelineConfig(assume_mpp=ASSUMED.get(name))).classify(
            slides_dir / name)
        assert result.label == want["label"], name
        np.testing.assert_allclose(result.probabilities, want["probabilities"], rtol=0, atol=1e-6, err_msg=name)
        assert len(result.pieces) == len(want["pieces"]), name
        for piece, recorded in zip(result.pieces, want["pieces"]):
            assert [piece.box.x, piece.box.y, piece.box.width, piece.box.height, *piece.input_px] == recorded[:6]
            np.testing.assert_allclose(piece.probabilities, recorded[6:], rtol=0, atol=1e-6, err_msg=name)
