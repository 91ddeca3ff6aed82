"""Data: the built-in synthetic dataset, folders on disk, augmentation, and batch sources.

`synthetic` makes the smoke profile's data from a seed; `folders` reads ImageNet-style
folders and ADE20K; `sources` decodes files and holds in-memory images; `augment` has each
stage's recipe (host half per sample, device half per batch); `batches` feeds the engine.
The helpers below turn a config's `data` field into a source, and a source and a recipe
into what the engine iterates -- the same path for the built-in data and for folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .augment import Classify, Segment, Views
from .batches import Augmented, LoaderBatches, TensorBatches
from .folders import (
    ADE20K,
    IGNORE_INDEX,
    ImageNetFolder,
    check_images,
    folder_classes,
    reduce_zero_label,
    resource_lines,
)
from .sources import DataError, MemoryImages, Subsample, decode_file, open_rgb
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


def stratified(labels: list[int], n: int, seed: int, names: list[str]) -> list[int]:
    """`n` sample indices drawn per class in proportion to the class sizes (largest remainders,
    at least one each), seeded, in file order. The first `n` files of a folder are sorted by class -- a few classes
    only -- so `data_limit` draws this instead, and refuses a subset that would miss a class."""
    import numpy as np

    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    classes = sorted(by_class)
    shares = [n * len(by_class[c]) / len(labels) for c in classes]
    quota = [int(x) for x in shares]
    for k in sorted(range(len(classes)), key=lambda k: (quota[k] - shares[k], k))[:n - sum(quota)]:
        quota[k] += 1
    missed = [names[c] for c, q in zip(classes, quota) if q == 0]
    if missed and n >= len(classes):  # room for every class: one image each from the largest quotas
        for k in [k for k, q in enumerate(quota) if q == 0]:
            quota[max(range(len(quota)), key=lambda j: quota[j])] -= 1
            quota[k] = 1
        missed = []
    if missed:
        raise DataError(f"data_limit={n} of {len(labels)} images would leave out {len(missed)} class(es) "
                        f"{missed[:5]}{' ...' if len(missed) > 5 else ''}: a stratified subset needs at least one image "
                        f"per class; raise data_limit (or drop it)")
    picked: list[int] = []
    for c, q in zip(classes, quota):
        rng = np.random.default_rng([seed, c])
        picked += [by_class[c][j] for j in rng.permutation(len(by_class[c]))[:q]]
    return sorted(picked)


def limit(source: Any, n: int | None, seed: int = 0) -> Any:
    """At most `n` samples of a folder `source` (config `data_limit`), stratified by class
    (`stratified`, seeded by `data_seed`, so every run seed sees the same subset)."""
    if n is None or n >= len(source):
        return source
    return Subsample(source, stratified([t for _, t in source.samples], n, seed, source.classes))


def train_source(cfg: Any, split: str = "train", classes: list[str] | None = None, masks: bool = False) -> Any:
    """The images a stage trains on: the synthetic split (`pool` for pre-training, `train`
    for the labelled set) or `<data>/train` class folders labelled by `classes`; at most
    `cfg.data_limit` of them."""
    if cfg.data == "synthetic":
        ds = synthetic(split, cfg, size=cfg.data_limit)
        return MemoryImages(ds.images, ds.labels, ds.masks if masks else None)
    return limit(ImageNetFolder(split_dir(cfg.data, "train"), classes=classes), cfg.data_limit, cfg.data_seed)


def batches(cfg: Any, source: Any, recipe: Any, rank: int = 0, world_size: int = 1) -> LoaderBatches:
    """The engine's batches of `source` augmented by `recipe`, seeded by the config."""
    return LoaderBatches(Augmented(source, recipe, cfg.seed), cfg.batch_size, seed=cfg.seed,
                         num_workers=cfg.num_workers, rank=rank, world_size=world_size)


__all__ = [
    "ADE20K", "Augmented", "Classify", "DataError", "IGNORE_INDEX", "ImageNetFolder", "LoaderBatches",
    "MemoryImages", "SHAPES", "SMOKE_SPLITS", "Segment", "Subsample", "SyntheticShapes", "SyntheticSpec",
    "TensorBatches", "Views", "batches", "check_images", "decode_file", "folder_classes", "limit", "open_rgb",
    "reduce_zero_label", "resource_lines", "split_dir", "stratified", "synthetic", "train_source",
]
