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


def _train(classes, dataset, epochs: int, workdir: Path, mixup: float = 0.0):
    torch.manual_seed(0)
    model = build_model("resnet18", len(classes))
    runtime = make_runtime(RuntimeConfig(device="cpu"))
    phase = PhaseConfig(epochs=epochs, batch_size=12, lr=1e-3, mixup=mixup)
    return fit(model, _cross_entropy(), dataset, phase, runtime, workdir, seed=5)


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_a_step_stopped_after_epoch_one_continues_as_if_never_stopped(one_torch_thread, tiny_images: Path,
                                                                      tmp_path: Path, mixup: float) -> None:
    # One torch thread: with two, about 1 run in 10 on an Intel Xeon split a reduction
    # differently and the straight run's second-epoch loss moved by 1.8e-3, resume or not.
    classes, dataset = _setup(tiny_images, tmp_path / "cache")
    straight = _train(classes, dataset, 2, tmp_path / "straight", mixup)

    interrupted = tmp_path / "interrupted"
    first = _train(classes, dataset, 1, interrupted, mixup)  # as if killed right after epoch 1
    assert (interrupted / "train_state.pt").is_file()
    resumed = _train(classes, dataset, 2, interrupted, mixup)

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
    assert PhaseConfig(epochs=5, lr=2e-3, schedule="constant").lr_at(4) == 2e-3
    # the default recipe: one warm-up epoch, then a cosine; a one- or two-epoch run trains at lr
    default = PhaseConfig(epochs=4, lr=1e-3)
    assert [default.lr_at(e) for e in range(4)] == pytest.approx([1e-3, 1e-3, 0.505e-3, 1e-5])
    assert PhaseConfig(epochs=1, lr=1e-3).lr_at(0) == pytest.approx(1e-3)
    assert PhaseConfig(epochs=2, lr=1e-3).lr_at(1) == pytest.approx(1e-3)


def test_mixup_blends_every_resolution_alike_so_the_pair_stays_the_same_tissue():
    import numpy as np
    import torch.nn.functional as F

    from lowmag.train.engine import Mixed, mix_batch

    torch.manual_seed(1)
    high = torch.rand(6, 3, 32, 32)
    low = F.avg_pool2d(high, 4)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    (mixed_high, mixed_low), target = mix_batch([high, low], labels, 0.4, np.random.default_rng(7))
    assert isinstance(target, Mixed) and 0.5 <= target.lam < 1.0
    # blending is linear: downsampling the blended teacher image gives the blended student image
    assert torch.allclose(F.avg_pool2d(mixed_high, 4), mixed_low, atol=1e-6)
    partner = {int(a): int(b) for a, b in zip(target.a, target.b)}
    for i in range(6):
        expected = target.lam * high[i] + (1 - target.lam) * high[partner[i]]
        assert torch.allclose(mixed_high[i], expected, atol=1e-6)
    # the same draw from the same seed (a resumed epoch mixes alike)
    again, target2 = mix_batch([high, low], labels, 0.4, np.random.default_rng(7))
    assert target2.lam == target.lam and torch.equal(again[0], mixed_high)
    # off, or a single variable-size piece: untouched
    assert mix_batch([high], labels, 0.0, np.random.default_rng(7))[1] is labels
    single, same = mix_batch([high[:1]], labels[:1], 0.4, np.random.default_rng(7))
    assert same is not None and torch.equal(single[0], high[:1])


def test_the_label_loss_of_a_mixup_batch_is_the_blend_of_both_labels_losses():
    import torch.nn.functional as F

    from lowmag.train.engine import Mixed

    torch.manual_seed(2)
    logits = torch.randn(4, 3)
    model = lambda x: logits  # noqa: E731 - the step only needs logits
    a, b = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 1])
    step = _cross_entropy(0.1)
    blended = step(model, [torch.zeros(4)], Mixed(a, b, 0.7))
    expected = 0.7 * F.cross_entropy(logits, a, label_smoothing=0.1) + 0.3 * F.cross_entropy(logits, b, label_smoothing=0.1)
    assert torch.allclose(blended, expected)
    assert torch.allclose(step(model, [torch.zeros(4)], Mixed(a, b, 1.0)), step(model, [torch.zeros(4)], a))


def test_torchrun_with_more_processes_than_gpus_is_told_how_many_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two processes on a one-GPU machine: the second would ask for cuda:1 and die in torch
    # with "invalid device ordinal"; it is told the --nproc_per_node that fits instead.
    from lowmag.errors import LowmagError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LowmagError, match=r"started 2 processes .* sees 1 GPU\(s\).*--nproc_per_node=1"):
        make_runtime(RuntimeConfig(device="cuda"))


def test_a_plain_cuda_device_gets_its_index_before_torch_is_told_to_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.cuda.set_device(torch.device("cuda")) raises "Expected a torch.device with a
    # specified index"; every CUDA run failed so on the first GPU it met (an H200, torch 2.11).
    from torch._utils import _get_device_index

    told = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: told.append(_get_device_index(device)))
    for asked in ("cuda", "auto"):
        runtime = make_runtime(RuntimeConfig(device=asked))
        assert str(runtime.device) == "cuda:0" and runtime.channels_last and not runtime.bf16
    assert told == [0, 0]
