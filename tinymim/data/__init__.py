"""Data: the built-in synthetic dataset, folders on disk, and batch sources for the engine.

`synthetic` makes the smoke profile's data from a seed; `folders` reads ImageNet-style
folders and ADE20K; `transforms` holds the batched augmentations for in-memory data.
The helpers below turn a config's `data` field into what the engine iterates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from .batches import LoaderBatches, TensorBatches
from .folders import (
    ADE20K,
    IGNORE_INDEX,
    DataError,
    ImageNetFolder,
    check_images,
    folder_classes,
    open_rgb,
    reduce_zero_label,
    resource_lines,
)
from .synthetic import SHAPES, SyntheticShapes, SyntheticSpec

# sizes of the synthetic splits in the smoke profile: a large unlabelled pool for
# (MAE / distillation) pre-training and a smaller labelled set, where pre-training pays
SMOKE_SPLITS = {"pool": 20000, "train": 5000, "val": 2000}


def synthetic(split: str, cfg: Any | None = None, size: int | None = None) -> SyntheticShapes:
    """A split of the synthetic data at the config's input size and `data_seed`."""
    return SyntheticShapes(SyntheticSpec(image_size=getattr(cfg, "input_size", 32)), split,
                           size or SMOKE_SPLITS[split], seed=getattr(cfg, "data_seed", 0))


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """`root/<split>` of an ImageNet root; for 'train' a folder of class folders is
    accepted as it is."""
    path = Path(root) / split
    if path.is_dir():
        return path
    if split == "train" and Path(root).is_dir():
        return Path(root)
    raise DataError(f"{path}: no '{split}' folder under the dataset root {root}")


def limit(ds: Dataset, n: int | None) -> Dataset:
    """The first `n` samples of `ds` (config `data_limit`: quick trials on real folders)."""
    return ds if n is None or n >= len(ds) else Subset(ds, range(n))


def pool_batches(cfg: Any, rank: int = 0, world_size: int = 1):
    """Unlabelled images for pre-training (MAE or distillation), as engine batches.

    Synthetic: uint8 tensors, augmented on the fly by the task. A folder: an
    ImageNet-style tree read with RandomResizedCrop + flip per sample.
    """
    if cfg.data == "synthetic":
        pool = synthetic("pool", cfg, size=cfg.data_limit)
        return TensorBatches(pool.images, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size)
    from torchvision import transforms as T

    from .transforms import IMAGENET_MEAN, IMAGENET_STD

    tf = T.Compose([
        T.RandomResizedCrop(cfg.input_size, scale=tuple(cfg.crop_scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    ds = limit(ImageNetFolder(split_dir(cfg.data, "train"), transform=tf), cfg.data_limit)
    return LoaderBatches(ds, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, rank=rank,
                         world_size=world_size)


def two_view_batches(cfg: Any, rank: int = 0, world_size: int = 1):
    """Unlabelled images for distillation. Synthetic: uint8 batches (the task makes the
    two views); a folder: (student_view, teacher_view) per sample, TwoViews' recipe."""
    if cfg.data == "synthetic":
        return pool_batches(cfg, rank, world_size)
    from .transforms import TwoViews

    views = TwoViews(cfg.input_size, tuple(cfg.crop_scale), cfg.color_jitter).per_sample()
    ds = limit(ImageNetFolder(split_dir(cfg.data, "train"), transform=views), cfg.data_limit)
    return LoaderBatches(ds, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, rank=rank,
                         world_size=world_size)


__all__ = [
    "IGNORE_INDEX", "ADE20K", "DataError", "ImageNetFolder", "check_images", "folder_classes", "LoaderBatches", "SHAPES", "SMOKE_SPLITS", "SyntheticShapes",
    "SyntheticSpec", "TensorBatches", "limit", "open_rgb", "pool_batches", "reduce_zero_label", "resource_lines",
    "split_dir", "synthetic", "two_view_batches",
]
