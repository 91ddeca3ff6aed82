"""A small folder's training images decoded once, at the run's input size.

Why: at smoke size every epoch would otherwise re-decode full-size files (an MAE teacher
alone draws ~200 000 samples from a few hundred images), so a run on a folder of 1 000 real
photos would cost many times the same run on the built-in data. Each image is decoded once,
its shorter side brought down to `SIDE_FACTOR` x the input size (never up: a small image is
kept as it is, the crop resizes it anyway), and the uint8 pixels are cached on disk under a
key of the folder's listing (path, size, mtime of every file) and the side -- a changed file
or size makes a new cache. Crops are then taken from the cached copy: at 2x the input size a
crop down to a quarter of the image's area is still a downscale, so the augmentation sees the
detail it would have seen in the file.

A folder whose cached pixels would exceed `MAX_BYTES` (ImageNet at 224 px) is not cached:
its loader workers decode as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import cache_dir
from .sources import DataError, decode_file, held_encoded, held_pil, held_size

SIDE_FACTOR = 2
MAX_BYTES = 1 << 30


class CachedImages:
    """A labelled folder `source` (a `Subsample` of an `ImageNetFolder`) whose images come
    from memory: the `augment.Source` interface over the decoded copies, every other
    attribute (targets, classes, samples) from the source."""

    def __init__(self, source: Any, images: list[torch.Tensor], record: dict[str, Any]):
        self.source, self.images, self.record = source, images, record

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]

    pil, size, encoded = held_pil, held_size, held_encoded

    def target(self, i: int) -> int:
        return self.source.target(i)

    def __getattr__(self, name: str) -> Any:
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def _shrink(image: torch.Tensor, side: int) -> torch.Tensor:
    """Shorter side down to `side` (antialiased bilinear, as PIL's resize), aspect kept."""
    from torchvision.transforms.v2 import functional as TF

    if min(image.shape[-2:]) <= side:
        return image
    return TF.resize(image, side, antialias=True)


def _key(paths: list[str], side: int) -> str:
    listing = []
    for p in paths:
        st = os.stat(p)
        listing.append((str(p), st.st_size, st.st_mtime_ns))
    return hashlib.sha1(json.dumps([listing, side]).encode()).hexdigest()[:16]


def _load(path: Path) -> list[torch.Tensor] | None:
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=True)
    pixels, shapes = saved["pixels"], saved["shapes"].tolist()
    out, offset = [], 0
    for h, w in shapes:
        out.append(pixels[offset:offset + 3 * h * w].view(3, h, w))
        offset += 3 * h * w
    return out


def _save(images: list[torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks may write the same cache at once
    torch.save({"pixels": torch.cat([im.reshape(-1) for im in images]),
                "shapes": torch.tensor([list(im.shape[-2:]) for im in images], dtype=torch.long)}, tmp)
    os.replace(tmp, path)


def cached_folder(source: Any, input_size: int) -> CachedImages | None:
    """`source`'s images decoded once at `SIDE_FACTOR` x `input_size` (from the disk cache when
    the listing is unchanged); None when they would take more than `MAX_BYTES`."""
    side = SIDE_FACTOR * input_size
    if len(source) * 3 * side * side * 2 > MAX_BYTES:  # x2: room for wide images
        return None
    paths = [source.samples[i][0] for i in source.indices]
    path = cache_dir("folders", f"{_key(paths, side)}.pt")
    images = _load(path)
    if images is None:
        images = [_shrink(decode_file(p), side) for p in paths]
        if sum(im.numel() for im in images) > MAX_BYTES:
            return None
        _save(images, path)
    if len(images) != len(paths):
        raise DataError(f"{path}: {len(images)} cached images for {len(paths)} files; delete it to rebuild")
    record = source.record | {"decoded_once": {"shorter_side_at_most": side, "cache": path.name}}
    return CachedImages(source, images, record)
