"""The installed distribution: entry points, namespace mapping, and a torch-free edge."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ..conftest import REPO

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", ["lowmag", "distill-train", "export-student", "edge-classify"])
def test_entry_points_answer_help_and_version(command):
    exe = BIN / command
    assert exe.exists(), f"{command} is not installed next to {sys.executable}"
    help_run = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "Usage:" in help_run.stdout
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and "lowmag 0.1.0" in version.stdout


def test_stage_folders_are_mapped_into_the_namespace():
    import lowmag.calibration
    import lowmag.edge
    import lowmag.export
    import lowmag.train

    for module, folder in [(lowmag.train, "train"), (lowmag.export, "export"),
                           (lowmag.edge, "edge"), (lowmag.calibration, "calibration")]:
        assert Path(module.__file__).resolve().parent == REPO / folder


TORCH_FREE = r"""
import sys
import lowmag, lowmag.edge, lowmag.edge.cli, lowmag.cli
from lowmag import open_slide, read_at_mpp, locate_tissue, read_spec
from lowmag.synthetic import make_synthetic_slide
path = make_synthetic_slide(sys.argv[1], 512, 384, mpp=0.5)
with open_slide(path) as slide:
    read_at_mpp(slide, "1.25x")
    locate_tissue(slide)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "torchvision", "onnx", "nncf"})
print("HEAVY:", heavy)
sys.exit(1 if heavy else 0)
"""


def test_core_and_edge_run_without_importing_torch(tmp_path):
    pytest.importorskip("torch")  # only meaningful where torch is installed
    result = subprocess.run([sys.executable, "-c", TORCH_FREE, str(tmp_path / "s.tif")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_holds_every_stage_under_lowmag(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("lowmag-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("lowmag/reader.py", "lowmag/train/cli.py", "lowmag/export/cli.py",
                   "lowmag/edge/cli.py", "lowmag/calibration/__init__.py"):
        assert module in names
    assert not any(n.startswith(("train/", "edge/", "tests/")) for n in names)
