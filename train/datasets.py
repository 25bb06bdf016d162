"""Torch datasets over pixel caches: one image at one or more resolutions, augmented alike."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lowmag.spec import Normalization
from lowmag.train.augment import AugmentConfig, apply, draw, identity
from lowmag.train.cache import PixelCache

NO_LABEL = -1


class MultiResolutionDataset(Dataset):
    """Item ``i`` of every cache (the same image at several µm/px), one shared augmentation.

    Randomness comes from (seed, epoch, index), so a run draws the same augmentations
    whatever the number of workers or processes, and a resumed run continues identically.
    """

    def __init__(
        self,
        caches: Sequence[PixelCache],
        labels: Sequence[int | None],
        normalization: Normalization,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        if any(len(c) != len(labels) for c in caches):
            raise ValueError("every cache must hold the same items as the labels")
        self.caches = list(caches)
        self.labels = [NO_LABEL if label is None else int(label) for label in labels]
        self.mean = torch.tensor(normalization.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(normalization.std, dtype=torch.float32).view(3, 1, 1)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        if self.augment is not None:
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
            params = draw(self.augment, generator)
        else:
            params = identity()
        images = []
        for cache in self.caches:
            rgb = torch.from_numpy(np.array(cache[index])).permute(2, 0, 1).float() / 255.0
            images.append((apply(rgb, params) - self.mean) / self.std)
        return images, self.labels[index]

    @property
    def batchable(self) -> bool:
        return all(c.uniform_shape is not None for c in self.caches)


def make_loader(
    dataset: MultiResolutionDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    workers: int = 0,
    distributed: bool = False,
) -> tuple[DataLoader, int]:
    """A loader and the number of its batches to accumulate per optimiser step.

    Fixed-size tiles batch normally; variable-size images (tissue pieces) go through one at
    a time and the gradient is accumulated over ``batch_size`` of them.
    """
    per_step = batch_size if dataset.batchable else 1
    accumulate = 1 if dataset.batchable else batch_size
    sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=per_step,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        drop_last=False,
        persistent_workers=False,
    )
    return loader, accumulate
