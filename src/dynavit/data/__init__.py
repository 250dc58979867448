"""Datasets and loaders for `dynavit train` / `dynavit eval`: ImageNet-style folders and the embedded demo.

`build_dataset(data, split, ...)` takes a folder (`DIR/train/<class>/...`, `DIR/val/<class>/...`) or the
word `demo`. `make_loader` shards with `ShardedSampler`, which is what makes runs reproducible: the order is a
pure function of (seed, epoch), rank r takes positions r, r + W, r + 2W, ... of it (so W processes with batch
B see, step by step, the same images as one process with batch W*B), and a resumed run starts mid-epoch at
the batch where the checkpoint was written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError
from .demo import DemoDataset
from .folder import ImageFolder, collate_skip
from .transforms import AugmentConfig, TrainAugment, eval_batch

__all__ = ["build_dataset", "make_loader", "ShardedSampler", "DemoDataset", "ImageFolder", "AugmentConfig",
           "TrainAugment", "eval_batch", "collate_skip"]


def build_dataset(data: str, split: str, img_size: int = 224, train: bool = False, seed: int = 0,
                  classes: Optional[list] = None, demo_size: Optional[int] = None, demo_cache: bool = False,
                  random_crop: Optional[tuple] = None, crop_seed: int = 0):
    """`data` = 'demo' or an ImageNet-style root (with `split` sub-folder, or itself a split folder).

    random_crop: (scale, ratio) for DeiT's RandomResizedCrop on the workers, on the full image (folders, training);
    the Trainer then skips the batched crop (`ImageFolder.crops_on_worker`); crop_seed seeds those crops.

    The demo is rendered at min(224, img_size) (its digits scale with the image; random crops, if any, happen on
    the batch); `demo_cache` renders it once into `~/.cache/dynavit` (for fast GPU runs).
    """
    if data == "demo":
        size = min(224, int(img_size))
        return DemoDataset(split, seed=seed, n=demo_size, size=size, cache=demo_cache)
    root = Path(data)
    folder = root / split if (root / split).is_dir() else root
    return ImageFolder(folder, img_size=img_size, train=train, classes=classes, random_crop=random_crop,
                       seed=crop_seed)


class ShardedSampler(Sampler):
    """Indices of one rank's share of an epoch: order by (seed, epoch), positions rank::world, from `start`.

    With drop_last the epoch is cut to a multiple of world * batch_size (equal steps on every rank); without
    it, nothing is padded or repeated (evaluation counts every image exactly once).
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 batch_size: int = 1, drop_last: bool = False, with_epoch: bool = False):
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.batch_size, self.drop_last = batch_size, drop_last
        self.with_epoch = with_epoch  # yield (index, epoch): per-image augmentation seeded by the epoch
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def steps_per_epoch(self) -> int:
        per_rank = self.n // self.world if self.drop_last else -(-max(self.n - self.rank, 0) // self.world)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _indices(self) -> list:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[:self.steps_per_epoch() * self.batch_size * self.world]
        return order[self.rank::self.world][self.start_batch * self.batch_size:]

    def __iter__(self):
        if self.with_epoch:
            return iter([(i, self.epoch) for i in self._indices()])
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def default_workers() -> int:
    """DataLoader workers: half the cores (the other half trains), at most 8."""
    return max(0, min(8, (os.cpu_count() or 2) // 2))


def make_loader(dataset, batch_size: int, train: bool, rank: int = 0, world: int = 1, seed: int = 0,
                workers: Optional[int] = None, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over `dataset` with a `ShardedSampler` (call `loader.sampler.set_epoch(e, start)`)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    sampler = ShardedSampler(len(dataset), rank, world, shuffle=train, seed=seed, batch_size=batch_size,
                             drop_last=train, with_epoch=bool(getattr(dataset, "wants_epoch", False)))
    workers = default_workers() if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_skip, pin_memory=pin_memory, drop_last=False,
                      persistent_workers=train and workers > 0, prefetch_factor=4 if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))  # never touches the global RNG
