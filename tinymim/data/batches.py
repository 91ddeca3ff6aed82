"""Batch sources for the engine: reproducible from (epoch, start) so resume is exact.

A batch source yields one list per optimiser step: the micro-batches of this rank's share of
the step (`epoch(epoch, start, micro)`), as the host produced them, and turns each
micro-batch into the task's inputs on the device (`prepare`). Loading in micro-batches keeps
the memory in flight at micro-batch x prefetch x workers, whatever the effective batch.

`LoaderBatches` reads an augmentation recipe's samples (`augment.py`) through a DataLoader
with a seeded, resumable sampler; `TensorBatches` slices tensors already in memory, unchanged
(tests, timing runs). Both shard across DDP ranks: a step's global batch is the same
whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import derive_seed
from ..devices import loader_options
from .augment import Source, collate, sample_seed


class Batches(Protocol):
    """What the engine iterates."""

    def __len__(self) -> int: ...  # steps per epoch

    def epoch(self, epoch: int, start: int = 0, micro: int | None = None) -> Iterator[list[Any]]: ...

    def prepare(self, micro_batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]: ...


def _check(n: int, batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world size {world_size}")
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n} samples)")


class TensorBatches:
    """Shuffled mini-batches sliced from in-memory tensors, with no augmentation.

    The order of epoch e is a pure function of (seed, e), so a resumed run sees exactly
    the batches an uninterrupted one would; under DDP each rank takes a strided share.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError("all tensors must have the same length")
        _check(n, batch_size, world_size)
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return len(self.tensors[0]) // self.batch_size

    def epoch(self, epoch: int, start: int = 0, micro: int | None = None) -> Iterator[list[tuple[torch.Tensor, ...]]]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        order = torch.randperm(len(self.tensors[0]), generator=g)
        per_rank = self.batch_size // self.world_size
        micro = micro or per_rank
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world_size]
            yield [tuple(t[idx[m:m + micro]] for t in self.tensors) for m in range(0, per_rank, micro)]

    def prepare(self, micro_batch: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device, non_blocking=True) for t in micro_batch)


class EpochSampler(Sampler[tuple[int, int]]):
    """A seeded per-epoch shuffle, split across ranks, that can start mid-epoch. It yields
    (epoch, index) -- the sample's augmentation is seeded by both -- and only whole steps."""

    def __init__(self, n: int, seed: int, per_rank: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.seed, self.per_rank, self.rank, self.world, self.shuffle = n, seed, per_rank, rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_sample: int) -> None:
        self.epoch, self.start = epoch, start_sample

    def _count(self) -> int:
        return (self.n // self.world) // self.per_rank * self.per_rank  # whole steps only

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch)))
                 if self.shuffle else torch.arange(self.n))
        usable = self.n - self.n % self.world
        mine = order[:usable][self.rank::self.world][self.start:self._count()]
        return ((self.epoch, i) for i in mine.tolist())

    def __len__(self) -> int:
        return self._count() - self.start


class Augmented(Dataset):
    """`recipe.host` of each sample of `source`, under that sample's seed: a function of
    (seed, epoch, index) only, whichever worker or rank draws it."""

    def __init__(self, source: Source, recipe: Any, seed: int = 0):
        self.source, self.recipe, self.seed = source, recipe, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        with sample_seed(derive_seed(self.seed, "sample", epoch, index)):
            return self.recipe.host(self.source, index)


class LoaderBatches:
    """Engine batches from an `Augmented` dataset through one DataLoader per run, in
    micro-batches, its workers kept alive across epochs (`devices.loader_options`: pinned
    memory on GPU hosts, prefetch), so an ImageNet epoch boundary does not stall the
    accelerator while workers restart. The sample order and every host-side draw are seeded,
    so a resumed run continues exactly; the workers never touch the training RNG."""

    def __init__(self, dataset: Augmented, batch_size: int, seed: int = 0, num_workers: int | None = 0,
                 rank: int = 0, world_size: int = 1):
        _check(len(dataset), batch_size, world_size)
        self.dataset, self.seed, self.rank, self.num_workers = dataset, seed, rank, num_workers
        self.per_rank = batch_size // world_size
        self.sampler = EpochSampler(len(dataset), seed, self.per_rank, rank, world_size)
        self.steps = (len(dataset) // world_size) // self.per_rank
        self.loader: DataLoader | None = None
        self.micro = self.per_rank

    def __len__(self) -> int:
        return self.steps

    @property
    def record(self) -> dict[str, Any] | None:
        """Which images these batches draw from (`data.train_source`'s record): the run's data.json."""
        return getattr(self.dataset.source, "record", None)

    def epoch(self, epoch: int, start: int = 0, micro: int | None = None) -> Iterator[list[dict[str, Any]]]:
        self.sampler.set_position(epoch, start * self.per_rank)  # read when the loader is iterated
        if self.loader is None:
            self.micro = micro or self.per_rank
            if self.per_rank % self.micro:
                raise ValueError(f"micro-batch {self.micro} does not divide the per-rank batch {self.per_rank}")
            # its own generator: creating the loader's iterator must not draw from the training RNG
            g = torch.Generator().manual_seed(derive_seed(self.seed, "workers", self.rank))
            self.loader = DataLoader(self.dataset, batch_size=self.micro, sampler=self.sampler, drop_last=True,
                                     collate_fn=collate, generator=g, **loader_options(self.num_workers))
        accum, step = self.per_rank // self.micro, []
        for micro_batch in self.loader:
            step.append(micro_batch)
            if len(step) == accum:
                yield step
                step = []

    def prepare(self, micro_batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
        return self.dataset.recipe.device(micro_batch, device)
