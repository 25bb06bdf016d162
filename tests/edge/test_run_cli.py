"""``edge-classify run`` and ``status`` on real slides, the output lock, and no torch anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from lowmag.edge.lock import OutputLock
from tests.edge.conftest import REPO, edge, ledger_states

READABLE = {"aperio/CMU-1-Small-Region.svs", "dicom/CMU-1-Small-Region", "generic-tiff/CMU-1-Small-Region-pyramid.tif"}


@pytest.mark.shared_data
def test_every_readable_real_slide_is_classified_and_every_bad_one_recorded(onnx_bundle, slides_dir, tmp_path):
    out = tmp_path / "out"
    result = edge("run", str(slides_dir), "--model", str(onnx_bundle), "--out", str(out), "--retry-delay", "0",
                  timeout=300)
    assert result.returncode == 1  # some slides failed, and the exit status says so
    assert "failed; see edge-classify status" in result.stderr
    states = {path.replace(str(slides_dir) + "/", ""): state for path, state in ledger_states(out).items()}
    assert {p for p, s in states.items() if s == "done"} == READABLE
    assert {p for p, s in states.items() if s == "failed"} >= {
        "bad", "bad/untiled-ihc-no-mpp.tif", "bad/synthetic-boxes-implausible-mpp.tiff",
        "aperio/TCGA-CR-7395-frozen-jp2k-no-mpp.svs"}
    for relative in READABLE:
        doc = json.loads((out / "results" / (relative + ".json")).read_text())
        assert doc["tissue"] and doc["slide"]["mpp"] == pytest.approx(0.499, abs=1e-3)

    status = edge("status", "--out", str(out))
    assert status.returncode == 0
    assert "done 3" in status.stdout and "no watcher running" in status.stdout
    assert "no µm/px" in status.stdout and "--assume-mpp" in status.stdout  # reasons, with the fix
    summary = json.loads(edge("status", "--out", str(out), "--json").stdout)
    assert summary["counts"]["done"] == 3 and summary["throughput"]["median_ms_per_slide"] > 0
    reasons = {f["path"].replace(str(slides_dir) + "/", ""): f["error"] for f in summary["failed"]}
    assert "implausible" in reasons["bad/synthetic-boxes-implausible-mpp.tiff"] or \
        "outside" in reasons["bad/synthetic-boxes-implausible-mpp.tiff"]

    again = edge("run", str(slides_dir / "aperio" / "CMU-1-Small-Region.svs"), "--model", str(onnx_bundle),
                 "--out", str(out))
    assert again.returncode == 0 and "1 already done" in again.stdout


def test_one_process_per_output_folder(onnx_bundle, slide_factory, tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        result = edge("run", str(slide_factory()), "--model", str(onnx_bundle), "--out", str(out))
        assert result.returncode == 1
        assert "already writing here" in result.stderr and "pid" in result.stderr
        assert "Traceback" not in result.stderr
        status = edge("status", "--out", str(out)) if (out / "ledger.sqlite").exists() else None
        assert status is None  # the refused run wrote nothing
    assert edge("run", str(slide_factory()), "--model", str(onnx_bundle), "--out", str(out)).returncode == 0


def test_the_edge_runner_needs_neither_torch_nor_the_export_tools(onnx_bundle, slide_factory, tmp_path):
    script = textwrap.dedent(f"""
        import sys

        # What lowmag[edge] does not install: torch, and the export stage's tools.
        ABSENT = ("torch", "onnx", "onnxscript", "nncf", "modelopt", "safetensors")

        class EdgeInstall:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ABSENT:
                    raise ImportError(name + " is not installed on a scanner workstation")

        sys.meta_path.insert(0, EdgeInstall())
        from lowmag.edge.cli import main
        try:
            main(["run", {str(slide_factory())!r}, "--model", {str(onnx_bundle)!r}, "--out", {str(tmp_path / "o")!r}])
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        assert not [m for m in sys.modules if m.split(".")[0] in ABSENT]
        print("no torch")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no torch" in result.stdout and "label=pink" in result.stderr


def test_a_run_over_many_slides_compiles_the_model_once(onnx_bundle, slide_factory, tmp_path):
    """The session edge-classify opens to check the bundle is the one the worker uses (issue
    15: the model was compiled twice per run), and it serves every slide."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        (scans / f"s{i}.tif").hardlink_to(slide_factory(f"once-{i}.tif", seed=i))
    counted = tmp_path / "opened.txt"
    script = textwrap.dedent(f"""
        import sys
        import lowmag.edge.runner as runner
        real = runner.open_session
        def counting(*args, **kwargs):
            with open({str(counted)!r}, "a") as log:
                log.write("opened\\n")
            return real(*args, **kwargs)
        runner.open_session = counting
        from lowmag.edge.cli import main
        sys.argv = ["edge-classify", "run", {str(scans)!r}, "--model", {str(onnx_bundle)!r},
                    "--out", {str(tmp_path / "out")!r}]
        main()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert sorted(ledger_states(tmp_path / "out").values()) == ["done"] * 3
    assert counted.read_text().splitlines() == ["opened"]
