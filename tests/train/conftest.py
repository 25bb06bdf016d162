"""A tiny labeled image folder and experiment config, made on the fly for end-to-end tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

CLASSES = ("a_stripes", "b_dots", "c_flat")
SIDE = 40  # px at 0.5 µm/px; the student reads them at 1.0 µm/px (20 px)


def _image(kind: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIDE + 4, 0:SIDE + 4]
    base = rng.integers(150, 200, size=3)
    if kind == 0:
        pattern = ((xx + rng.integers(0, 8)) // 4) % 2
    elif kind == 1:
        pattern = ((xx % 8 < 3) & (yy % 8 < 3)).astype(int)
    else:
        pattern = np.zeros_like(xx)
    rgb = base[None, None, :] - 90 * pattern[..., None] + rng.integers(-10, 10, size=(*xx.shape, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: int = 12, groups_per_class: int = 4, seed: int = 0) -> Path:
    import pyvips

    rng = np.random.default_rng(seed)
    rows = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"{name}/{i:03d}.png"
            pyvips.Image.new_from_array(_image(label, rng), interpretation="srgb").pngsave(str(root / rel))
            rows.append({"path": rel, "label": name, "source_image": f"src{i % groups_per_class}"})
    with open(root / "tiles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "source_image"])
        writer.writeheader()
        writer.writerows(rows)
    return root


TINY_CONFIG = """
name = "tiny"
seed = 1
architecture = "resnet18"
teacher_resolution = "scan"
student_resolutions = ["scan/2"]

[data]
images = "{images}"
scan_mpp = 0.5
metadata = "tiles.csv"
group_by = ["label", "source_image"]
crop_px = {side}
split = {{ train = 0.5, test = 0.25, val = 0.25 }}
labeled_fraction = 0.5

[teacher]
epochs = 1
batch_size = 8

[student]
epochs = 1
batch_size = 8

[distill]
temperature = 2.0
regimes = ["labeled", "labeled+unlabeled"]
attention_weight = 0.5
ablation = ["maxpool"]

[finetune]
enabled = true
epochs = 1

[evaluation]
bootstrap = 200

[runtime]
device = "cpu"
"""


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: a second thread only adds contention on a 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny-images"))


@pytest.fixture()
def tiny_config(tmp_path: Path, tiny_images: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_CONFIG.format(images=tiny_images.as_posix(), side=SIDE), encoding="utf-8")
    return path
