"""Datasets read from disk: ImageNet-style class folders and ADE20K.

Both check their layout when constructed -- before any training starts -- and name
the offending path in every error: a missing annotation, an empty class folder or a
file that is not a decodable image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from .sources import DataError, decode_file, encoded_jpeg, header_size, open_rgb

# the label of pixels that no loss or metric counts (ADE20K's "other" after reduce_zero_label)
IGNORE_INDEX = 255
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".JPEG")


def resource_lines(name: str) -> list[str]:
    """A bundled reference list (see tinymim/resources/README.md for sources)."""
    text = resources.files("tinymim.resources").joinpath(name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def folder_classes(root: str | os.PathLike) -> list[str]:
    """The class folders under `root`, sorted (torchvision's order)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    return sorted(p.name for p in os.scandir(root) if p.is_dir())


class ImageNetFolder(ImageFolder):
    """`root/<class>/*.JPEG` whose labels are indices into a *label space*, never folder
    positions: a `val/` that lacks one class folder must not shift every later label.

    `classes` is the label space (e.g. the list a model was trained with); None means
    the ImageNet-1K wnid order when every folder is a 1K wnid, else the sorted folder
    names. A folder outside the label space is an error naming it. `classes` then holds
    the label space (label i = classes[i]); `folders` the folders actually present.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 classes: Sequence[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: dataset folder not found")
        self._label_space = list(classes) if classes is not None else None
        try:
            super().__init__(str(root), transform=transform, loader=open_rgb)
        except FileNotFoundError as e:
            empty = empty_folders(root)
            if empty:
                more = f" (and {len(empty) - 1} more: {', '.join(p.name for p in empty[1:4])})" if len(empty) > 1 else ""
                raise DataError(f"{empty[0]}: empty class folder{more}: no image file ({', '.join(IMG_EXTENSIONS)}); "
                                f"add its images or remove the folder") from e
            raise DataError(f"{root}: {e}") from e
        self.folders, self.classes = self.classes, self._label_space

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        found, _ = super().find_classes(directory)
        space = self._label_space
        if space is None:
            wnids = resource_lines("imagenet_1k_wnids.txt")
            space = wnids if set(found) <= set(wnids) else found
        index = {c: i for i, c in enumerate(space)}
        unknown = [c for c in found if c not in index]
        if unknown:
            raise DataError(f"{directory}: class folder(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not "
                            f"among the {len(space)} classes of the label space (first: {space[:3]}); each folder "
                            f"must be one of the classes the model was trained on")
        self._label_space = list(space)
        return found, {c: index[c] for c in found}

    # the `augment.Source` interface: the augmentation recipes read samples through these
    def image(self, i: int) -> torch.Tensor:
        return decode_file(self.samples[i][0])

    def pil(self, i: int) -> Image.Image:
        return open_rgb(self.samples[i][0])

    def size(self, i: int) -> tuple[int, int]:
        return header_size(self.samples[i][0])

    def encoded(self, i: int) -> torch.Tensor | None:
        return encoded_jpeg(self.samples[i][0])

    def target(self, i: int) -> int:
        return self.samples[i][1]


def empty_folders(root: str | os.PathLike) -> list[Path]:
    """The class folders under `root` (its direct sub-folders) that hold no image file at any depth."""
    def has_image(folder: Path) -> bool:
        return any(p.suffix.lower() in IMG_EXTENSIONS for p in folder.rglob("*") if p.is_file())

    return [Path(d.path) for d in sorted(os.scandir(root), key=lambda d: d.name) if d.is_dir() and not has_image(Path(d.path))]


def check_images(root: str | os.PathLike, workers: int = 8, progress: bool = True) -> tuple[int, list[str]]:
    """Every image file under `root` opened and its header verified, in parallel threads:
    (number checked, ['path: why' for each unreadable file and each folder with no image]). Meant to run once before a
    long training, so a corrupt file is not found hours in (`tinymim check-data ROOT`)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    files = sorted(p for p in root.rglob("*") if p.suffix in IMG_EXTENSIONS or p.suffix.lower() in IMG_EXTENSIONS)

    def check(path: Path) -> str | None:
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as e:  # PIL raises many types for broken files
            return f"{path}: {type(e).__name__}: {e}"
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(tqdm(pool.map(check, files), total=len(files), disable=not progress, desc="check-data",
                            mininterval=2.0))
    empty = [f"{d}: empty folder (no image file at any depth)" for d in sorted(root.rglob("*"))
             if d.is_dir() and not any(p.suffix.lower() in IMG_EXTENSIONS for p in d.rglob("*") if p.is_file())]
    return len(files), [r for r in results if r is not None] + empty


def _stem_map(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in suffixes}


class ADE20K(Dataset):
    """ADE20K (SceneParsing-150): `root/images/<split>/*.jpg` + `root/annotations/<split>/*.png`.

    With `reduce_zero_label` (the ADE20K convention) raw 0 ('other') becomes the ignore
    index 255 and raw 1..150 become classes 0..149. A segmentation `Source` (`pil`, `mask`)
    for the training recipe; indexing gives (image, mask) tensors for evaluation.
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", reduce_zero_label: bool = True):
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
        self.reduce_zero_label = reduce_zero_label
        self.classes = resource_lines("ade20k_classes.txt")

    def __len__(self) -> int:
        return len(self.items)

    def pil(self, i: int) -> Image.Image:
        return open_rgb(self.items[i][0])

    def mask(self, i: int) -> torch.Tensor:
        """Annotation i as H x W int64, checked against its image's size and the label range."""
        img_path, ann_path = self.items[i]
        try:
            with Image.open(ann_path) as a:
                mask = torch.from_numpy(np.array(a, dtype=np.int64))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{ann_path}: cannot read annotation ({e})") from e
        height, width = header_size(img_path)
        if mask.shape != (height, width):
            raise DataError(f"{ann_path}: size {tuple(mask.shape)} differs from image {img_path} ({height}, {width})")
        top = int(mask[mask != IGNORE_INDEX].max()) if (mask != IGNORE_INDEX).any() else 0
        if top > len(self.classes):
            raise DataError(f"{ann_path}: mask value {top}, but ADE20K labels are 0..{len(self.classes)} "
                            f"(0 = other, 1..150 = the classes, 255 = ignore)")
        return reduce_zero_label(mask) if self.reduce_zero_label else mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(3 x H x W uint8 image, H x W int64 mask): what evaluation reads."""
        return decode_file(self.items[i][0]), self.mask(i)


def reduce_zero_label(mask: torch.Tensor) -> torch.Tensor:
    """mmseg's convention: 0 -> 255 (ignored), k -> k - 1 for k in 1..150, 255 stays 255."""
    mask = mask.clone()
    mask[mask == 0] = IGNORE_INDEX
    mask = mask - 1
    mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
    return mask
