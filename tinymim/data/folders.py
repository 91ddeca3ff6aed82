"""Datasets read from disk: ImageNet-style class folders and ADE20K.

Both check their layout when constructed -- before any training starts -- and name
the offending path in every error: a missing annotation, an empty class folder or a
file that is not a decodable image.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

# the label of pixels that no loss or metric counts (ADE20K's "other" after reduce_zero_label)
IGNORE_INDEX = 255
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".JPEG")


class DataError(ValueError):
    """A dataset folder or file that does not match the expected layout."""


def resource_lines(name: str) -> list[str]:
    """A bundled reference list (see tinymim/resources/README.md for sources)."""
    text = resources.files("tinymim.resources").joinpath(name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image as RGB, or fail with the file's path."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


class ImageNetFolder(ImageFolder):
    """`root/<wnid>/*.JPEG` with classes in sorted wnid order (= ImageNet-1K indices).

    When the folder holds all 1000 ImageNet wnids, their order is checked against the
    reference list, so a 1K head trained elsewhere (MAE, timm, DeiT) lines up.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: dataset folder not found")
        try:
            super().__init__(str(root), transform=transform, loader=open_rgb)
        except FileNotFoundError as e:
            raise DataError(f"{root}: {e}") from e
        if len(self.classes) == 1000 and self.classes != resource_lines("imagenet_1k_wnids.txt"):
            raise DataError(f"{root}: 1000 class folders, but not the ImageNet-1K wnids")


def _stem_map(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in suffixes}


class ADE20K(Dataset):
    """ADE20K (SceneParsing-150): `root/images/<split>/*.jpg` + `root/annotations/<split>/*.png`.

    With `reduce_zero_label` (the ADE20K convention) raw 0 ('other') becomes the ignore
    index 255 and raw 1..150 become classes 0..149. Returns (image, mask) as PIL images
    through `transform(image, mask)` when given, else as tensors (3xHxW uint8, HxW int64).
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", reduce_zero_label: bool = True,
                 transform: Callable | None = None):
        root = Path(root)
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise DataError(f"{d}: folder not found (expected ADE20K layout images/{split}, annotations/{split})")
        images = _stem_map(img_dir, IMG_EXTENSIONS)
        masks = _stem_map(ann_dir, (".png",))
        if not images:
            raise DataError(f"{img_dir}: no images")
        lonely = sorted(set(images) - set(masks))
        if lonely:
            raise DataError(f"{images[lonely[0]]}: no annotation {ann_dir / (lonely[0] + '.png')} "
                            f"({len(lonely)} image(s) without annotation)")
        self.items = [(images[k], masks[k]) for k in sorted(images)]
        self.reduce_zero_label, self.transform = reduce_zero_label, transform
        self.classes = resource_lines("ade20k_classes.txt")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img_path, ann_path = self.items[i]
        image = open_rgb(img_path)
        try:
            with Image.open(ann_path) as a:
                mask = torch.from_numpy(np.array(a, dtype=np.int64))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{ann_path}: cannot read annotation ({e})") from e
        if mask.shape != (image.height, image.width):
            raise DataError(f"{ann_path}: size {tuple(mask.shape)} differs from image {img_path} "
                            f"({image.height}, {image.width})")
        if self.reduce_zero_label:
            mask = reduce_zero_label(mask)
        if self.transform is not None:
            return self.transform(image, mask)
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image), mask


def reduce_zero_label(mask: torch.Tensor) -> torch.Tensor:
    """mmseg's convention: 0 -> 255 (ignored), k -> k - 1 for k in 1..150, 255 stays 255."""
    mask = mask.clone()
    mask[mask == 0] = IGNORE_INDEX
    mask = mask - 1
    mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
    return mask
