"""The training loop resumes an interrupted step from its last finished epoch, identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmag.labeled import scan_image_folder
from lowmag.spec import Normalization
from lowmag.train.cache import build_cache
from lowmag.train.config import PhaseConfig, RuntimeConfig
from lowmag.train.datasets import MultiResolutionDataset
from lowmag.train.engine import fit, make_runtime
from lowmag.train.models import build_model
from lowmag.train.phases import _cross_entropy

from .conftest import SIDE


def _setup(images: Path, cache_dir: Path):
    classes, items = scan_image_folder(images, scan_mpp=0.5, crop_px=SIDE)
    cache = build_cache(items, 1.0, cache_dir)
    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return classes, MultiResolutionDataset([cache], [i.label for i in items], norm, None, seed=3)


def _train(classes, dataset, epochs: int, workdir: Path):
    torch.manual_seed(0)
    model = build_model("resnet18", len(classes))
    runtime = make_runtime(RuntimeConfig(device="cpu"))
    phase = PhaseConfig(epochs=epochs, batch_size=12, lr=1e-3)
    return fit(model, _cross_entropy(), dataset, phase, runtime, workdir, seed=5)


def test_a_step_stopped_after_epoch_one_continues_as_if_never_stopped(tiny_images: Path, tmp_path: Path) -> None:
    classes, dataset = _setup(tiny_images, tmp_path / "cache")
    straight = _train(classes, dataset, 2, tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    first = _train(classes, dataset, 1, interrupted)  # as if killed right after epoch 1
    assert (interrupted / "train_state.pt").is_file()
    resumed = _train(classes, dataset, 2, interrupted)

    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]
    assert all(h["train_seconds"] > 0 for h in resumed.history)
    assert abs(resumed.history[1]["loss"] - straight.history[1]["loss"]) < 1e-4
    for key, value in straight.best_state.items():
        assert torch.allclose(value, resumed.best_state[key], atol=1e-5), key


def test_the_learning_rate_schedule_warms_up_then_follows_a_cosine_to_its_floor():
    from lowmag.train.config import PhaseConfig

    phase = PhaseConfig(epochs=10, lr=1e-3, schedule="cosine", warmup_epochs=2, min_lr_fraction=0.1)
    rates = [phase.lr_at(e) for e in range(10)]
    assert rates[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))  # never rises after the warm-up
    assert rates[-1] == pytest.approx(1e-4)
    assert PhaseConfig(epochs=5, lr=2e-3).lr_at(4) == 2e-3  # constant by default, as before
