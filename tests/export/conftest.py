"""A small trained student, made once per test session, and real images to export it with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CLASSES = ("nuclei", "stripes", "stroma")
SIDE = 48  # px at 0.5 µm/px; the student reads them at 1.0 µm/px (24 px)
SCAN_MPP = 0.5

CONFIG = """
name = "export-fixture"
seed = 3
architecture = "resnet18"
teacher_resolution = "scan"
student_resolutions = ["scan/2"]

[data]
images = "{images}"
scan_mpp = {mpp}
split = {{ train = 0.6, test = 0.2, val = 0.2 }}
labeled_fraction = 1.0

[teacher]
epochs = 1
batch_size = 16

# The export tests need a student that classifies these textures well, not the default
# recipe (with it, one six-epoch run on these synthetic textures reached only 67 % accuracy):
# pinned to the plain recipe this fixture was built for.
[student]
epochs = {epochs}
batch_size = 4
lr = 0.002
schedule = "constant"
warmup_epochs = 0
weight_decay = 0.0

[augment]
hed = 0.0
hed_bias = 0.0

[distill]
regimes = ["labeled"]

[evaluation]
bootstrap = 0

[runtime]
device = "cpu"
"""


def he_tile(kind: int, rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """H&E-coloured texture: purple nuclei on pink, purple stripes, or plain pink stroma."""
    yy, xx = np.mgrid[0:side, 0:side]
    pink = np.array([225, 150, 190]) + rng.integers(-12, 12, size=3)
    purple = np.array([120, 60, 150]) + rng.integers(-12, 12, size=3)
    if kind == 0:
        cx, cy = rng.integers(0, side, size=(2, 8))
        mask = np.zeros((side, side), bool)
        for x, y in zip(cx, cy):  # nuclei 5-8 µm across: 2.5-4 px at the student's 1 µm/px
            mask |= (xx - x) ** 2 + (yy - y) ** 2 <= rng.integers(25, 64)
    elif kind == 1:
        period = int(rng.integers(8, 13))
        mask = ((xx + yy * rng.uniform(-0.5, 0.5) + rng.integers(0, period)) % period) < period // 2
    else:
        mask = np.zeros((side, side), bool)
    rgb = np.where(mask[..., None], purple, pink) + rng.normal(0, 8, size=(side, side, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def make_he_folder(root: Path, per_class: int, seed: int) -> Path:
    import pyvips

    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = he_tile(label, rng)
            pyvips.Image.new_from_array(pixels, interpretation="srgb").pngsave(str(root / name / f"{i:03d}.png"))
    return root


@pytest.fixture(scope="session")
def he_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training images (one subfolder per class)."""
    return make_he_folder(tmp_path_factory.mktemp("he-train"), per_class=40, seed=0)


@pytest.fixture(scope="session")
def he_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out labeled images drawn afresh, for the accuracy gate."""
    return make_he_folder(tmp_path_factory.mktemp("he-eval"), per_class=20, seed=1)


@pytest.fixture(scope="session")
def he_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labeled validation images for temperature scaling, with some label noise as real
    annotations have (3 per class filed under the next class): a model that is never wrong
    on validation leaves the temperature undetermined."""
    root = make_he_folder(tmp_path_factory.mktemp("he-val"), per_class=15, seed=2)
    for i, name in enumerate(CLASSES):
        for path in sorted((root / name).glob("*.png"))[:3]:
            path.rename(root / CLASSES[(i + 1) % len(CLASSES)] / f"noisy-{path.name}")
    return root


@pytest.fixture(scope="session")
def student(tmp_path_factory: pytest.TempPathFactory, he_images: Path) -> Path:
    """A ResNet-18 student trained for a few epochs on the H&E textures at 1 µm/px (10x)."""
    import torch
    from click.testing import CliRunner

    from lowmag.train.cli import main

    run = tmp_path_factory.mktemp("export-run")
    config = run / "experiment.toml"
    config.write_text(CONFIG.format(images=he_images.as_posix(), mpp=SCAN_MPP, epochs=6), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = CliRunner().invoke(main, ["baseline", str(config), "--out", str(run / "out"), "--resolution", "scan/2"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return run / "out" / "steps" / "baseline-scan_2"
