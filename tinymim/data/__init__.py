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
from .cache import cached_folder
from .digits import CLASSES as DIGIT_CLASSES
from .digits import FILTER as DIGITS_FILTER
from .digits import LABELLED_PER_CLASS as DIGITS_LABELLED
from .digits import VAL_FRACTION as DIGITS_VAL
from .digits import Digits
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
# the datasets that need no files: config `data` is one of these names or a folder
BUILTIN = ("synthetic", "digits")


def synthetic(split: str, cfg: Any | None = None, size: int | None = None) -> SyntheticShapes:
    """A split of the synthetic data at the config's input size and `data_seed`."""
    return SyntheticShapes(SyntheticSpec(image_size=getattr(cfg, "input_size", 32)), split,
                           size or SMOKE_SPLITS[split], seed=getattr(cfg, "data_seed", 0))


def is_builtin(data: str) -> bool:
    return data in BUILTIN


def builtin(split: str, cfg: Any, size: int | None = None) -> SyntheticShapes | Digits:
    """The first `size` images (None: all) of a split (`pool`, `train` = labelled, `val`) of
    the config's built-in dataset, at its input size and `data_seed`: uint8 `images`,
    `labels`, `masks` (None for digits), `classes`."""
    if cfg.data == "digits":
        return Digits(split, cfg.input_size, cfg.data_seed, size)
    if cfg.data != "synthetic":
        raise DataError(f"data: {cfg.data!r} is a folder, not one of the built-in datasets {BUILTIN}")
    return synthetic(split, cfg, size)


def classes_of(data: str) -> list[str]:
    """The class names of a dataset: a built-in one's, or the sorted class folders of
    `<data>/train` (what `num_classes` defaults to)."""
    if data == "synthetic":
        return SyntheticSpec().class_names
    if data == "digits":
        return list(DIGIT_CLASSES)
    return folder_classes(split_dir(data, "train"))


def has_masks(data: str) -> bool:
    """Whether segmentation can run on the dataset: the synthetic data's masks, or a folder that
    is not an image-classification root (train/ class folders without annotations/): an ADE20K
    root, whose layout its loader checks and names."""
    if is_builtin(data):
        return data == "synthetic"
    root = Path(data)
    return not ((root / "train").is_dir() and not (root / "annotations").is_dir())


def short_name(data: str) -> str:
    """A dataset's name in a column, a folder name or a "-C" label: the built-in name, or the
    folder's own name."""
    return data if is_builtin(data) else Path(data).name


def describe(data: str) -> str:
    """One line naming a dataset, for reports and logs."""
    if data == "synthetic":
        return "the built-in synthetic shapes"
    if data == "digits":
        return (f"scikit-learn's handwritten digits (8 x 8, upscaled {DIGITS_FILTER}; stratified "
                f"{1 - DIGITS_VAL:.0%}/{DIGITS_VAL:.0%} train/val split, {DIGITS_LABELLED} labelled per class)")
    return f"the image folders at {data}"


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """`root/<split>` of an ImageNet root; for 'train' a folder of class folders is
    accepted as it is."""
    path = Path(root) / split
    if path.is_dir():
        return path
    if split == "train" and Path(root).is_dir():
        return Path(root)
    raise DataError(f"{path}: no '{split}' folder under the dataset root {root}")


def stratified(labels: list[int], n: int, seed: int, names: list[str], what: str = "data_limit") -> list[int]:
    """`n` sample indices drawn per class in proportion to the class sizes (largest remainders,
    at least one each), seeded, in file order. The first `n` files of a folder are sorted by
    class -- a few classes only -- so `data_limit` draws this instead, and refuses a subset
    that would miss a class."""
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
        raise DataError(f"{what}={n} of {len(labels)} images would leave out {len(missed)} class(es) "
                        f"{missed[:5]}{' ...' if len(missed) > 5 else ''}: a stratified subset needs at least one image "
                        f"per class; raise {what} to {len(classes)} or more (or drop it)")
    picked: list[int] = []
    for c, q in zip(classes, quota):
        rng = np.random.default_rng([seed, c])
        picked += [by_class[c][j] for j in rng.permutation(len(by_class[c]))[:q]]
    return sorted(picked)


def limit(source: Any, n: int | None, seed: int = 0, what: str = "data_limit") -> Subsample:
    """At most `n` samples of a labelled `source` (config `data_limit`), stratified by class
    (`stratified`, seeded by `data_seed`, so every run seed sees the same subset), with a
    `record` of what was drawn (the run's data.json)."""
    labels = source.targets
    picked = (list(range(len(labels))) if n is None or n >= len(labels)
              else stratified(labels, n, seed, source.classes, what))
    counts: dict[str, int] = {}
    for i in picked:
        counts[source.classes[labels[i]]] = counts.get(source.classes[labels[i]], 0) + 1
    record = {"images": len(picked), "of": len(labels), "data_limit": n, "data_seed": seed,
              "subset": "stratified by class" if len(picked) < len(labels) else "all",
              "per_class": dict(sorted(counts.items()))}
    return Subsample(source, picked, record)


def train_source(cfg: Any, split: str = "train", classes: list[str] | None = None, masks: bool = False) -> Subsample:
    """The images a stage trains on: a built-in split (`pool` for pre-training, `train` for
    the labelled set) or `<data>/train` class folders labelled by `classes`; at most
    `cfg.data_limit` of them (a stratified subset); a small folder decoded once at the input
    size (`cached_folder`). Its `record` says which images, for the run's data.json."""
    if is_builtin(cfg.data):
        ds = builtin(split, cfg)
        source = MemoryImages(ds.images, ds.labels, ds.masks if masks else None, classes=ds.classes)
        subset = limit(source, cfg.data_limit, cfg.data_seed)
        subset.record |= {"data": cfg.data, "split": split}
        return subset
    folder = ImageNetFolder(split_dir(cfg.data, "train"), classes=classes)
    subset = limit(folder, cfg.data_limit, cfg.data_seed)
    subset.record |= {"data": str(cfg.data), "split": "train", "decoded_once": None}
    return cached_folder(subset, cfg.input_size) or subset


def batches(cfg: Any, source: Any, recipe: Any, rank: int = 0, world_size: int = 1) -> LoaderBatches:
    """The engine's batches of `source` augmented by `recipe`, seeded by the config."""
    return LoaderBatches(Augmented(source, recipe, cfg.seed), cfg.batch_size, seed=cfg.seed,
                         num_workers=cfg.num_workers, rank=rank, world_size=world_size)


__all__ = [
    "ADE20K", "Augmented", "BUILTIN", "Classify", "DataError", "Digits", "IGNORE_INDEX", "ImageNetFolder",
    "LoaderBatches", "MemoryImages", "SHAPES", "SMOKE_SPLITS", "Segment", "Subsample", "SyntheticShapes",
    "SyntheticSpec", "TensorBatches", "Views", "batches", "builtin", "cached_folder", "check_images", "classes_of",
    "decode_file", "describe", "folder_classes", "has_masks", "is_builtin", "limit", "open_rgb", "reduce_zero_label",
    "resource_lines", "short_name", "split_dir", "stratified", "synthetic", "train_source",
]
