"""edge-classify knows when not to answer: slides unlike the training data are flagged or refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from lowmag.synthetic import write_variant
from tests.edge.conftest import edge, ledger_states

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def mixed_folder(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real H&E slide and three slides built from its tissue that no H&E model should answer for."""
    folder = tmp_path_factory.mktemp("mixed")
    cmu = slides_dir / "aperio" / "CMU-1-Small-Region.svs"
    shutil.copy(cmu, folder / "he.svs")
    for kind in ("fluorescence", "greyscale", "blurred"):
        write_variant(cmu, folder / f"{kind}.tif", kind)
    return folder


def results(out: Path) -> dict[str, dict]:
    return {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in (out / "results").glob("*.json")}


def csv_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", encoding="utf-8") as handle:
        return {Path(row["slide"]).name: row for row in csv.DictReader(handle)}


def test_flag_mode_classifies_but_flags_each_unlike_slide_with_its_reason(he_bundle, mixed_folder, tmp_path):
    out = tmp_path / "out"
    run = edge("run", str(mixed_folder), "--model", str(he_bundle), "--out", str(out))

    assert run.returncode == 0, run.stderr
    docs = results(out)
    verdicts = {name: doc["distribution"] for name, doc in docs.items()}
    assert verdicts["he.svs"]["verdict"] == "in_distribution" and not verdicts["he.svs"]["reasons"]
    assert verdicts["he.svs"]["fingerprint"]["source"].startswith("Kather 2016")
    expected = {"fluorescence.tif": "background is dark", "greyscale.tif": "no colour", "blurred.tif": "out of focus"}
    for name, reason in expected.items():
        assert verdicts[name]["verdict"] == "out_of_distribution", (name, verdicts[name])
        assert any(reason in r for r in verdicts[name]["reasons"]), (name, verdicts[name]["reasons"])
        assert docs[name]["result"]["needs_review"] is True
        assert len(docs[name]["tissue"]) == 1  # the signal, boxed; not one box over the whole slide
    assert docs["he.svs"]["timings_ms"]["distribution"] >= 0
    rows = csv_rows(out)
    assert rows["fluorescence.tif"]["distribution"] == "out_of_distribution"
    assert "background is dark" in rows["fluorescence.tif"]["distribution_reasons"]
    assert rows["he.svs"]["distribution"] == "in_distribution"
    log = [line for line in run.stderr.splitlines() if " done " in line]
    assert sum("out_of_distribution:" in line for line in log) == 3
    status = edge("status", "--out", str(out))
    assert "training data: 1 like it, 3 unlike it (classified, need review), 0 unlike it (refused)" in status.stdout


def test_refuse_mode_records_unlike_slides_as_failed_with_the_reasons(he_bundle, mixed_folder, tmp_path):
    out = tmp_path / "out"
    run = edge("run", str(mixed_folder), "--model", str(he_bundle), "--out", str(out), "--ood", "refuse")

    assert run.returncode == 1 and "3 of 4 slide(s) failed" in run.stderr
    rows = csv_rows(out)
    assert rows["he.svs"]["status"] == "done"
    assert "trained on brightfield" in rows["fluorescence.tif"]["error"]
    assert "out of focus" in rows["blurred.tif"]["error"] and rows["blurred.tif"]["label"] == ""
    assert not (out / "results" / "blurred.tif.json").exists()  # never a label for a refused slide
    summary = json.loads(edge("status", "--out", str(out), "--json").stdout)
    assert summary["distribution"]["out_of_distribution_refused"] == 3
    assert {f["kind"] for f in summary["failed"]} == {"out_of_distribution"}


def test_an_ihc_image_is_flagged(he_bundle, slides_dir, tmp_path):
    out = tmp_path / "out"
    run = edge("run", str(slides_dir / "bad" / "untiled-ihc-no-mpp.tif"), "--model", str(he_bundle), "--out",
               str(out), "--assume-mpp", "2.0")
    assert run.returncode == 0, run.stderr
    [doc] = results(out).values()
    assert doc["distribution"]["verdict"] == "out_of_distribution"
    assert any("stain" in r for r in doc["distribution"]["reasons"])


def test_a_bundle_without_a_fingerprint_still_refuses_to_take_fluorescence_for_tissue(onnx_bundle, mixed_folder,
                                                                                       tmp_path):
    out = tmp_path / "out"
    run = edge("run", str(mixed_folder / "he.svs"), str(mixed_folder / "fluorescence.tif"), "--model",
               str(onnx_bundle), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("has no fingerprint of its training data") == 1
    verdicts = {name: doc["distribution"]["verdict"] for name, doc in results(out).items()}
    assert verdicts == {"he.svs": "unchecked", "fluorescence.tif": "out_of_distribution"}


def test_a_summary_csv_of_an_older_lowmag_is_kept_aside_not_mixed(onnx_bundle, mixed_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old_header = "finished_at,status,slide,sha256,label,confidence,needs_review,probabilities,tissue_pieces,ms,"
    (out / "summary.csv").write_text(old_header + "backend,bundle_sha256,result,error,result_id\nx,done,a,,,,,,,,,,,,\n")
    assert edge("run", str(mixed_folder / "he.svs"), "--model", str(onnx_bundle), "--out", str(out)).returncode == 0
    [kept] = out.glob("summary.*.csv")
    assert kept.read_text().startswith(old_header)
    assert list(csv_rows(out)) == ["he.svs"] and "distribution" in (out / "summary.csv").read_text().splitlines()[0]
    assert ledger_states(out)


def test_a_damaged_fingerprint_is_not_trusted_but_the_bundle_still_runs(he_fingerprint, mixed_folder, tmp_path):
    from tests.models import make_bundle

    bundle = make_bundle(tmp_path / "bundle", "onnx", fingerprint={**he_fingerprint, "threshold": 1000.0})
    out = tmp_path / "out"
    run = edge("run", str(mixed_folder / "he.svs"), str(mixed_folder / "fluorescence.tif"), "--model", str(bundle),
               "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "fingerprint of the training data is not used (the fingerprint does not match its sha256" in run.stderr
    verdicts = {name: doc["distribution"]["verdict"] for name, doc in results(out).items()}
    assert verdicts == {"he.svs": "unchecked", "fluorescence.tif": "out_of_distribution"}


def test_the_slide_statistics_gathered_beside_inference_are_those_of_all_its_tiles(he_bundle, slides_dir):
    """The reading thread summarises each tile as it reads it (issue 15): the verdict's features
    must be exactly those of every tile of every piece, skipped ones included."""
    from lowmag.bundle import load_bundle
    from lowmag.edge.backends import choose_backend, open_session
    from lowmag.edge.pipeline import PipelineConfig, SlideClassifier, tile_regions
    from lowmag.reader import read_at_mpp
    from lowmag.slide import open_slide

    bundle = load_bundle(he_bundle)
    classifier = SlideClassifier(bundle, open_session(bundle, choose_backend(bundle), None),
                                 PipelineConfig(max_piece_px=64))
    path = slides_dir / "aperio" / "CMU-1-Small-Region.svs"
    result = classifier.classify(path)
    assert sum(piece.tiles for piece in result.pieces) > 4  # several tiles: one left out would move the statistics
    stats = classifier.fingerprint.stats()
    with open_slide(path) as slide:
        for piece in result.pieces:
            for region in tile_regions(piece.box, piece.input_px, 64):
                stats.add(read_at_mpp(slide, bundle.spec.target_mpp, region))
    assert result.distribution.to_dict() == classifier.fingerprint.judge(stats.features(), stats.histogram()).to_dict()
    assert result.distribution.score is not None
