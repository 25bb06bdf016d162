"""distill-train records, in each checkpoint's spec, what that model's training images looked like."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowmag.fingerprint import Fingerprint
from lowmag.train.config import load_config
from lowmag.train.engine import make_runtime
from lowmag.train.experiment import Experiment, Step

from .conftest import SIDE, TINY_CONFIG, make_image_folder


def test_each_step_fingerprints_its_own_training_images_at_its_own_resolution(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", per_class=48, groups_per_class=12)
    config_path = tmp_path / "config.toml"
    config_path.write_text(TINY_CONFIG.format(images=images.as_posix(), side=SIDE), encoding="utf-8")
    config = load_config(config_path)
    experiment = Experiment(config, tmp_path / "run", make_runtime(config.runtime))

    teacher = experiment.fingerprint(Step("teacher", "scan"))
    labeled = experiment.fingerprint(Step("distill", "scan/2"))
    with_aux = experiment.fingerprint(Step("distill", "scan/2", regime="labeled+unlabeled"))

    assert teacher["mpp"] == pytest.approx(0.5) and labeled["mpp"] == pytest.approx(1.0)
    assert min(teacher["images"], labeled["images"]) >= 20 and with_aux["images"] > labeled["images"]
    assert "labeled + unlabeled" in with_aux["source"] and teacher["held_out_windows"] > 0
    assert teacher["features"]["sharpness"]["median"] != labeled["features"]["sharpness"]["median"]
    assert not Fingerprint(teacher).check() and teacher["held_out_pass_rate"] >= 0.9
