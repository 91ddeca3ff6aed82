"""The built-in synthetic dataset: cluttered, textured shapes with class labels and masks.

Why it exists: the `smoke` profile must run every stage of the pipeline on a CPU in
minutes with no files, and its numbers must still mean something. Each image holds one
large *main* object whose shape type is the class label, drawn over a textured
background among smaller distractor objects of other types, which may occlude it. The
per-pixel mask labels every visible object by its shape type (0 = background), so the
same images serve classification, distillation (unlabelled pool) and segmentation.

Classes differ only in shape: colour and texture are random and carry no label, so a
model has to learn spatial structure -- the thing pre-training is supposed to help with.
Everything is a pure function of (seed, split, index): no state, no files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import cache_dir

SHAPES = (
    "disk", "square", "triangle", "plus", "ring",
    "star", "bar", "crescent", "frame", "half_disk",
)
SPLIT_OFFSETS = {"pool": 0, "train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the images; its hash names the on-disk cache."""

    image_size: int = 32
    num_classes: int = 10
    main_scale: tuple[float, float] = (0.55, 0.85)  # main object radius / half image
    distractors: tuple[int, int] = (1, 3)  # number of small objects per image
    distractor_scale: tuple[float, float] = (0.18, 0.32)
    occlusion_prob: float = 0.3  # chance each distractor is drawn over the main object
    background_contrast: float = 0.35
    supersample: int = 2  # anti-aliasing factor

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"SyntheticSpec.num_classes must be in [2, {len(SHAPES)}], got {self.num_classes}")
        if self.image_size < 8:
            raise ValueError(f"SyntheticSpec.image_size must be >= 8, got {self.image_size}")

    @property
    def class_names(self) -> list[str]:
        return list(SHAPES[: self.num_classes])

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of shape `kind` in its own frame (radius ~1, centred at 0)."""
    r = np.hypot(u, v)
    if kind == 0:  # disk
        return r < 0.9
    if kind == 1:  # square
        return np.maximum(abs(u), abs(v)) < 0.72
    if kind == 2:  # triangle (equilateral, circumradius 1)
        return (v > -0.5) & (v < 1 - np.sqrt(3) * abs(u) * 1.0) & (v < 1.0)
    if kind == 3:  # plus
        return ((abs(u) < 0.28) & (abs(v) < 0.95)) | ((abs(v) < 0.28) & (abs(u) < 0.95))
    if kind == 4:  # ring
        return (r < 0.95) & (r > 0.55)
    if kind == 5:  # five-pointed star
        theta = np.arctan2(v, u)
        return r < 0.5 + 0.45 * np.cos(5 * theta) ** 2 * (np.cos(5 * theta) > 0)
    if kind == 6:  # bar
        return (abs(u) < 0.98) & (abs(v) < 0.3)
    if kind == 7:  # crescent
        return (r < 0.95) & (np.hypot(u - 0.45, v) > 0.7)
    if kind == 8:  # frame (hollow square)
        m = np.maximum(abs(u), abs(v))
        return (m < 0.8) & (m > 0.48)
    if kind == 9:  # half disk
        return (r < 0.95) & (v > -0.1)
    raise ValueError(f"unknown shape kind {kind}")


def _texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A random pattern in [0, 1] on the pixel grid: flat, stripes, checker, dots or noise."""
    kind = rng.integers(5)
    if kind == 0:
        return np.zeros_like(x)
    freq = rng.uniform(3.0, 7.0) * np.pi
    if kind == 1:
        a = rng.uniform(0, np.pi)
        return 0.5 + 0.5 * np.sin(freq * (x * np.cos(a) + y * np.sin(a)))
    if kind == 2:
        return ((np.floor(x * freq / np.pi) + np.floor(y * freq / np.pi)) % 2).astype(np.float64)
    if kind == 3:
        return (np.sin(freq * x) * np.sin(freq * y) > 0.5).astype(np.float64)
    coarse = rng.random((5, 5))
    iy = np.clip(((y + 1) * 2).astype(int), 0, 4)
    ix = np.clip(((x + 1) * 2).astype(int), 0, 4)
    return coarse[iy, ix]


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.random(3)
    b = np.clip(a + rng.normal(0, 0.25, 3), 0, 1)
    return a, b


def render(spec: SyntheticSpec, seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Render one sample: (HxWx3 uint8 image, HxW uint8 mask, class label)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    rng = np.random.default_rng([seed, SPLIT_OFFSETS[split], index])
    n = spec.image_size * spec.supersample
    coords = (np.arange(n) + 0.5) / n * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")

    # background: smooth two-colour gradient modulated by a low-contrast texture
    c0, c1 = rng.random(3), rng.random(3)
    a = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + 0.5 * (x * np.cos(a) + y * np.sin(a)), 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    img = img + spec.background_contrast * (_texture(rng, x, y)[..., None] - 0.5) * (rng.random(3) - 0.5)
    mask = np.zeros((n, n), dtype=np.uint8)

    label = int(rng.integers(spec.num_classes))
    objects = [(label, rng.uniform(*spec.main_scale), True)]
    for _ in range(rng.integers(spec.distractors[0], spec.distractors[1] + 1)):
        kind = int(rng.integers(spec.num_classes))
        over = rng.random() < spec.occlusion_prob
        objects.insert(len(objects) if over else 0, (kind, rng.uniform(*spec.distractor_scale), False))

    for kind, scale, is_main in objects:
        limit = 1 - scale * 0.8 if is_main else 1 - scale
        cx, cy = rng.uniform(-limit, limit, 2) * (0.5 if is_main else 1.0)
        ang = rng.uniform(0, 2 * np.pi)
        du, dv = (x - cx) / scale, (y - cy) / scale
        u = du * np.cos(ang) + dv * np.sin(ang)
        v = -du * np.sin(ang) + dv * np.cos(ang)
        inside = _shape_mask(kind, u, v)
        fa, fb = _colour_pair(rng)
        pattern = _texture(rng, x, y)[..., None]
        fill = fa * (1 - pattern) + fb * pattern
        img = np.where(inside[..., None], fill, img)
        mask[inside] = kind + 1

    img = np.clip(img, 0, 1)
    s = spec.supersample
    img = img.reshape(spec.image_size, s, spec.image_size, s, 3).mean(axis=(1, 3))
    # the mask keeps the label at each output pixel's centre sub-sample
    mask = mask[s // 2 :: s, s // 2 :: s]
    return (img * 255 + 0.5).astype(np.uint8), mask, label


def generate(spec: SyntheticSpec, seed: int, split: str, size: int, cache: bool = True) -> dict[str, np.ndarray]:
    """All samples of a split as arrays, cached on disk (rendering is the slow part)."""
    path = cache_dir("synthetic") / f"{spec.key()}-s{seed}-{split}-{size}.npz"
    if cache and path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in ("images", "masks", "labels")}
    images = np.empty((size, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    masks = np.empty((size, spec.image_size, spec.image_size), dtype=np.uint8)
    labels = np.empty(size, dtype=np.int64)
    for i in range(size):
        images[i], masks[i], labels[i] = render(spec, seed, split, i)
    arrays = {"images": images, "masks": masks, "labels": labels}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return arrays


class SyntheticShapes(Dataset):
    """A split of the synthetic dataset as uint8 tensors held in memory.

    `images` is N x 3 x H x W uint8, `masks` N x H x W (0 = background, k+1 = shape k),
    `labels` N. Indexing returns (image, label) like an ImageFolder; models normalise
    on the fly, so whole batches can be sliced straight from the tensors.
    """

    def __init__(self, spec: SyntheticSpec, split: str, size: int, seed: int = 0, cache: bool = True):
        arrays = generate(spec, seed, split, size, cache=cache)
        self.spec, self.split = spec, split
        self.images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2).contiguous()
        self.masks = torch.from_numpy(arrays["masks"])
        self.labels = torch.from_numpy(arrays["labels"])
        self.classes = spec.class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
