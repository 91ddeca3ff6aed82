"""Training augmentation in two halves: per sample on the host, per batch on the device.

Why: a ViT-S <- ViT-B step costs ~59 GFLOP per image, so one GPU consumes thousands of
images per second, while the release's PIL pipeline (decode, crop, jitter, ToTensor,
Normalize, collating two float32 views) costs ~6 ms of CPU per image. Here the data
workers do only what needs the file -- decode, and (mode `host`) the crop and resize --
and hand over uint8 (a quarter of float32's bytes, one crop for both views); jitter,
normalisation, random erasing and Mixup/CutMix run on the device, in fp32, outside autocast.

Every random parameter a worker uses is drawn by the recipe's own library function --
torchvision's `RandomResizedCrop.get_params` and `ColorJitter.get_params`, timm's
`RandomResizedCropAndInterpolation.get_params` and RandAugment -- under a seed of (seed,
epoch, sample index) (`sample_seed`), so the augmentation of a sample does not depend on
which worker, rank or resumed process draws it: a killed or requeued run continues exactly,
and the draws equal those of the release's transforms under the same seed. What runs on the
device draws from the run's own RNG, which the engine checkpoints.

Modes (config `augment`, checked there):
- `host`: workers decode, crop and resize (uint8 bicubic with antialiasing); the device jitters
  and normalises.
- `device`: workers only decode (on CUDA, JPEGs are not even decoded: nvJPEG decodes them on
  the device) and draw the crop; the device crops, resizes, flips and jitters -- the mode that
  scales to 8 GPUs per host. Not for RandAugment, which exists as PIL operations only.
- `reference`: the release's PIL transforms, verbatim, in the workers (float32 out): bit-identical
  to the release under a seed, for comparisons; slow.
`host` and `device` compute the same recipe with other arithmetic (torch's resampling and
float jitter instead of PIL's uint8 steps); tests/test_augment.py compares them with
`reference` on the same draws.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .transforms import IMAGENET_MEAN, IMAGENET_STD, normalize


class Source(Protocol):
    """Where a recipe's images come from: files (decoded on demand) or tensors in memory."""

    def __len__(self) -> int: ...

    def image(self, i: int) -> torch.Tensor: ...  # 3 x H x W uint8

    def pil(self, i: int) -> Image.Image: ...  # RGB, for the reference (PIL) mode

    def size(self, i: int) -> tuple[int, int]: ...  # (height, width) without decoding where possible

    def encoded(self, i: int) -> torch.Tensor | None: ...  # a JPEG file's bytes, for decoding on the device

    def target(self, i: int) -> Any: ...  # class label (or None for unlabelled pools)


@contextmanager
def sample_seed(seed: int) -> Iterator[None]:
    """torch (CPU), NumPy and Python's `random` seeded for one sample's transforms. In the main
    process (a loader without workers) they are put back afterwards, so the training RNG is
    untouched; a worker process owns its generators and skips that (~0.1 ms a sample)."""
    from torch.utils.data import get_worker_info

    restore = get_worker_info() is None
    if restore:
        saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed also queues CUDA seeding
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if restore:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def _shape(height: int, width: int) -> torch.Tensor:
    """A tensor that only has a shape (no memory): what torchvision/timm `get_params` read."""
    return torch.zeros(()).expand(3, height, width)


@dataclass
class Ragged:
    """Tensors of different shapes (uncropped images, encoded JPEGs) packed into one flat
    buffer: one shared-memory handle per batch from a worker, one copy to the device."""

    flat: torch.Tensor
    shapes: torch.Tensor  # N x ndim

    @classmethod
    def pack(cls, tensors: Sequence[torch.Tensor]) -> Ragged:
        """In a worker the buffer is made in shared memory, as `default_collate` does for a
        stacked batch: the hand-over to the main process then copies nothing."""
        from torch.utils.data import get_worker_info

        flat = [t.reshape(-1) for t in tensors]
        out = None
        if get_worker_info() is not None:
            numel = sum(t.numel() for t in flat)
            out = flat[0].new(flat[0]._typed_storage()._new_shared(numel, device=flat[0].device)).resize_(numel)
        return cls(torch.cat(flat, out=out), torch.tensor([list(t.shape) for t in tensors]))

    def __len__(self) -> int:
        return len(self.shapes)

    def unpack(self, device: torch.device) -> list[torch.Tensor]:
        flat = self.flat.to(device, non_blocking=True)
        sizes = self.shapes.prod(dim=1).tolist()
        return [t.view(*shape) for t, shape in zip(flat.split(sizes), self.shapes.tolist())]

    def pin_memory(self) -> Ragged:  # DataLoader(pin_memory=True) calls this
        return Ragged(self.flat.pin_memory(), self.shapes)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack each field when its tensors agree in shape (`default_collate`, which stacks into
    shared memory in a worker); else pack them (`Ragged`)."""
    from torch.utils.data import default_collate

    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [torch.as_tensor(s[key]) for s in samples]
        same = all(v.shape == values[0].shape for v in values)
        out[key] = default_collate(values) if same else Ragged.pack(values)
    return out


# ---------------------------------------------------------------------------------
# the operations, written once for host and device


def crop_resize_uint8(image: torch.Tensor, box: Sequence[int], size: int) -> torch.Tensor:
    """Crop (top, left, height, width, flip) of a 3 x H x W uint8 image, resized to size x size
    bicubic with antialiasing (PIL's filter; torch's uint8 kernel, ~7x faster than PIL here)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w, flip = (int(v) for v in box)
    out = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                          antialias=True)
    return out.flip(-1) if flip else out


def crop_resize_float(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """`crop_resize_uint8` on the device for images of any sizes: one crop per image, in
    fp32, as an N x 3 x size x size batch in [0, 1]. `boxes` stay on the host (no sync)."""
    out = []
    for image, (top, left, h, w, flip) in zip(images, boxes.tolist()):
        x = image[None, :, top:top + h, left:left + w].float()
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out.append(x.flip(-1) if flip else x)
    return (torch.cat(out) / 255).clamp_(0, 1)


def jitter_params(strength: float) -> torch.Tensor:
    """torchvision's ColorJitter(strength, strength, strength) draws for one image: the order
    of the operations (4 indices, hue's skipped) and the brightness, contrast and saturation
    factors, as 7 floats."""
    from torchvision import transforms as T

    bound = [max(0.0, 1 - strength), 1 + strength]
    order, b, c, s, _ = T.ColorJitter.get_params(bound, bound, bound, None)
    return torch.tensor([*order.tolist(), b, c, s], dtype=torch.float32)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # torchvision's weights


def color_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ColorJitter of an N x 3 x H x W batch in [0, 1] with per-image `jitter_params`:
    torchvision's tensor operations (blend with black / the grey mean / the grey image,
    clamped after each), each image in its own order -- at each step, each operation on the
    images whose order has it there (5x faster on a CPU than every operation on all images)."""
    params = params.cpu()
    order, factors = params[:, :4].long(), params[:, 4:7].to(x.device, non_blocking=True)
    x = x.clone()
    for step in range(4):
        for op in range(3):  # 3 = hue: not part of this recipe
            idx = (order[:, step] == op).nonzero().flatten().to(x.device, non_blocking=True)
            if len(idx) == 0:
                continue
            sub, f = x[idx], factors[idx, op].view(-1, 1, 1, 1)
            if op == 0:
                ref = torch.zeros_like(sub[:, :1])
            elif op == 1:
                ref = _gray(sub).mean(dim=(1, 2, 3), keepdim=True)
            else:
                ref = _gray(sub)
            x[idx] = (f * sub + (1 - f) * ref).clamp_(0, 1)
    return x


def _uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _decode_on(images: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Images (already on `device`) as uint8 3 x H x W; encoded JPEGs (1-D byte tensors)
    decoded there in one call (nvJPEG on a GPU; the CPU codec on a CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [i for i, t in enumerate(images) if t.dim() == 1]
    if not encoded:
        return list(images)
    out = list(images)
    decoded = decode_jpeg([images[i].cpu() if device.type != "cuda" else images[i] for i in encoded],
                          mode=ImageReadMode.RGB, device=device)
    for i, img in zip(encoded, decoded):
        out[i] = img
    return out


# ---------------------------------------------------------------------------------
# recipes: one per stage


@dataclass(frozen=True)
class Views:
    """MAE's view (`jitter=None`) or TinyMIM's two views: one RandomResizedCrop (bicubic) +
    flip shared by both; ColorJitter(jitter, jitter, jitter) on the student's only. The
    device half returns (view,) or (student_view, teacher_view), normalised."""

    size: int
    scale: tuple[float, float]
    jitter: float | None = None
    mode: str = "host"
    device_decode: bool = False  # mode `device`: JPEGs decoded on the device (nvJPEG on CUDA)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def host(self, source: Source, i: int) -> dict[str, Any]:
        if self.mode == "reference":
            return self._reference(source.pil(i))
        from torchvision import transforms as T

        raw = source.encoded(i) if self.mode == "device" and self.device_decode else None
        image = raw if raw is not None else source.image(i)
        h, w = source.size(i) if raw is not None else image.shape[-2:]
        box = [*T.RandomResizedCrop.get_params(_shape(h, w), list(self.scale), list(self.ratio)),
               int(torch.rand(1) < 0.5)]  # RandomHorizontalFlip's draw
        out: dict[str, Any] = {"image": crop_resize_uint8(image, box, self.size) if self.mode == "host" else image,
                               "box": torch.tensor(box)}
        if self.jitter is not None:
            out["jitter"] = jitter_params(self.jitter)
        return out

    def _reference(self, img: Image.Image) -> dict[str, Any]:
        """The release's transforms: MAE's main_pretrain.py, TinyMIM's TwoCropsTransform."""
        from torchvision import transforms as T

        common = T.Compose([T.RandomResizedCrop(self.size, scale=self.scale, interpolation=3),
                            T.RandomHorizontalFlip()])
        tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        x = common(img)
        if self.jitter is None:
            return {"view": tensor(x)}
        teacher = tensor(x)
        return {"teacher": teacher, "student": tensor(T.ColorJitter(self.jitter, self.jitter, self.jitter)(x))}

    def device(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
        if self.mode == "reference":
            keys = ("view",) if self.jitter is None else ("student", "teacher")
            return tuple(batch[k].to(device, non_blocking=True) for k in keys)
        x = _views(batch, self.mode, self.size, device)
        if self.jitter is None:
            return (normalize(x),)
        return normalize(color_jitter(x, batch["jitter"])), normalize(x)


def _views(batch: dict[str, Any], mode: str, size: int, device: torch.device) -> torch.Tensor:
    """The batch's crops as N x 3 x size x size floats in [0, 1] on `device`: made by the
    workers (`host`), or here from the uncropped images and their boxes (`device`)."""
    if mode == "host":
        return batch["image"].to(device, non_blocking=True).float() / 255
    images = batch["image"]
    images = images.unpack(device) if isinstance(images, Ragged) else list(images.to(device, non_blocking=True))
    return crop_resize_float(_decode_on(images, device), batch["box"], size)


@dataclass
class Classify:
    """MAE's fine-tuning recipe (timm's `create_transform`): RandomResizedCrop bicubic, flip,
    RandAugment on the host; normalisation, random erasing (pixel mode) and Mixup/CutMix with
    label smoothing on the device. The device half returns (images, targets), the targets
    soft when Mixup/CutMix is on."""

    size: int
    scale: tuple[float, float]
    rand_augment: str = ""
    reprob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    num_classes: int = 1000
    mode: str = "host"
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    _parts: dict[str, Any] = field(default_factory=dict, repr=False)

    def _part(self, name: str):
        """timm's pieces, built once per process (workers build their own)."""
        if name not in self._parts:
            from timm.data import Mixup, create_transform
            from timm.data.random_erasing import RandomErasing

            if name == "reference":
                self._parts[name] = create_transform(
                    self.size, is_training=True, scale=self.scale, ratio=self.ratio,
                    auto_augment=self.rand_augment or None, color_jitter=0.0, interpolation="bicubic",
                    re_prob=self.reprob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            elif name == "rand_augment":
                _, secondary, _ = create_transform(
                    self.size, is_training=True, scale=self.scale, auto_augment=self.rand_augment,
                    interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, separate=True)
                self._parts[name] = secondary
            elif name == "erasing":
                self._parts[name] = RandomErasing(self.reprob, mode="pixel", max_count=1, device="cpu")
            elif name == "mixup":
                self._parts[name] = Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix,
                                          label_smoothing=self.label_smoothing, num_classes=self.num_classes)
        return self._parts[name]

    @property
    def soft_targets(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def host(self, source: Source, i: int) -> dict[str, Any]:
        label = torch.as_tensor(source.target(i))
        if self.mode == "reference":
            return {"image": self._part("reference")(source.pil(i)), "label": label}
        from timm.data.transforms import RandomResizedCropAndInterpolation as RRC

        image = source.image(i)
        box = [*RRC.get_params(image, self.scale, self.ratio), int(torch.rand(1) < 0.5)]
        if self.mode == "device":
            return {"image": image, "box": torch.tensor(box), "label": label}
        image = crop_resize_uint8(image, box, self.size)
        if self.rand_augment:
            image = _uint8_tensor(self._part("rand_augment")(_pil(image)))
        return {"image": image, "box": torch.tensor(box), "label": label}

    def device(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["label"].to(device, non_blocking=True)
        if self.mode == "reference":
            x = batch["image"].to(device, non_blocking=True)
        else:
            x = normalize(_views(batch, self.mode, self.size, device))
            if self.reprob > 0:
                erasing = self._part("erasing")
                erasing.device = x.device
                x = erasing(x)
        if self.soft_targets:
            x, labels = self._part("mixup")(x, labels)
        return x, labels

    def __getstate__(self) -> dict[str, Any]:  # workers rebuild timm's pieces themselves
        return {k: v for k, v in self.__dict__.items() if k != "_parts"} | {"_parts": {}}


@dataclass(frozen=True)
class Segment:
    """MAE/BEiT's ADE20K training pipeline (mmseg), per sample on the host: random resize of
    `scale` by a factor in `ratio` keeping the aspect ratio, random crop (retried while one class
    covers more than `cat_max_ratio`), flip, photometric distortion; uint8 out, padded to the
    crop. The device normalises and zeroes the padding (mmseg pads after normalising); the
    mask's padding is the ignore index. Returns (images, masks)."""

    crop: int
    scale: tuple[int, int]
    ratio: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    ignore_index: int = 255

    def host(self, source: Any, i: int) -> dict[str, Any]:
        from torchvision import transforms as T
        from torchvision.transforms import functional as TF

        image, mask = source.pil(i), source.mask(i)
        r = random.uniform(*self.ratio)
        f = min(self.scale[0] * r / max(image.size), self.scale[1] * r / min(image.size))
        w, h = max(1, int(image.width * f + 0.5)), max(1, int(image.height * f + 0.5))
        image = image.resize((w, h), resample=Image.BILINEAR)
        mask = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        for _ in range(10):
            y, x = random.randint(0, max(h - self.crop, 0)), random.randint(0, max(w - self.crop, 0))
            crop = mask[y:y + self.crop, x:x + self.crop]
            _, counts = crop[crop != self.ignore_index].unique(return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        image, mask = image.crop((x, y, min(x + self.crop, w), min(y + self.crop, h))), crop
        if random.random() < 0.5:
            image, mask = TF.hflip(image), mask.flip(-1)
        # mmseg's PhotoMetricDistortion strengths: brightness +-32/255, contrast/saturation 0.5-1.5, hue +-18 deg
        image = _uint8_tensor(T.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360)(image))
        valid = torch.tensor(image.shape[1:])
        pad = (0, self.crop - image.shape[2], 0, self.crop - image.shape[1])
        return {"image": F.pad(image, pad), "mask": F.pad(mask, pad, value=self.ignore_index), "valid": valid}

    def device(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize(batch["image"].to(device, non_blocking=True))
        rows = torch.arange(self.crop).view(1, -1, 1) < batch["valid"][:, 0].view(-1, 1, 1)
        cols = torch.arange(self.crop).view(1, 1, -1) < batch["valid"][:, 1].view(-1, 1, 1)
        x = x * (rows & cols).unsqueeze(1).to(device, non_blocking=True)
        return x, batch["mask"].to(device, non_blocking=True)
