"""Batched augmentations for image tensors already in memory (the synthetic data).

torchvision's transforms draw one set of parameters per call, so applied to a batch
they crop every image the same way. For in-memory data we want per-sample parameters
without a per-sample Python loop, so RandomResizedCrop + flip is written here as one
`affine_grid`/`grid_sample` call, with torchvision's sampling of scale and log-ratio.
Files on disk go through torchvision/timm transforms in the dataset instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def random_resized_crop_flip(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    mode: str = "bicubic",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample RandomResizedCrop (+ horizontal flip) of a float batch, output size x size.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio), as torchvision; crops
    that would leave the image are shrunk to fit instead of resampled.
    """
    n, device = images.shape[0], images.device
    u = torch.rand(n, 4, generator=generator).to(device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the full width/height
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (u[:, 2] * 2 - 1) * (1 - w)  # centre in [-1, 1] normalised coordinates
    cy = (u[:, 3] * 2 - 1) * (1 - h)
    sx = w
    if flip:
        sx = torch.where(torch.rand(n, generator=generator).to(device) < 0.5, -w, w)
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ColorJitter(brightness=s, contrast=s, saturation=s) per sample on [0, 1] images."""
    if strength <= 0:
        return images
    n = images.shape[0]
    f = 1 + (torch.rand(n, 3, generator=generator).to(images.device) * 2 - 1) * strength
    x = images * f[:, 0].view(n, 1, 1, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = (x - gray.mean(dim=(2, 3), keepdim=True)) * f[:, 1].view(n, 1, 1, 1) + gray.mean(dim=(2, 3), keepdim=True)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = (x - gray) * f[:, 2].view(n, 1, 1, 1) + gray
    return x.clamp(0, 1)


@dataclass(frozen=True)
class TwoViews:
    """TinyMIM's views: one shared RandomResizedCrop (bicubic) + flip; colour jitter on the
    student's view only -- the teacher sees the un-jittered crop.

    Called on a uint8 batch it returns normalised (student_view, teacher_view) tensors;
    `per_sample()` gives the same recipe as a torchvision transform for files on disk.
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    jitter: float = 0.4

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = random_resized_crop_flip(images.float() / 255, self.size, scale=self.scale).clamp(0, 1)
        return normalize(color_jitter(x, self.jitter)), normalize(x)

    def per_sample(self):
        from torchvision import transforms as T

        crop = T.Compose([T.RandomResizedCrop(self.size, scale=self.scale,
                                              interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip()])
        jitter = T.ColorJitter(self.jitter, self.jitter, self.jitter)
        to_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

        def views(img):
            x = crop(img)
            return to_tensor(jitter(x)), to_tensor(x)

        return views
