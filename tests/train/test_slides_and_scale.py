"""Slide lists (variable-size tissue pieces, batch 1 + accumulation) and multi-process training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lowmag.synthetic import Blob, make_synthetic_slide
from lowmag.train.cli import main

SLIDE_CONFIG = """
name = "slides"
teacher_resolution = "2.5x"
student_resolutions = ["1.25x"]

[data]
slides = "slides.csv"

[teacher]
epochs = 1
batch_size = 2

[student]
epochs = 1
batch_size = 2

[distill]
regimes = ["labeled+unlabeled"]

[evaluation]
bootstrap = 50

[runtime]
device = "cpu"
"""


@pytest.fixture(scope="module")
def slide_experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slide-exp")
    rows = ["slide,label,split"]
    plans = [("tumour", "train"), ("normal", "train"), ("tumour", "test"), ("normal", "test"), ("", "train")]
    for i, (label, split) in enumerate(plans):
        blobs = (Blob(500, 500, 260 + 40 * i, 200), Blob(1500, 900, 150, 220 + 30 * i))
        make_synthetic_slide(root / f"s{i}.tif", 2048, 1536, mpp=0.5, blobs=blobs, seed=i)
        rows.append(f"s{i}.tif,{label},{split}")
    (root / "slides.csv").write_text("\n".join(rows) + "\n")
    (root / "exp.toml").write_text(SLIDE_CONFIG)
    return root


def test_slide_list_experiment_trains_on_tissue_pieces_of_varying_size(slide_experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(slide_experiment / "exp.toml"), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    splits = json.loads((out / "splits.json").read_text())
    assert splits["summary"]["labeled"]["items"] == 4  # two slides, two tissue pieces each
    assert splits["summary"]["test"]["items"] == 4
    assert splits["summary"]["unlabeled"]["items"] == 2  # the slide listed without a label
    assert all("s4.tif" in key for key in splits["items"]["unlabeled"])

    from lowmag.train.cache import PixelCache

    caches = [PixelCache(p) for p in (out / "cache").iterdir() if p.name.startswith("4um")]
    assert caches and all(c.uniform_shape is None for c in caches)  # pieces differ in size
    sizes = {tuple(c[i].shape) for c in caches for i in range(len(c))}
    assert len(sizes) > 2
    rows = json.loads((out / "report/results.json").read_text())["results"]
    assert {r["name"] for r in rows} == {"teacher-2.5x", "baseline-1.25x", "distill-aux-both-1.25x"}
    assert all(r["metrics"]["n"] == 4 for r in rows)


@pytest.mark.slow
def test_torchrun_with_two_processes_trains_one_model(tiny_config: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    out = tmp_path / "run"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "lowmag.train.cli",
               "teacher", str(tiny_config), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    spec = json.loads((out / "steps/teacher-scan/lowmag.json").read_text())
    assert spec["provenance"]["config"]["runtime"]["world_size"] == 2
    assert (out / "steps/teacher-scan/metrics.json").is_file()


@pytest.mark.gpu
def test_cuda_bf16_channels_last_run(tiny_config: Path, tmp_path: Path) -> None:
    # bf16 autocast is off by default (slower on the H200 it was measured on); asked for, it runs.
    tiny_config.write_text(tiny_config.read_text().replace('device = "cpu"', 'device = "cuda"\nbf16 = true'))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(tiny_config), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "steps/distill-aux-both-att0.5-scan_2/lowmag.json").read_text())
    runtime = spec["provenance"]["config"]["runtime"]
    assert runtime["device"].startswith("cuda") and runtime["bf16_autocast"] is True
    metrics = json.loads((out / "steps/teacher-scan/metrics.json").read_text())["metrics"]
    assert np.isfinite(metrics["macro_f1"]["value"])
