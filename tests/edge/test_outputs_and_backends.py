"""What each slide's outputs hold, the CSV under concurrent writers and crashes, backend choice."""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
from pathlib import Path

import pytest

from lowmag.bundle import load_bundle
from lowmag.edge.backends import choose_backend
from lowmag.edge.results import CSV_COLUMNS, RESULT_SCHEMA, append_csv, csv_row
from lowmag.runtimes import RuntimeUnavailableError
from lowmag.synthetic import Blob
from tests.edge.conftest import edge
from tests.models import make_bundle


def test_run_writes_json_geojson_thumbnail_and_a_csv_row(onnx_bundle, slide_factory, tmp_path):
    import pyvips

    slide = slide_factory("two.tif", 1024, 768, blobs=(Blob(300, 380, 200, 250), Blob(800, 300, 160, 160)))
    out = tmp_path / "out"
    result = edge("run", str(slide), "--model", str(onnx_bundle), "--out", str(out), "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "1 done, 0 failed" in result.stdout
    assert "label=pink" in result.stderr and "ms=" in result.stderr  # one log line per slide

    doc = json.loads((out / "results" / "two.tif.json").read_text())
    assert doc["schema"] == RESULT_SCHEMA
    assert doc["slide"]["path"] == str(slide) and doc["slide"]["format"] == "generic-tiff"
    assert doc["slide"]["size_bytes"] == slide.stat().st_size and len(doc["slide"]["sha256"]) == 64
    assert doc["slide"]["mpp"] == pytest.approx(0.5)
    assert doc["model"]["mpp"] == 2.0 and doc["model"]["magnification"] == "5x"
    assert doc["model"]["bundle_sha256"] == load_bundle(onnx_bundle).sha256
    assert doc["runtime"] == {"backend": "onnxruntime", "device": "cpu", "threads": 1}
    assert len(doc["tissue"]) == 2
    piece = doc["tissue"][0]
    assert piece["box_um"]["width"] == pytest.approx(piece["box_px"]["width"] * 0.5, abs=0.1)
    assert set(piece["probabilities"]) == {"pink", "glass"} and piece["label"] in ("pink", "glass")
    assert doc["result"]["label"] == "pink" and isinstance(doc["result"]["needs_review"], bool)
    assert set(doc["timings_ms"]) >= {"read", "resample", "tissue", "inference", "write", "total"}
    assert doc["lowmag_version"]

    geo = json.loads((out / "results" / "two.tif.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 2
    feature = geo["features"][0]
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"]["name"] == piece["label"]
    ring = feature["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and ring[0] == [piece["box_px"]["x"], piece["box_px"]["y"]]

    thumb = pyvips.Image.new_from_file(str(out / "results" / "two.tif.png"))
    assert max(thumb.width, thumb.height) <= 1024 and thumb.bands == 3

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 1 and rows[0]["status"] == "done" and rows[0]["label"] == "pink"
    assert rows[0]["result"].endswith("two.tif.json")
    # No stray temporary files from the atomic writes.
    assert not [p for p in (out / "results").iterdir() if p.name.startswith(".")]


def _append_many(args: tuple[str, int]) -> None:
    path, worker = args
    for i in range(50):
        append_csv(Path(path), csv_row("done", Path(f"/scans/w{worker}-{i}.svs"), f"{worker}.{i}"))


def test_csv_rows_never_interleave_across_processes_and_a_torn_row_is_cut(tmp_path, caplog):
    path = tmp_path / "summary.csv"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(str(path), w) for w in range(4)])
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 200 and len({r["result_id"] for r in rows}) == 200
    assert path.read_text().count(",".join(CSV_COLUMNS)) == 1

    with path.open("a") as handle:  # a crash in the middle of a row
        handle.write("2026-11-22T00:00:00+00:00,done,/scans/torn")
    with caplog.at_level(logging.WARNING):
        append_csv(path, csv_row("done", Path("/scans/after.svs"), "after"))
    assert "torn" in caplog.text
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 201 and rows[-1]["slide"] == "/scans/after.svs"
    # A slide retried after a crash does not get a second row.
    assert not append_csv(path, csv_row("done", Path("/scans/after.svs"), "after"), skip_if_present=True)
    assert len(list(csv.DictReader(path.open()))) == 201


def test_auto_runs_each_bundle_on_its_gated_runtime(onnx_bundle, openvino_bundle):
    choice = choose_backend(load_bundle(onnx_bundle))
    assert (choice.backend, choice.device, choice.warnings) == ("onnxruntime", "cpu", ())
    choice = choose_backend(load_bundle(openvino_bundle))
    assert (choice.backend, choice.device, choice.model.name) == ("openvino", "cpu", "model.xml")


def test_a_tensorrt_bundle_without_tensorrt_falls_back_loudly_to_its_onnx(tmp_path, slide_factory):
    pytest.importorskip("onnx")
    bundle = make_bundle(tmp_path / "trt", "tensorrt")
    choice = choose_backend(load_bundle(bundle))
    assert choice.backend == "onnxruntime" and choice.model.name == "model.onnx"
    assert choice.warnings and "TensorRT" in choice.warnings[0]

    out = tmp_path / "out"
    result = edge("run", str(slide_factory()), "--model", str(bundle), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "instead" in result.stderr
    with pytest.raises(RuntimeUnavailableError, match="TensorRT"):
        choose_backend(load_bundle(bundle), "tensorrt")


def test_asking_for_what_is_not_here_is_an_error(onnx_bundle, tmp_path):
    bundle = load_bundle(onnx_bundle)
    with pytest.raises(RuntimeUnavailableError, match="needs a TensorRT bundle"):
        choose_backend(bundle, "tensorrt")
    from lowmag.edge.backends import ort_cuda_available

    if not ort_cuda_available():
        with pytest.raises(RuntimeUnavailableError, match="--device gpu"):
            choose_backend(bundle, "onnxruntime", "gpu")
    result = edge("run", str(tmp_path), "--model", str(onnx_bundle), "--out", str(tmp_path / "o"),
                  "--backend", "tensorrt")
    assert result.returncode == 1 and "export-student" in result.stderr and "Traceback" not in result.stderr


def test_an_onnx_bundle_on_openvino_computes_in_f32_as_its_gate_did(onnx_bundle):
    from lowmag.edge.backends import open_session

    bundle = load_bundle(onnx_bundle)
    session = open_session(bundle, choose_backend(bundle, "openvino"), threads=1)
    precision = str(session.compiled.get_property("INFERENCE_PRECISION_HINT"))
    assert "float32" in precision or "f32" in precision, precision  # not bf16 on CPUs that have it


def test_onnx_runtime_workers_do_not_spin_between_runs(onnx_bundle):
    # Spinning workers took the core the next piece's read needs (README: threads).
    from lowmag.edge.backends import open_session

    bundle = load_bundle(onnx_bundle)
    session = open_session(bundle, choose_backend(bundle, "onnxruntime"))
    options = session.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
