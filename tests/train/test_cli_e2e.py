"""distill-train as a user runs it: every phase on CPU, the report, evaluate, and resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lowmag.spec import read_spec, verify_artifacts
from lowmag.train.cli import main

from .conftest import CLASSES, SIDE, make_image_folder

EXPECTED_STEPS = [
    "teacher-scan",
    "baseline-scan_2",
    "distill-labeled-both-att0.5-scan_2",
    "finetune-labeled-both-att0.5-scan_2",
    "distill-aux-both-att0.5-scan_2",
    "finetune-aux-both-att0.5-scan_2",
    "distill-labeled-maxpool-att0.5-scan_2",
]


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_run_trains_every_phase_and_writes_the_report(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _invoke(["run", str(tiny_config), "--out", str(out)])

    steps = sorted(p.name for p in (out / "steps").iterdir())
    assert steps == sorted(EXPECTED_STEPS)
    for name in EXPECTED_STEPS:
        folder = out / "steps" / name
        spec = read_spec(folder)
        verify_artifacts(spec, folder)  # the checkpoint is complete and intact
        assert spec.classes == CLASSES
        assert not (folder / "train_state.pt").exists()
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["metrics"]["n"] == 9  # one held-out group of 3 tiles per class
        assert 0.0 <= metrics["metrics"]["macro_f1"]["value"] <= 1.0
    teacher = read_spec(out / "steps/teacher-scan")
    student = read_spec(out / "steps/baseline-scan_2")
    assert teacher.target_mpp == pytest.approx(0.5) and student.target_mpp == pytest.approx(1.0)
    assert teacher.normalization == student.normalization  # one standardisation, from labeled training data
    assert teacher.provenance.config["experiment"]["seed"] == 1
    distilled = json.loads((out / "steps/distill-aux-both-att0.5-scan_2/lowmag.json").read_text())
    assert distilled["provenance"]["config"]["regime"] == "labeled+unlabeled"
    # 9 labeled images are too few for a fingerprint of the training data (20 needed): none is
    # made up; edge-classify then checks only that slides are brightfield (tests/train/test_fingerprint.py).
    assert teacher.fingerprint == {} and "fingerprint" not in distilled

    rows = json.loads((out / "report/results.json").read_text())["results"]
    assert {r["name"] for r in rows} == set(EXPECTED_STEPS)
    by_name = {r["name"]: r for r in rows}
    assert by_name["teacher-scan"]["input_px"] == SIDE
    assert by_name["baseline-scan_2"]["input_px"] == SIDE // 2
    assert by_name["teacher-scan"]["gflops"] > 3 * by_name["baseline-scan_2"]["gflops"]
    markdown = (out / "report/results.md").read_text()
    assert "Baseline (from scratch)" in markdown and "Distillation (labeled + unlabeled" in markdown
    assert (out / "report/accuracy_vs_gflops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    splits = json.loads((out / "splits.json").read_text())
    unlabeled = splits["summary"]["unlabeled"]["per_class"]
    assert list(unlabeled) == ["(unlabeled)"]  # auxiliary labels are dropped
    assert set(splits["items"]["labeled"]).isdisjoint(splits["items"]["test"])

    # A second run finds every step finished and retrains nothing.
    before = {n: (out / "steps" / n / "model.safetensors").stat().st_mtime_ns for n in EXPECTED_STEPS}
    _invoke(["run", str(tiny_config), "--out", str(out)])
    after = {n: (out / "steps" / n / "model.safetensors").stat().st_mtime_ns for n in EXPECTED_STEPS}
    assert before == after

    # evaluate: any checkpoint on any class-folder layout, at the checkpoint's magnification.
    metrics_path = tmp_path / "metrics.json"
    printed = _invoke([
        "evaluate", "--checkpoint", str(out / "steps/baseline-scan_2"), "--images",
        str(make_image_folder(tmp_path / "unseen", per_class=5, seed=7)), "--mpp", "0.5",
        "--center-crop", str(SIDE), "--bootstrap", "100", "--out", str(metrics_path),
    ])
    assert "Macro F1" in printed and "c_flat" in printed
    result = json.loads(metrics_path.read_text())
    assert result["target_mpp"] == pytest.approx(1.0)
    assert result["metrics"]["n"] == 15 and result["metrics"]["input_px"] == SIDE // 2
    assert result["metrics"]["macro_f1"]["ci_low"] <= result["metrics"]["macro_f1"]["value"]

    # splits: the run's held-out images as folders, for export-student's gate and calibration.
    printed = _invoke(["splits", str(out), "--out", str(tmp_path / "splits")])
    listing = json.loads((out / "splits.json").read_text())["items"]
    for split, keys in listing.items():
        linked = sorted((tmp_path / "splits" / split).rglob("*.png"))
        assert len(linked) == len(keys) and all(p.is_symlink() for p in linked)
        if split != "unlabeled":  # labeled splits keep one subfolder per class
            assert {p.parent.name for p in linked} <= {"a_stripes", "b_dots", "c_flat"}


def test_a_changed_config_is_refused_for_an_existing_run(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _invoke(["teacher", str(tiny_config), "--out", str(out)])
    tiny_config.write_text(tiny_config.read_text().replace("temperature = 2.0", "temperature = 3.0"))
    result = CliRunner().invoke(main, ["teacher", str(tiny_config), "--out", str(out)])
    assert result.exit_code == 1
    assert "different config" in result.output and "distill" in result.output
    assert "default recipe" not in result.output
    # a change of the recipe itself (here the teacher's weight decay, as an upgrade of the
    # defaults would change it) says how to keep the old recipe
    tiny_config.write_text(tiny_config.read_text().replace("temperature = 3.0", "temperature = 2.0")
                           .replace("[teacher]\n", "[teacher]\nweight_decay = 0.0\n"))
    result = CliRunner().invoke(main, ["teacher", str(tiny_config), "--out", str(out)])
    assert result.exit_code == 1
    assert "changed: teacher" in result.output and "default recipe" in result.output


def test_distill_before_the_teacher_says_what_to_run(tiny_config: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["distill", str(tiny_config), "--out", str(tmp_path / "r"), "--resolution", "scan/2"])
    assert result.exit_code == 1
    assert "no finished teacher" in result.output and "distill-train teacher" in result.output


def test_evaluate_refuses_a_folder_with_other_classes(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _invoke(["teacher", str(tiny_config), "--out", str(out)])
    other = make_image_folder(tmp_path / "other", per_class=2)
    (other / "a_stripes").rename(other / "zz_unknown")
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(out / "steps/teacher-scan"),
                                       "--images", str(other), "--mpp", "0.5"])
    assert result.exit_code == 1
    assert "zz_unknown" in result.output and "not classes of this model" in result.output


def test_an_interrupted_run_resumes_without_redoing_finished_steps(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    teacher_spec = out / "steps/teacher-scan/lowmag.json"
    command = [sys.executable, "-m", "lowmag.train.cli", "run", str(tiny_config), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    wall_time = out / "wall_time.json"  # counted after each finished step
    while not wall_time.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before its first step's time was counted"
    process.kill()  # interrupted somewhere after the teacher finished
    process.wait()
    assert teacher_spec.exists(), "the teacher step never finished"
    teacher_written = (out / "steps/teacher-scan/model.safetensors").stat().st_mtime_ns
    # The stopped invocation's finished steps keep their time in the run's wall time.
    before = json.loads(wall_time.read_text())["seconds"]
    assert before > 0

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "teacher-scan: already trained, skipping" in resumed.stderr
    assert (out / "steps/teacher-scan/model.safetensors").stat().st_mtime_ns == teacher_written
    assert (out / "report/results.md").is_file()
    assert len(list((out / "steps").glob("*/metrics.json"))) == len(EXPECTED_STEPS)
    report = json.loads((out / "report/results.json").read_text())
    assert report["meta"]["wall_time_s"] > round(before, 1)  # both invocations counted


def test_extra_seeds_retrain_the_headline_steps_on_the_same_split_and_the_report_gathers_them(
        tiny_config: Path, tmp_path: Path) -> None:
    config = tiny_config.read_text().replace('seed = 1\n', 'seed = 1\nextra_seeds = [5]\n', 1)
    config = config.replace("regimes = [\"labeled\", \"labeled+unlabeled\"]", "regimes = [\"labeled+unlabeled\"]")
    config = config.replace("ablation = [\"maxpool\"]", "ablation = []").replace("enabled = true", "enabled = false")
    tiny_config.write_text(config)
    out = tmp_path / "run"
    _invoke(["run", str(tiny_config), "--out", str(out)])

    headline = ["baseline-scan_2", "distill-aux-both-att0.5-scan_2", "teacher-scan"]
    assert sorted(p.name for p in (out / "seed-5" / "steps").iterdir()) == headline
    first, second = (json.loads((d / "splits.json").read_text())["items"] for d in (out, out / "seed-5"))
    assert first == second  # the extra seed does not re-split the data
    seeds = {json.loads(p.read_text())["seed"] for p in (out / "seed-5" / "steps").glob("*/metrics.json")}
    assert seeds == {5}
    teacher = read_spec(out / "seed-5" / "steps" / "teacher-scan")
    assert teacher.provenance.seed != read_spec(out / "steps" / "teacher-scan").provenance.seed
    report = json.loads((out / "report" / "results.json").read_text())
    assert sorted(g["name"] for g in report["over_seeds"]) == headline
    assert "Over seeds" in (out / "report" / "results.md").read_text()


def test_one_step_repeated_with_another_seed_lands_beside_the_run_and_joins_its_report(
        tiny_config: Path, tmp_path: Path) -> None:
    """``--seed`` repeats a single step (say a labeled-only student the run trained once) with
    another training seed, into RUN/seed-K/ on the run's split, from that seed's teacher."""
    out = tmp_path / "run"
    _invoke(["teacher", str(tiny_config), "--out", str(out)])
    _invoke(["baseline", str(tiny_config), "--resolution", "scan/2", "--out", str(out)])

    missing = CliRunner().invoke(main, ["distill", str(tiny_config), "--resolution", "scan/2", "--seed", "3",
                                        "--out", str(out)])
    assert missing.exit_code != 0  # seed 3 has no teacher yet: refused, nothing distilled from seed 1's
    assert "seed-3" in missing.output and "no finished teacher" in missing.output
    assert "distill-train teacher --seed 3" in missing.output  # the fix, for this seed
    assert not list((out / "seed-3").glob("steps/distill-*/model.safetensors"))

    _invoke(["teacher", str(tiny_config), "--seed", "3", "--out", str(out)])
    _invoke(["baseline", str(tiny_config), "--resolution", "scan/2", "--seed", "3", "--out", str(out)])
    assert json.loads((out / "seed-3" / "steps" / "baseline-scan_2" / "metrics.json").read_text())["seed"] == 3
    first, second = (json.loads((d / "splits.json").read_text())["items"] for d in (out, out / "seed-3"))
    assert first == second
    _invoke(["report", str(out)])
    report = json.loads((out / "report" / "results.json").read_text())
    seeds = {g["name"]: g["seeds"] for g in report["over_seeds"]}
    assert sorted(seeds["baseline-scan_2"]) == [1, 3] and sorted(seeds["teacher-scan"]) == [1, 3]
