"""Image sources for the augmentation recipes (`augment.Source`): tensors in memory, and the
decoding of files on disk, written once.

Files decode with torchvision's libjpeg-turbo / libpng bindings (JPEG ~1.4x faster than PIL
here), straight to a uint8 tensor; any file those cannot read as 8-bit RGB (BMP, 16-bit PNG,
an odd JPEG) falls back to PIL, which names the file when it fails too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

_JPEG_MAGIC = b"\xff\xd8\xff"


class DataError(ValueError):
    """A dataset folder or file that does not match the expected layout."""


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image as RGB with PIL, or fail with the file's path."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


def decode_file(path: str | os.PathLike) -> torch.Tensor:
    """A file's image as 3 x H x W uint8 RGB."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        if image.dtype == torch.uint8:
            return image
    except (RuntimeError, ValueError):
        pass  # not a format (or variant) torchvision decodes: PIL below
    return torch.from_numpy(np.array(open_rgb(path), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def encoded_jpeg(path: str | os.PathLike) -> torch.Tensor | None:
    """A JPEG file's bytes as a 1-D uint8 tensor (for decoding on the device); None when the
    file is not a JPEG."""
    data = Path(path).read_bytes()
    if not data.startswith(_JPEG_MAGIC):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def header_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding it."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


# the `augment.Source` methods of images already decoded in memory (MemoryImages, cache.CachedImages)
def held_pil(self: Any, i: int) -> Image.Image:
    return Image.fromarray(self.image(i).permute(1, 2, 0).numpy())


def held_size(self: Any, i: int) -> tuple[int, int]:
    return tuple(self.image(i).shape[-2:])  # type: ignore[return-value]


def held_encoded(self: Any, i: int) -> None:
    return None  # already decoded: nothing to decode on the device


class MemoryImages:
    """A `Source` over uint8 N x 3 x H x W images held in memory, with optional labels and
    masks (the built-in datasets)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                 classes: list[str] | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected N x 3 x H x W uint8, got {tuple(images.shape)} {images.dtype}")
        for name, t in (("labels", labels), ("masks", masks)):
            if t is not None and len(t) != len(images):
                raise ValueError(f"{name}: {len(t)} entries for {len(images)} images")
        self.images, self.labels, self.masks, self.classes = images, labels, masks, classes

    @property
    def targets(self) -> list[int]:
        """Every sample's label (ImageFolder's `targets`): what a stratified subset draws by."""
        if self.labels is None:
            raise ValueError("these images have no labels")
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]

    pil, size, encoded = held_pil, held_size, held_encoded

    def target(self, i: int) -> Any:
        return None if self.labels is None else int(self.labels[i])

    def mask(self, i: int) -> torch.Tensor:
        if self.masks is None:
            raise ValueError("these images have no masks")
        return self.masks[i].long()


class Subsample:
    """The samples `indices` of a source, as a source (`data_limit`): every per-sample method
    of the source, at the mapped index; `record` says how they were drawn (the run's data.json)."""

    _PER_SAMPLE = ("image", "pil", "size", "encoded", "target", "mask")

    def __init__(self, source: Any, indices: list[int], record: dict[str, Any] | None = None):
        self.source, self.indices, self.record = source, list(indices), dict(record or {})

    @property
    def targets(self) -> list[int]:
        labels = self.source.targets
        return [labels[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getattr__(self, name: str) -> Any:
        if name in self._PER_SAMPLE:
            method = getattr(self.source, name)
            return lambda i: method(self.indices[i])
        return getattr(self.source, name)
