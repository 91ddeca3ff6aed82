"""The one input normalisation (ImageNet's statistics), for training and inference alike.
The augmentation recipes are in `augment.py`."""

from __future__ import annotations

import torch

# synthetic images are not ImageNet photographs, but the same constants keep one
# normalisation everywhere (teachers from either world see the same input scale)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) N x 3 x H x W -> ImageNet-normalised float."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
