"""scikit-learn's bundled handwritten digits as a built-in dataset (`data="digits"`).

Why it exists: every other number of the kit is on its own synthetic shapes; these are
1 797 real 8 x 8 scans of handwritten digits by 43 people (UCI "Optical Recognition of
Handwritten Digits", shipped inside scikit-learn, so nothing downloads), 10 classes.

The conventions of the synthetic data: a stratified 80/20 train/val split fixed by
`data_seed` (scikit-learn's `train_test_split`); the unlabelled `pool` for (MAE /
distillation) pre-training is every training image; the labelled `train` split is
`LABELLED_PER_CLASS` training images per class (scarce labels, where pre-training can
pay); `val` is held out from both. Pixels (0..16 ink) scale to uint8 and are upscaled
from 8 x 8 to the input size with bilinear interpolation (`torch.nn.functional.interpolate`,
align_corners=False, antialias off: an upscale), grey copied to 3 channels. No masks:
there is no segmentation on digits.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

VAL_FRACTION = 0.2
LABELLED_PER_CLASS = 30  # the labelled split: 300 of the ~1 437 training images
SPLITS = ("pool", "train", "val")
FILTER = "bilinear"  # how 8 x 8 becomes the input size (stated in the reports)
CLASSES = [str(d) for d in range(10)]


@cache
def _split_indices(seed: int) -> dict[str, np.ndarray]:
    """Indices into scikit-learn's 1 797 images of each split, in ascending order."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train, val = train_test_split(np.arange(len(labels)), test_size=VAL_FRACTION, stratify=labels, random_state=seed)
    train, val = np.sort(train), np.sort(val)
    labelled = []
    for c in range(len(CLASSES)):
        members = train[labels[train] == c]
        rng = np.random.default_rng([seed, c])
        labelled += members[rng.permutation(len(members))[:LABELLED_PER_CLASS]].tolist()
    return {"pool": train, "train": np.sort(np.array(labelled)), "val": val}


class Digits:
    """A split of the digits as uint8 N x 3 x S x S tensors in memory (`images`, `labels`;
    `masks` None), the interface of `SyntheticShapes`."""

    def __init__(self, split: str, image_size: int = 32, seed: int = 0, size: int | None = None):
        from sklearn.datasets import load_digits

        if split not in SPLITS:
            raise ValueError(f"digits: unknown split {split!r}; expected one of {SPLITS}")
        data = load_digits()
        index = _split_indices(seed)[split][:size]
        pixels = torch.from_numpy(data.images[index]).float().mul(255.0 / 16.0)  # N x 8 x 8, 0..255
        up = F.interpolate(pixels[:, None], size=(image_size, image_size), mode=FILTER, align_corners=False)
        self.images = up.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        self.labels = torch.from_numpy(data.target[index]).long()
        self.masks = None
        self.classes = list(CLASSES)
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
