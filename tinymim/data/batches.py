"""Batch sources for the engine: reproducible from (epoch, start) so resume is exact.

`TensorBatches` slices in-memory tensors (the synthetic data); `LoaderBatches` wraps
a map-style dataset on disk in a DataLoader with a seeded, resumable sampler. Both
shard across DDP ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import derive_seed
from ..devices import loader_options


class TensorBatches:
    """Shuffled mini-batches sliced from in-memory tensors (the synthetic data).

    The order of epoch e is a pure function of (seed, e), so a resumed run sees exactly
    the batches an uninterrupted one would; under DDP each rank takes a strided share.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError("all tensors must have the same length")
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n} samples)")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world size {world_size}")
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return len(self.tensors[0]) // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        order = torch.randperm(len(self.tensors[0]), generator=g)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world_size]
            yield tuple(t[idx] for t in self.tensors)


class EpochSampler(Sampler[int]):
    """A seeded per-epoch shuffle, split across ranks, that can start mid-epoch."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_sample: int) -> None:
        self.epoch, self.start = epoch, start_sample

    def __iter__(self) -> Iterator[int]:
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch)))
                 if self.shuffle else torch.arange(self.n))
        usable = self.n - self.n % self.world
        return iter(order[:usable][self.rank::self.world][self.start:].tolist())

    def __len__(self) -> int:
        return self.n // self.world - self.start


class LoaderBatches:
    """Engine batches from a map-style dataset through a DataLoader (files on disk).

    One DataLoader per run, its workers kept alive across epochs (`devices.loader_options`:
    pinned memory on GPU hosts, prefetch), so an ImageNet epoch boundary does not stall the
    accelerator while workers restart. The workers' seeds come from a generator seeded by
    (seed, first epoch, rank): they never draw from -- or perturb -- the training RNG the
    engine checkpoints. The sample order resumes exactly; per-sample augmentation after a
    resume can differ, because samples land on other (re-seeded) workers.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, num_workers: int | None = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world size {world_size}")
        self.dataset, self.seed, self.rank, self.num_workers = dataset, seed, rank, num_workers
        self.per_rank = batch_size // world_size
        self.sampler = EpochSampler(len(dataset), seed, rank, world_size)
        self.steps = (len(dataset) // world_size) // self.per_rank
        self.loader: DataLoader | None = None
        if self.steps == 0:
            raise ValueError(f"dataset of {len(dataset)} samples is smaller than one batch ({batch_size})")

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0):
        self.sampler.set_position(epoch, start * self.per_rank)  # read when the loader is iterated
        if self.loader is None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "workers", epoch, self.rank))
            self.loader = DataLoader(self.dataset, batch_size=self.per_rank, sampler=self.sampler, drop_last=True,
                                     generator=g, **loader_options(self.num_workers))
        yield from self.loader
