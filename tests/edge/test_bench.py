"""``edge-classify bench``: every column filled, the conventional reference measured beside."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowmag.synthetic import Blob
from tests.edge.conftest import edge
from tests.models import make_bundle


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip("|").split("|")]


def labeled_folder(root):
    import pyvips

    for name, colour in (("pink", (222, 140, 185)), ("glass", (240, 240, 240))):
        (root / name).mkdir(parents=True)
        for i in range(6):
            rng = np.random.default_rng(i)
            pixels = np.clip(np.array(colour) + rng.normal(0, 8, (96, 96, 3)), 0, 255).astype(np.uint8)
            pyvips.Image.new_from_array(pixels, interpretation="srgb").write_to_file(str(root / name / f"{i}.png"))
    return root


def test_bench_reports_every_student_on_every_runtime_against_the_reference(
        onnx_bundle, openvino_bundle, slide_factory, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i, blobs in enumerate([(Blob(300, 380, 200, 250),), (Blob(500, 380, 300, 300),)]):
        (slides / f"b{i}.tif").hardlink_to(slide_factory(f"b{i}.tif", 1024, 768, seed=i, blobs=blobs))
    (slides / "no-mpp.tif").write_bytes(slide_factory("nompp.tif", 256, 256, mpp=None).read_bytes())
    reference = make_bundle(tmp_path / "reference", target_mpp=0.5)
    images = labeled_folder(tmp_path / "labeled")
    out = tmp_path / "report"
    # several bundles after one --models, as a shell glob gives them (issue 15)
    result = edge("bench", "--models", str(onnx_bundle), str(openvino_bundle), "--slides", str(slides),
                  "--images", str(images), "--mpp", "0.5", "--reference", str(reference), str(openvino_bundle),
                  "--repeats", "2",
                  "--threads", "1", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "not benchmarked" in result.stderr and "no-mpp.tif" in result.stderr

    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "lowmag.edge.bench/1"
    assert results["machine"]["cores"] and results["machine"]["onnxruntime"]
    steal = results["machine"]["cpu_steal_pct"]  # Linux: the share other virtual machines took
    assert steal is None or 0.0 <= steal <= 100.0
    runs = {(r["bundle"], r["backend"]) for r in results["students"]}
    assert runs == {("onnx", "onnxruntime"), ("onnx", "openvino"), ("openvino", "openvino")}
    for row in results["students"]:
        assert row["median_ms_per_slide"] > 0 and row["p90_ms_per_slide"] >= row["median_ms_per_slide"]
        assert row["slides_per_hour"] > 0 and row["peak_rss_mb"] > 0 and row["bundle_bytes"] > 0
        assert row["gflops_per_slide"] > 0
        assert set(row["stages_ms"]) >= {"read", "resample", "tissue", "inference", "write"}
        assert row["stages_ms"]["write"] > 0
        assert row["accuracy"]["images"] == 12 and row["accuracy"]["macro_f1"]["value"] == 1.0
        vs = row["vs_reference"]
        assert vs["speedup_median"] > 0 and vs["flop_reduction_median"] > 1
        # against each reference: the FP32 ONNX one and an OpenVINO one (issue 15)
        assert [v["backend"] for v in row["vs_references"]] == ["onnxruntime", "openvino"]
        for slide in row["slides"]:  # the floor, measured in the same run
            floor = slide["floor_ms"]
            assert floor["inference"] > 0 and floor["decode"] >= 0
            assert floor["total"] == pytest.approx(floor["decode"] + floor["inference"], abs=0.15)
            assert slide["floor_ratio"] == pytest.approx(slide["median_ms"] / floor["total"], rel=0.01)
            assert slide["first_ms"] > 0
            # CPU time, every thread of the process, the hash's own thread within it
            assert slide["cpu_ms"] > 0 and floor["cpu"] > 0
            assert 0 <= slide["hash_cpu_ms"] <= slide["cpu_ms"]
            assert "cpu" not in slide["stages_ms"] and "hash_cpu" not in slide["stages_ms"]
        assert row["floor_ratio_median"] > 0
    ref = results["reference"]
    assert all(s["patches"] > 0 for s in ref["slides"]) and ref["gflops_per_slide"] > 0
    assert [r["backend"] for r in results["references"]] == ["onnxruntime", "openvino"]
    for slide in ref["slides"]:  # every part of the reference's time is in a stage, the hash included
        stages = slide["stages_ms"]
        assert stages["hash"] >= 0 and stages["tissue"] > 0 and stages["inference"] > 0
        assert slide["cpu_ms"] > 0 and 0 <= slide["hash_cpu_ms"] <= slide["cpu_ms"]

    report = (out / "report.md").read_text()
    student_rows = [line for line in report.splitlines() if line.startswith("| onnx |") or
                    line.startswith("| openvino |")]
    assert len(student_rows) == 3 + 3 * 2 + 3  # the students, the floor per slide and the stage tables
    assert not [line for line in student_rows if "–" in cells(line)]  # every column filled
    assert "The conventional reference" in report and "level 0" in report
    assert ref["accuracy"]["images"] == 12

    # Plots: SVG files the Markdown links to, and the HTML carries them inline.
    import xml.etree.ElementTree as ElementTree

    for name in ("f1_vs_gflops", "latency", "stages"):
        svg = (out / "plots" / f"{name}.svg").read_text()
        assert ElementTree.fromstring(svg).tag.endswith("svg")  # well-formed: opens on its own in a browser
        assert f"plots/{name}.svg" in report
    # students, floor, stages, and one table per reference
    assert report_html_is_self_contained(out / "report.html", tables=5, figures=3)
    f1_plot = (out / "plots" / "f1_vs_gflops.svg").read_text()
    assert f1_plot.count("<circle") >= 2 + 1 and "<polygon" in f1_plot  # 2 bundles + legend; reference star


def test_the_html_report_renders_in_chromium(onnx_bundle, slide_factory, tmp_path):
    import pyvips

    from tests.edge.browser import chromium, render

    if chromium() is None:
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it)")
    out = tmp_path / "report"
    images = labeled_folder(tmp_path / "labeled")
    result = edge("bench", "--models", str(onnx_bundle), "--slides", str(slide_factory()), "--images", str(images),
                  "--mpp", "0.5", "--repeats", "1", "--warmup", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    dom = render(out / "report.html", tmp_path / "shot.png")
    assert dom.count("<table") == 3 and dom.count("<svg") == 3  # students, floor, stages; three plots
    assert "onnxruntime/cpu" in dom and "Macro F1 against GFLOPs" in dom
    shot = pyvips.Image.new_from_file(str(tmp_path / "shot.png"))
    # Something was drawn: the page is not one flat colour.
    assert shot.width >= 1000 and shot.extract_band(0).deviate() > 5


def report_html_is_self_contained(path, tables: int, figures: int) -> bool:
    from html.parser import HTMLParser

    class Collect(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[str] = []
            self.external: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            for name, value in attrs:
                if name in ("src", "href") and value and not value.startswith(("#", "data:")):
                    self.external.append(value)

    parser = Collect()
    parser.feed(path.read_text())
    assert not parser.external, parser.external
    assert parser.tags.count("table") == tables and parser.tags.count("figure") == figures
    assert parser.tags.count("svg") == figures
    return True


def test_bench_without_labels_or_reference_says_what_is_missing(onnx_bundle, slide_factory, tmp_path):
    out = tmp_path / "report"
    result = edge("bench", "--models", str(onnx_bundle), "--slides", str(slide_factory()), "--repeats", "1",
                  "--warmup", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    assert "Not measured: pass --reference" in report
    [row] = [line for line in report.splitlines() if line.startswith("| onnx | 5x | unknown | onnx fp32 | onnxruntime")]
    assert cells(row)[7] == "–" and cells(row)[-2:] == ["–", "–"]  # macro F1, speed-up, FLOP reduction


def test_a_labeled_folder_that_does_not_fit_the_bundle_fails_before_any_timing(onnx_bundle, slide_factory,
                                                                               tmp_path):
    images = tmp_path / "labeled"
    for name in ("pink", "glass", "bone"):  # "bone" is not a class of the bundle
        (images / name).mkdir(parents=True)
    out = tmp_path / "report"
    result = edge("bench", "--models", str(onnx_bundle), "--slides", str(slide_factory()), "--images", str(images),
                  "--mpp", "0.5", "--repeats", "1", "--warmup", "0", "--out", str(out))
    assert result.returncode == 1
    assert f"{images}: subfolders ['bone'] are not classes of this model" in result.stderr
    assert "benchmarking" not in result.stderr and not out.exists()  # nothing was timed or written


def test_the_steal_share_is_the_other_guests_part_of_all_cpu_time():
    from lowmag.edge.bench import cpu_ticks, steal_pct

    assert steal_pct((10, 1000), (30, 1200)) == 10.0
    assert steal_pct(None, (30, 1200)) is None and steal_pct((10, 1000), (10, 1000)) is None
    ticks = cpu_ticks()
    if ticks is not None:  # Linux: steal is part of all
        assert 0 <= ticks[0] <= ticks[1]
