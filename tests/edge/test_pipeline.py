"""The per-slide pipeline with real runtimes on real pyramidal TIFFs."""

from __future__ import annotations

import numpy as np
import pytest

from lowmag.bundle import load_bundle
from lowmag.edge.backends import choose_backend, open_session
from lowmag.edge.pipeline import (
    STAGES, NoTissueError, PipelineConfig, ResolutionTooCoarseError, SlideClassifier, tile_regions,
    tiles_to_run,
)
from lowmag.errors import SlideTooLargeError
from lowmag.synthetic import Blob
from lowmag.tissue import TissueBox


def classifier(bundle_dir, **config) -> SlideClassifier:
    bundle = load_bundle(bundle_dir)
    session = open_session(bundle, choose_backend(bundle), threads=1)
    return SlideClassifier(bundle, session, PipelineConfig(**config))


def test_a_slide_is_classified_piece_by_piece_with_calibrated_probabilities(onnx_bundle, slide_factory):
    path = slide_factory("two.tif", 1024, 768, blobs=(Blob(300, 380, 200, 250), Blob(800, 300, 160, 160)))
    result = classifier(onnx_bundle).classify(path)
    assert len(result.pieces) == 2
    assert result.label == "pink"
    for piece in result.pieces:
        assert piece.probabilities.sum() == pytest.approx(1.0)
        assert piece.tiles == 1
        # 0.5 µm/px slide read at the bundle's 2 µm/px: a quarter of the box on each side
        assert piece.input_px[0] == pytest.approx(piece.box.width / 4, abs=1)
    # The slide's probabilities are the tissue-area-weighted mean of the pieces'.
    areas = np.array([p.box.tissue_area_um2 for p in result.pieces])
    expected = (np.stack([p.probabilities for p in result.pieces]) * areas[:, None]).sum(0) / areas.sum()
    np.testing.assert_allclose(result.probabilities, expected)
    # Temperature 2 makes the model less sure than its raw logits say.
    raw = classifier(onnx_bundle).session.run(np.full((1, 16, 16, 3), (222, 140, 185), np.uint8))["logits"][0]
    assert result.confidence < np.exp(raw.max()) / np.exp(raw).sum()
    timings = result.timer.ms()
    assert set(STAGES) <= set(timings) and timings["total"] >= timings["inference"] > 0
    assert timings["read"] > 0 and timings["tissue"] > 0


def test_the_hash_beside_the_stages_has_its_cpu_time_counted(onnx_bundle, slide_factory, tmp_path):
    """The hash runs in a thread beside the stages and its stage is only the wait for it, so
    its cost shows as CPU time (edge-classify bench's hash CPU column): it grows with the
    file's bytes, and a thread that waits is not counted."""
    import time

    from lowmag.edge.pipeline import Timer

    path = slide_factory("hashed.tif", 1024, 768, blobs=(Blob(300, 380, 200, 250),))
    big = tmp_path / "big.tif"  # the same slide with 96 MB of trailing bytes no reader looks at
    big.write_bytes(path.read_bytes() + bytes(96 << 20))
    model = classifier(onnx_bundle)
    small_cpu = model.classify(path).timer.cpu_beside["hash"]
    big_result = model.classify(big)
    big_cpu = big_result.timer.cpu_beside["hash"]
    assert big_result.label == "pink" and big_cpu > small_cpu
    assert big_cpu > 0.02  # sha256 of 96 MB: about 0.08 s of a core at 1.2 GB/s
    assert "hash" in big_result.timer.ms()  # the stage: the wait at the end, however short

    timer = Timer()
    timer.beside("sleep", lambda: time.sleep(0.3))()
    assert timer.cpu_beside["sleep"] < 0.1  # waiting is not CPU time


def test_large_pieces_are_tiled_and_agree_with_the_whole_piece(onnx_bundle, slide_factory):
    path = slide_factory("big-piece.tif", 1600, 1200, blobs=(Blob(800, 600, 700, 520),))
    whole = classifier(onnx_bundle).classify(path)
    tiled = classifier(onnx_bundle, max_piece_px=128).classify(path)
    assert whole.pieces[0].tiles == 1
    assert tiled.pieces[0].tiles == 9  # 350 x 260 px at 2 µm/px: a 3 x 3 grid of tiles under 128 px
    assert tiled.label == whole.label
    assert abs(tiled.confidence - whole.confidence) < 0.1


def test_tile_grid_covers_the_box_exactly():
    box = TissueBox(10, 20, 1001, 503, 0.5, 0.5, 1.0)
    regions = tile_regions(box, (250, 126), 100)
    assert len(regions) == 3 * 2
    assert sum(r.width * r.height for r in regions) == 1001 * 503
    assert min(r.x for r in regions) == 10 and max(r.x + r.width for r in regions) == 1011


def test_near_blank_tiles_are_skipped_and_a_blank_piece_rests_on_its_best_tile():
    """The one rule the pipeline and the bench floor share (edge.pipeline.tiles_to_run)."""
    glass = np.full((32, 32, 3), 240, np.uint8)
    tissue = np.full((32, 32, 3), (222, 140, 185), np.uint8)  # strongly stained: every pixel counts
    speck = glass.copy()
    speck[:2, :8] = tissue[:2, :8]  # 16 of 1024 pixels: 1.6 %, under the 5 % floor
    more = glass.copy()
    more[:4, :8] = tissue[:4, :8]   # 3.1 %: still blank, but the better of the two

    def run(tiles):  # (index of each tile classified, its weight)
        return [(next(i for i, t in enumerate(tiles) if t is rgb), weight)
                for rgb, weight in tiles_to_run(iter(tiles), len(tiles), 0.1, 0.05)]

    assert run([glass, tissue, speck]) == [(1, 1.0)]
    assert run([speck, more, glass]) == [(1, 1.0)]   # all near-blank: the best, at weight 1
    assert run([glass]) == [(0, 1.0)]                 # a piece of one tile is always classified
    half = glass.copy()
    half[:16] = tissue[:16]
    assert run([half, tissue]) == [(0, 0.5), (1, 1.0)]  # weights: the stained share
    # Streaming: the first kept tile comes out before the next one is read.
    read = []

    def reads():
        for tile in (tissue, glass, tissue):
            read.append(tile)
            yield tile

    stream = tiles_to_run(reads(), 3, 0.1, 0.05)
    next(stream)
    assert len(read) == 1


def test_pieces_smaller_than_the_graph_minimum_are_padded(tmp_path, slide_factory):
    from tests.models import make_bundle

    bundle = make_bundle(tmp_path / "b", target_mpp=16.0)  # 0.625x: a 170 µm box is 11 px
    path = slide_factory("speck.tif", 1024, 1024, blobs=(Blob(512, 512, 140, 140),))
    result = classifier(bundle).classify(path)
    assert result.pieces and max(result.pieces[0].input_px) < 16  # the graph refuses < 16 px unpadded
    assert result.probabilities.sum() == pytest.approx(1.0)


def test_refusals_name_the_slide_and_the_fix(onnx_bundle, slide_factory, tmp_path):
    from lowmag.synthetic import make_synthetic_slide

    path = slide_factory("budget.tif", 1024, 768)
    with pytest.raises(SlideTooLargeError, match="pixel-budget") as error:
        classifier(onnx_bundle, pixel_budget=1000).classify(path)
    assert str(path) in str(error.value)

    blank = make_synthetic_slide(tmp_path / "blank.tif", 512, 512, mpp=0.5, blobs=[])
    with pytest.raises(NoTissueError, match="no tissue"):
        classifier(onnx_bundle).classify(blank)

    coarse = make_synthetic_slide(tmp_path / "coarse.tif", 512, 512, mpp=4.0)
    with pytest.raises(ResolutionTooCoarseError, match="coarser than the model"):
        classifier(onnx_bundle).classify(coarse)


def test_openvino_and_onnx_runtime_agree(onnx_bundle, openvino_bundle, slide_factory):
    path = slide_factory("two.tif", 1024, 768, blobs=(Blob(300, 380, 200, 250), Blob(800, 300, 160, 160)))
    a = classifier(onnx_bundle).classify(path)
    b = classifier(openvino_bundle).classify(path)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-3)  # float sums in another order


def test_pieces_are_read_one_ahead_in_order_and_a_read_error_reaches_the_caller():
    import threading
    import time

    from lowmag.edge.pipeline import Prefetched

    threads, started = set(), []

    def read(i, cancelled):
        threads.add(threading.current_thread().name)
        started.append(i)
        if i == 3:
            raise ValueError("bad piece 3")
        return np.full((2, 2, 3), i, np.uint8)

    with Prefetched(list(range(6)), read) as reads:
        assert int(reads.next()[0, 0, 0]) == 0
        time.sleep(0.2)
        assert started == [0, 1]  # one ahead of the caller, never more
        assert [int(reads.next()[0, 0, 0]) for _ in range(2)] == [1, 2]
        with pytest.raises(ValueError, match="bad piece 3"):
            reads.next()
    assert threads == {"lowmag-read"}  # read beside the caller, not in it
    assert 4 not in started  # nothing read after the failed piece


def test_leaving_early_cancels_the_read_in_progress():
    import time

    from lowmag.edge.pipeline import Prefetched

    def slow_read(i, cancelled):  # a long read that asks between blocks whether to stop
        for _ in range(200):
            if cancelled():
                raise RuntimeError("stopped between blocks")
            time.sleep(0.01)
        return np.zeros((1, 1, 3), np.uint8)

    tick = time.perf_counter()
    with pytest.raises(KeyError):
        with Prefetched(list(range(100)), slow_read):
            raise KeyError("inference failed")  # before any read finished
    assert time.perf_counter() - tick < 1.0  # not the 2 s the read would take
