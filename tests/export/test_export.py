"""export-student end to end: real exports, real runtimes, the gate, bundle integrity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from lowmag.bundle import load_bundle
from lowmag.errors import ArtifactHashError, SpecError
from lowmag.export.cli import main
from lowmag.runtimes import logits_of, open_bundle

from .conftest import CLASSES, SCAN_MPP

pytestmark = pytest.mark.usefixtures("student")


def export(args: list) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def eval_pixels(folder: Path, target_mpp: float) -> tuple[list[np.ndarray], np.ndarray]:
    from lowmag.reader import read_at_mpp
    from lowmag.slide import open_slide

    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((folder / name).glob("*.png")):
            with open_slide(path, assume_mpp=SCAN_MPP) as slide:
                images.append(read_at_mpp(slide, target_mpp, exact=True))
            labels.append(label)
    return images, np.array(labels)


def test_onnx_fp32_bundle_proves_itself_and_records_everything(student, he_eval, he_val, synthetic_slide, tmp_path):
    out = tmp_path / "bundle"
    result = export([student, "--target", "onnx", "--out", out, "--calibration", synthetic_slide,
                     "--patch-px", "64", "--parity-images", "16", "--features",
                     "--eval-images", he_eval, "--val-images", he_val, "--mpp", SCAN_MPP])
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output and "temperature" in result.output

    bundle = load_bundle(out)
    spec, export_ = bundle.spec, bundle.spec.export
    checkpoint_spec = json.loads((student / "lowmag.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["lowmag.json", "model.onnx"]
    assert spec.classes == tuple(checkpoint_spec["classes"]) and spec.target_mpp == checkpoint_spec["target_mpp"]
    assert spec.precision == "fp32" and set(spec.artifacts) == {"model.onnx"}
    assert export_["source_checkpoint"]["weights_sha256"] == checkpoint_spec["artifacts"]
    assert {"torch", "onnx", "onnxruntime", "lowmag"} <= set(export_["tools"])
    assert export_["opset"] == 18 and export_["inputs"]["dtype"] == "uint8"
    gate = export_["gate"]
    assert gate["passed"] and gate["parity"]["images"] == 16 + 60
    assert gate["parity"]["max_abs_logit_diff"] < 1e-3 and gate["accuracy"]["macro_f1_change"] == 0
    assert export_["calibration"]["counts"]["holdout"] == 16
    assert export_["tensorrt_onnx_check"] == {"model.onnx": "compatible"}
    temperature = export_["temperature"]
    assert temperature["fitted"] and temperature["applied"] and spec.temperature == temperature["temperature"]
    assert 0.05 < spec.temperature < 20
    # T minimises NLL (ECE is reported; with 20 % label noise it need not fall).
    assert temperature["nll_after"] <= temperature["nll_before"] and 0 <= temperature["ece_after"] <= 1

    # The bundle runs without torch's help and classifies the held-out images as trained.
    images, labels = eval_pixels(he_eval, spec.target_mpp)
    predicted = logits_of(open_bundle(bundle), images).argmax(1)
    assert (predicted == labels).mean() >= 0.9
    # --features: the final feature map comes out too (512 channels, 1/32 of the input side).
    assert export_["outputs"] == ["logits", "features"]
    outputs = open_bundle(bundle).run(np.zeros((2, 64, 96, 3), np.uint8))
    assert outputs["logits"].shape == (2, len(CLASSES)) and outputs["features"].shape == (2, 512, 2, 3)

    verify = CliRunner().invoke(main, ["verify", str(out)])
    assert verify.exit_code == 0 and "files match" in verify.output


@pytest.mark.parametrize("target, precision, files", [
    ("onnx", "fp16", {"model.fp16.onnx"}),
    ("onnx", "int8", {"model.int8.onnx"}),
    ("openvino", "fp32", {"model.xml", "model.bin"}),
    ("openvino", "fp16", {"model.xml", "model.bin"}),
    ("openvino", "int8", {"model.xml", "model.bin"}),
])
def test_every_target_and_precision_passes_the_gate(student, he_images, he_eval, tmp_path, target, precision, files):
    out = tmp_path / f"{target}-{precision}"
    result = export([student, "--target", target, "--precision", precision, "--out", out,
                     "--calibration", he_images, "--calibration-mpp", SCAN_MPP, "--calibration-size", "60",
                     "--parity-images", "12", "--eval-images", he_eval, "--mpp", SCAN_MPP,
                     # One image in 60 is 1.7 F1 points: the strict default is tested on its own below.
                     "--max-f1-drop", "5"])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(out)
    gate = bundle.spec.export["gate"]
    assert gate["parity"]["top1_agreement"] >= 0.95
    assert gate["accuracy"]["macro_f1_change"] >= -5.0 and gate["policy"]["max_f1_drop"] == 5
    if precision == "int8":
        files = files | {"calibration.json"}
        manifest = json.loads((out / "calibration.json").read_text())
        assert manifest["counts"]["calibration"] == 60 and len(manifest["items"]) == 60 + 12
        assert bundle.spec.export["quantization"]["images"] == 60
        assert bundle.spec.export["calibration"]["counts"]["calibration"] == 60
    assert set(bundle.spec.artifacts) == files and bundle.precision == precision
    if target == "openvino":
        hint = bundle.runtime_settings["openvino"]["config"].get("INFERENCE_PRECISION_HINT")
        assert hint == ("f32" if precision in ("fp32", "int8") else None)
    if target == "onnx" and precision == "int8":
        import onnx

        ops = {n.op_type for n in onnx.load(str(bundle.path())).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        # ONNX Runtime's fast form (uint8 activations) is recorded as one TensorRT refuses.
        assert bundle.spec.export["quantization"]["activations"].startswith("uint8")
        assert any("zero point" in p for p in bundle.spec.export["tensorrt_onnx_check"]["model.int8.onnx"])
    # What the gate measured is what a runtime loading the bundle gets.
    images, labels = eval_pixels(he_eval, bundle.spec.target_mpp)
    f1_exported = gate["accuracy"]["macro_f1_exported"]
    accuracy = 100 * (logits_of(open_bundle(bundle), images).argmax(1) == labels).mean()
    assert accuracy == pytest.approx(gate["accuracy"]["accuracy_exported"], abs=1e-3)
    assert f1_exported > 80


def _break_the_graph(monkeypatch, bias_shift: float) -> None:
    """Export as usual, then shift the classifier's bias for class 0: a graph that is not the model."""
    import onnx
    from onnx import numpy_helper

    from lowmag.export import onnx_graph

    real = onnx_graph.export_onnx

    def broken(graph, path, **kwargs):
        real(graph, path, **kwargs)
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            if init.name.endswith("fc.bias"):
                bias = numpy_helper.to_array(init).copy()
                bias[0] += bias_shift
                init.CopyFrom(numpy_helper.from_array(bias, init.name))
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(onnx_graph, "export_onnx", broken)


def test_the_gate_refuses_a_broken_fp32_graph_and_writes_nothing(student, he_eval, tmp_path, monkeypatch):
    _break_the_graph(monkeypatch, 0.5)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, [str(student), "--out", str(out), "--eval-images", str(he_eval),
                                       "--mpp", str(SCAN_MPP)])
    assert result.exit_code == 1
    assert "FP32 logits differ from PyTorch" in result.output and "nothing was written" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_accuracy_drop_fails_unless_allowed(student, he_eval, tmp_path, monkeypatch):
    _break_the_graph(monkeypatch, 50.0)  # class 0 wins almost everywhere: F1 collapses
    out = tmp_path / "bundle"
    args = [str(student), "--precision", "fp16", "--out", str(out), "--eval-images", str(he_eval), "--mpp", str(SCAN_MPP)]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "--allow-accuracy-drop" in refused.output and not out.exists()
    allowed = CliRunner().invoke(main, args + ["--allow-accuracy-drop"])
    assert allowed.exit_code == 0, allowed.output
    assert "WARNING" in allowed.output
    gate = load_bundle(out).spec.export["gate"]
    assert gate["accuracy_drop_allowed"] and gate["accuracy"]["macro_f1_change"] < -1


def test_existing_bundle_is_kept_unless_forced(student, he_eval, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("a lab's file")
    args = [str(student), "--out", str(out), "--eval-images", str(he_eval), "--mpp", str(SCAN_MPP)]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "--force" in refused.output
    assert (out / "keep.txt").read_text() == "a lab's file"
    # Validation images the model never gets wrong cannot determine a temperature: not applied.
    # They are picked by the model itself, so this holds whatever the tiny model learnt here.
    never_wrong = images_the_model_gets_right(student, he_eval, tmp_path / "never-wrong")
    forced = CliRunner().invoke(main, args + ["--force", "--val-images", str(never_wrong)])
    assert forced.exit_code == 0, forced.output
    assert "not applied" in forced.output
    assert not (out / "keep.txt").exists() and load_bundle(out).target == "onnx"
    spec = load_bundle(out).spec
    record = spec.export["temperature"]
    assert spec.temperature == 1.0 and record["applied"] is False and record["trusted"] is False
    assert record["errors"] == 0 and record["why_not_trusted"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "never-wrong"]


def images_the_model_gets_right(student: Path, labeled: Path, folder: Path) -> Path:
    """A class folder of the labeled images the student classifies correctly (at least 20),
    read and run as export-student's gate reads and runs them (PyTorch eager)."""
    import shutil

    from lowmag.export.onnx_graph import StudentGraph, reference_logits
    from lowmag.labeled import scan_image_folder
    from lowmag.train.checkpoint import load_checkpoint

    model, spec = load_checkpoint(student)
    _, items = scan_image_folder(labeled, scan_mpp=SCAN_MPP, classes=spec.classes, require_all_classes=False)
    logits = reference_logits(StudentGraph(model, spec), [item.read(spec.target_mpp) for item in items])
    right = [item for item, row in zip(items, logits) if int(np.argmax(row)) == item.label]
    assert len(right) >= 20, f"the test student got only {len(right)} of {len(items)} images right"
    for item in right:
        (folder / spec.classes[item.label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(item.path, folder / spec.classes[item.label] / item.path.name)
    return folder


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8", "--eval-images", "{eval}", "--mpp", "0.5"], "--calibration"),
    ([], "real images"),
    (["--eval-images", "{eval}"], "--mpp"),
    (["--target", "tensorrt", "--eval-images", "{eval}", "--mpp", "0.5"], "TensorRT is not installed"),
    # Each INT8 knob belongs to its own quantizer: given to the other, it would be silently ignored.
    (["--precision", "int8", "--nncf-preset", "mixed", "--calibration", "{eval}", "--calibration-mpp", "0.5"],
     "--nncf-preset sets how NNCF"),
    (["--target", "openvino", "--precision", "int8", "--calibration-method", "percentile", "--calibration", "{eval}",
      "--calibration-mpp", "0.5"], "use --nncf-preset mixed instead"),
])
def test_bad_requests_are_refused_before_any_work(student, he_eval, tmp_path, args, message):
    if "tensorrt" in args:
        pytest.importorskip("lowmag.tensorrt")
        try:
            import tensorrt  # noqa: F401
            pytest.skip("TensorRT is installed here")
        except ImportError:
            pass
    args = [a.format(eval=he_eval) for a in args]
    result = CliRunner().invoke(main, [str(student), "--out", str(tmp_path / "b"), *args])
    assert result.exit_code == 1 and message in result.output
    assert not (tmp_path / "b").exists()


def test_a_tampered_bundle_is_refused(student, he_eval, tmp_path):
    out = tmp_path / "bundle"
    assert export([student, "--out", out, "--eval-images", he_eval, "--mpp", SCAN_MPP]).exit_code == 0
    model = out / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactHashError, match="model.onnx"):
        load_bundle(out)
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1 and "model.onnx" in result.output and "re-export" in result.output
    with pytest.raises(SpecError, match="training checkpoint"):
        load_bundle(student)
    # ...and the other way round: a bundle is not something to export from.
    result = CliRunner().invoke(main, [str(out), "--out", str(tmp_path / "again"), "--eval-images", str(he_eval),
                                       "--mpp", str(SCAN_MPP)])
    assert result.exit_code == 1 and "exported bundle, not a training checkpoint" in result.output
    assert str(student.resolve()) in result.output


def test_running_a_bundle_imports_no_torch(student, he_eval, tmp_path):
    out = tmp_path / "bundle"
    assert export([student, "--out", out, "--eval-images", he_eval, "--mpp", SCAN_MPP]).exit_code == 0
    code = (
        "import sys, numpy as np\n"
        "from lowmag.bundle import load_bundle\n"
        "from lowmag.runtimes import open_bundle, logits_of, softmax\n"
        f"b = load_bundle({str(out)!r})\n"
        "p = softmax(logits_of(open_bundle(b), [np.full((40, 40, 3), 200, np.uint8)]), b.spec.temperature)\n"
        "assert abs(p.sum() - 1) < 1e-6\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.shared_data
def test_int8_calibrated_on_real_slides(student, slides_dir, he_eval, tmp_path):
    """The real scanner files (SVS, pyramidal TIFF, DICOM; bad/ ones skipped) calibrate INT8."""
    out = tmp_path / "bundle"
    result = export([student, "--precision", "int8", "--int8-activations", "int8", "--out", out, "--calibration", slides_dir,
                     "--patch-px", "64", "--calibration-size", "80", "--parity-images", "16",
                     "--eval-images", he_eval, "--mpp", SCAN_MPP, "--max-f1-drop", "5"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "calibration.json").read_text())
    used = {Path(s["path"]).name for s in manifest["sources"] if s["n_calibration"] + s["n_holdout"] > 0}
    assert len(used) >= 2 and not any("bad" in Path(s).parts for s in used)
    assert manifest["counts"] == {"calibration": 80, "holdout": 16}
    spec = load_bundle(out).spec
    assert spec.export["gate"]["parity"]["images"] == 16 + 60
    # The portable form: int8 symmetric Q/DQ that TensorRT's parser takes too.
    assert spec.export["tensorrt_onnx_check"] == {"model.int8.onnx": "compatible"}


def test_bench_times_the_bundle_next_to_pytorch_eager(student, he_eval, tmp_path):
    bundle = tmp_path / "bundle"
    assert export([student, "--out", bundle, "--eval-images", he_eval, "--mpp", SCAN_MPP]).exit_code == 0
    result = CliRunner().invoke(main, ["bench", str(bundle), "--piece-mm", "0.1,0.2", "--tile-batch", "4",
                                       "--repeats", "2", "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "results.json").read_text())
    rows = report["rows"]
    assert {(r["backend"], r["case"]) for r in rows} == {
        (backend, case) for backend in ("pytorch-eager", "onnxruntime")
        for case in ("0.1 mm piece", "0.2 mm piece", "4 tiles of 71.3 µm")}
    piece = next(r for r in rows if r["backend"] == "onnxruntime" and r["case"] == "0.2 mm piece")
    assert piece["side_px"] == 200 and piece["median_ms"] > 0 and piece["speedup_vs_eager"] > 0
    assert report["machine"]["threads_used"] == 1 and report["machine"]["tools"]["onnxruntime"]
    assert "| onnxruntime | fp32 |" in (tmp_path / "b" / "results.md").read_text()


def test_the_bundle_keeps_the_checkpoints_fingerprint_or_refreshes_it_from_calibration_slides(
        student, he_eval, synthetic_slide, tmp_path):
    kept = tmp_path / "kept"
    assert export([student, "--out", kept, "--eval-images", he_eval, "--mpp", SCAN_MPP]).exit_code == 0
    checkpoint = json.loads((student / "lowmag.json").read_text()).get("fingerprint", {})
    assert load_bundle(kept).spec.fingerprint == checkpoint
    assert load_bundle(kept).spec.export["fingerprint"] == ("the checkpoint's" if checkpoint else None)

    fresh = tmp_path / "fresh"
    result = export([student, "--out", fresh, "--calibration", synthetic_slide, "--patch-px", "32",
                     "--calibration-size", "60", "--parity-images", "24", "--refresh-fingerprint"])
    assert result.exit_code == 0, result.output
    spec = load_bundle(fresh).spec
    assert spec.fingerprint["source"].startswith("export-student calibration images of")
    assert spec.fingerprint["mpp"] == spec.target_mpp and spec.fingerprint["held_out_windows"] > 0
    assert "fingerprint of the training data" in result.output

    refused = CliRunner().invoke(main, [str(student), "--out", str(tmp_path / "no"), "--eval-images", str(he_eval),
                                        "--mpp", str(SCAN_MPP), "--refresh-fingerprint"])
    assert refused.exit_code == 1 and "--refresh-fingerprint makes the fingerprint from the --calibration" in \
        refused.output


def test_a_checkpoint_with_an_older_fingerprint_exports_and_says_it_will_not_be_used(student, he_eval, tmp_path):
    """A checkpoint trained by an older lowmag carries a fingerprint without window_px: the
    export used to write the bundle and then crash on its summary (KeyError, exit 1)."""
    import shutil

    old = tmp_path / "old-checkpoint"
    shutil.copytree(student, old)
    spec = json.loads((old / "lowmag.json").read_text())
    if not spec.get("fingerprint"):
        pytest.skip("the fixture checkpoint has no fingerprint")
    for key in ("window_px", "held_out_windows"):
        spec["fingerprint"].pop(key, None)
    (old / "lowmag.json").write_text(json.dumps(spec))
    result = export([old, "--out", tmp_path / "bundle", "--eval-images", he_eval, "--mpp", SCAN_MPP])
    assert result.exit_code == 0, result.output
    assert "NOT usable" in result.output and "window_px" in result.output and "--refresh-fingerprint" in result.output


def test_openvino_int8_with_asymmetric_activations_passes_and_says_so(student, he_images, he_eval, tmp_path):
    import openvino as ov

    ranges = {}
    for preset in ("performance", "mixed"):
        out = tmp_path / f"ov-{preset}"
        result = export([student, "--target", "openvino", "--precision", "int8", "--nncf-preset", preset,
                         "--out", out, "--calibration", he_images, "--calibration-mpp", SCAN_MPP,
                         "--calibration-size", "60", "--parity-images", "12", "--eval-images", he_eval,
                         "--mpp", SCAN_MPP, "--max-f1-drop", "5"])
        assert result.exit_code == 0, result.output
        export_ = load_bundle(out).spec.export
        assert export_["quantization"]["preset"].startswith(preset)
        assert export_["calibration"]["method"] == f"nncf {preset}"
        model = ov.Core().read_model(str(out / "model.xml"))
        ranges[preset] = sorted(
            round(float(np.min(op.input_value(i).get_node().get_data())), 6)
            for op in model.get_ops() if op.get_type_name() == "FakeQuantize"
            for i in (1, 2) if op.input_value(i).get_node().get_type_name() == "Constant")
    assert ranges["performance"] and ranges["mixed"] != ranges["performance"]  # the preset reached NNCF


def test_the_accuracy_refusal_names_the_knob_of_the_target_it_refused():
    from lowmag.export.gate import GatePolicy, GateError, judge

    parity = {"images": 10, "max_abs_logit_diff": 0.3, "top1_agreement": 0.9}
    accuracy = {"images": 674, "macro_f1_pytorch": 66.1, "macro_f1_exported": 65.0, "macro_f1_change": -1.1}
    for target, knob, other in (("openvino", "--nncf-preset mixed", "--calibration-method"),
                                ("onnx", "--calibration-method percentile", "--nncf-preset")):
        with pytest.raises(GateError) as refused:
            judge("int8", parity, accuracy, GatePolicy(), "ckpt", target)
        assert knob in str(refused.value) and other not in str(refused.value)
