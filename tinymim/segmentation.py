"""Semantic segmentation on a plain ViT: multi-scale adapter + UperNet (ADE20K, Table 3).

No maintained library ships UperNet on a plain ViT for current torch (mmseg/mmcv pins
are stale), so this is a small plain-PyTorch port of what MAE/BEiT used: ViT blocks 4, 6,
8, 12 -> a 4x/2x/1x/0.5x feature pyramid (two 2x transposed convs with norm + GELU; one
2x transposed conv; identity; 2x max-pool), mmseg's UPerHead (pyramid pooling 1/2/3/6 +
FPN fusion) and an auxiliary FCN head on the third level (loss weight 0.4). Inference is
whole-image or sliding-window (mmseg's `slide`); mIoU comes from an accumulated
confusion matrix, with classes absent from both prediction and ground truth left out
of the mean, as mmseg does.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from . import engine
from .checkpoints import (
    CLASSIFIER_KEYS,
    CheckpointError,
    atomic_save,
    atomic_write_json,
    load_encoder,
    open_checkpoint,
    read_checkpoint,
)
from .config import SegmentationConfig, config_from_dict
from .data import ADE20K, IGNORE_INDEX, DataError, LoaderBatches, TensorBatches, resource_lines, synthetic
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from .devices import resolve_device
from .evaluation import confusion_matrix
from .models import ModelSpec, build_model


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """mmcv's ConvModule(conv, BN, ReLU)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class MultiScaleAdapter(nn.Module):
    """Token maps of 4 blocks (all at the patch stride) -> 4x, 2x, 1x, 0.5x resolution."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.keep = nn.Identity()
        self.down2 = nn.MaxPool2d(2)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [op(f) for op, f in zip((self.up4, self.up2, self.keep, self.down2), feats)]


class UPerHead(nn.Module):
    """mmseg's UPerHead: PPM on the coarsest level, top-down FPN, fused 3x3 bottleneck."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.ppm_bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [F.interpolate(p(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for p in self.ppm]
        laterals = [lat(f) for lat, f in zip(self.lateral, feats[:-1])] + [self.ppm_bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="bilinear", align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classify(self.dropout(self.fuse(torch.cat(outs, 1))))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 ConvModule and a classifier (mmseg FCNHead, num_convs=1)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.dropout(self.conv(x)))


class ViTUperNet(nn.Module):
    """ViT backbone (any input size: position embeddings are resampled on the fly) +
    adapter + UperNet + auxiliary FCN. forward(x) -> (logits, aux_logits) at a quarter of
    the patch stride (1/4 of the input for patch 16); callers upsample."""

    def __init__(self, backbone: VisionTransformer, out_indices: Sequence[int], num_classes: int,
                 channels: int = 512, aux_channels: int = 256, extra_fc: nn.Module | None = None,
                 extra_dim: int = 0):
        super().__init__()
        depth = len(backbone.blocks)
        if len(out_indices) != 4 or not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)}: need 4 block indices in 0..{depth - 1}")
        if not backbone.dynamic_img_size:
            raise ValueError("the backbone must be built with dynamic_img_size=True (any input size)")
        self.backbone, self.out_indices = backbone, tuple(out_indices)
        self.extra_fc = extra_fc  # TinyMIM*-T: its 192 -> 1280 FC applied to every token map
        dim = extra_dim or backbone.embed_dim
        self.adapter = MultiScaleAdapter(dim)
        self.decode = UPerHead([dim] * 4, channels, num_classes)
        self.aux = FCNHead(dim, aux_channels, num_classes)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer ids for layer-wise lr decay as BEiT/MAE's segmentation: the embeddings,
        then one per block; everything else -- the adapter, heads, TinyMIM*-T's FC -- is
        unmatched and keeps the full lr."""
        return {"stem": r"^backbone\.(?:cls_token|pos_embed|patch_embed)", "blocks": r"^backbone\.blocks\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        return {"backbone.pos_embed", "backbone.cls_token"}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        t = b.patch_embed(x)  # B x H x W x C (dynamic size)
        h, w = t.shape[1:3]
        t = b.norm_pre(b._pos_embed(t))
        feats = []
        for i, blk in enumerate(b.blocks):
            t = blk(t)
            if i in self.out_indices:
                f = t[:, b.num_prefix_tokens:]
                if self.extra_fc is not None:
                    f = self.extra_fc(f)
                feats.append(f.transpose(1, 2).reshape(len(x), -1, h, w))
            if i == max(self.out_indices):
                break
        feats = self.adapter(feats)
        return self.decode(feats), self.aux(feats[2])


def build_segmenter(cfg: SegmentationConfig) -> ViTUperNet:
    """The segmentation model; with `cfg.pretrained`, the encoder weights through
    `checkpoints.load_encoder` (position embedding resampled to the input grid, a
    classifier checkpoint's heads ignored, TinyMIM*-T's extra FC kept for every level)."""
    ckpt = open_checkpoint(cfg.pretrained) if cfg.pretrained else None
    spec = ModelSpec.create(cfg.model, img_size=cfg.input_size)
    extra = 0
    if ckpt is not None and ckpt.spec is not None:
        spec = replace(spec, heads=ckpt.spec.heads)
        extra = ckpt.spec.extra_fc
    backbone = build_model(spec, drop_path=cfg.drop_path, dynamic_img_size=True)
    extra_fc = nn.Sequential(nn.Linear(backbone.embed_dim, extra), nn.Hardswish()) if extra else None
    if ckpt is not None:
        load_encoder(backbone, ckpt, allow_unexpected=CLASSIFIER_KEYS)
        if extra_fc is not None:
            extra_fc[0].load_state_dict({"weight": ckpt.state_dict["head.fc.weight"],
                                         "bias": ckpt.state_dict["head.fc.bias"]})
    return ViTUperNet(backbone, cfg.out_indices, cfg.num_classes, cfg.channels, cfg.aux_channels, extra_fc, extra)


def load_segmenter(path: str | os.PathLike) -> tuple[ViTUperNet, SegmentationConfig]:
    """A trained segmenter (`train_segmentation`'s model.pth) and its config: rebuilt from
    the recorded config (the backbone's head layout comes from its `pretrained` file), then
    the trained weights."""
    raw = read_checkpoint(path)
    if not isinstance(raw.get("config"), dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path}: not a tinymim segmenter (expected 'model' and 'config' entries)")
    cfg = config_from_dict(raw["config"])
    model = build_segmenter(cfg)
    model.load_state_dict(raw["model"])
    return model, cfg


class SegmentationTask(nn.Module):
    """forward(images, masks) -> (loss, parts): CE (ignore 255) + aux_weight x auxiliary CE."""

    def __init__(self, model: ViTUperNet, cfg: SegmentationConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if images.dtype == torch.uint8:  # in-memory data: crop/flip pairs on the fly
            images, masks = random_crop_flip_pair(images, masks, self.cfg.input_size)
        logits, aux = self.model(images)
        size = masks.shape[-2:]
        main = F.cross_entropy(F.interpolate(logits, size=size, mode="bilinear", align_corners=False),
                               masks.long(), ignore_index=IGNORE_INDEX)
        aux = F.cross_entropy(F.interpolate(aux, size=size, mode="bilinear", align_corners=False),
                              masks.long(), ignore_index=IGNORE_INDEX)
        return main + self.cfg.aux_weight * aux, {"loss_main": main.detach(), "loss_aux": aux.detach()}


def random_crop_flip_pair(images: torch.Tensor, masks: torch.Tensor, size: int,
                          scale: tuple[float, float] = (0.5, 2.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched random rescale (0.5-2x) + crop + flip of uint8 images with their masks
    (bilinear for images, nearest for masks; outside the image the mask is ignored)."""
    n, dev = images.shape[0], images.device
    s = torch.exp(torch.empty(n, device=dev).uniform_(math.log(scale[0]), math.log(scale[1])))
    half = 1 / s  # half-extent of the crop window in [-1, 1] units
    cx = (torch.rand(n, device=dev) * 2 - 1) * (1 - half).abs()
    cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - half).abs()
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = half * flip, cx, half, cy
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(masks[:, None], dtype=torch.float), grid, mode="nearest",
                           padding_mode="zeros", align_corners=False)
    m = torch.where(inside > 0, m, torch.full_like(m, IGNORE_INDEX))
    return normalize(x), m[:, 0].long()


class ADE20KTrainTransform:
    """MAE/BEiT's ADE20K training pipeline, per sample: random resize of (2048, 512) by
    0.5-2.0 keeping the ratio, random crop (retried while one class covers > 75%), flip,
    photometric distortion, normalisation, padding to the crop size (mask pad = 255)."""

    def __init__(self, crop: int = 512, scale: tuple[int, int] = (2048, 512), ratio=(0.5, 2.0),
                 cat_max_ratio: float = 0.75):
        from torchvision import transforms as T

        self.crop, self.scale, self.ratio, self.cat_max_ratio = crop, scale, ratio, cat_max_ratio
        # mmseg's PhotoMetricDistortion: brightness +-32/255, contrast/saturation 0.5-1.5, hue +-18 deg
        self.photometric = T.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360)

    def __call__(self, image, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms import functional as TF

        r = random.uniform(*self.ratio)
        long_side, short_side = self.scale[0] * r, self.scale[1] * r
        f = min(long_side / max(image.size), short_side / min(image.size))
        w, h = max(1, int(image.width * f + 0.5)), max(1, int(image.height * f + 0.5))
        image = image.resize((w, h), resample=2)  # bilinear
        mask = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        for _ in range(10):
            y = random.randint(0, max(h - self.crop, 0))
            x = random.randint(0, max(w - self.crop, 0))
            crop = mask[y:y + self.crop, x:x + self.crop]
            labels, counts = crop[crop != IGNORE_INDEX].unique(return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        image = image.crop((x, y, min(x + self.crop, w), min(y + self.crop, h)))  # padded after normalising, as mmseg
        mask = crop
        if random.random() < 0.5:
            image, mask = TF.hflip(image), mask.flip(-1)
        img = TF.normalize(TF.to_tensor(self.photometric(image)), IMAGENET_MEAN, IMAGENET_STD)
        img = F.pad(img, (0, self.crop - img.shape[2], 0, self.crop - img.shape[1]))
        mask = F.pad(mask, (0, self.crop - mask.shape[1], 0, self.crop - mask.shape[0]), value=IGNORE_INDEX)
        return img, mask


def segmentation_batches(cfg: SegmentationConfig, rank: int = 0, world_size: int = 1):
    if cfg.data == "synthetic":
        train = synthetic("train", cfg, size=cfg.data_limit)
        return TensorBatches(train.images, train.masks, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank,
                             world_size=world_size)
    ds = ADE20K(cfg.data, "training", cfg.reduce_zero_label, transform=ADE20KTrainTransform(cfg.input_size))
    return LoaderBatches(ds, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, rank=rank,
                         world_size=world_size)


# ---------------------------------------------------------------------------------
# inference and metrics


@torch.no_grad()
def infer_whole(model: ViTUperNet, image: torch.Tensor) -> torch.Tensor:
    """Logits at the input resolution for normalised N x 3 x H x W images (padded to the
    patch size and cropped back)."""
    p = model.backbone.patch_embed.patch_size[0]
    h, w = image.shape[-2:]
    padded = F.pad(image, (0, (-w) % p, 0, (-h) % p))
    logits, _ = model(padded)
    logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :h, :w]


@torch.no_grad()
def infer_slide(model: ViTUperNet, image: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """mmseg's sliding-window inference: windows of `window` every `stride` pixels, the
    last one flush with the border; overlapping logits are averaged."""
    n, _, h, w = image.shape
    rows = max(h - window + stride - 1, 0) // stride + 1
    cols = max(w - window + stride - 1, 0) // stride + 1
    total, count = None, torch.zeros(1, 1, h, w, device=image.device)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, h), min(c * stride + window, w)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            out = infer_whole(model, image[..., y1:y2, x1:x2])
            if total is None:
                total = torch.zeros(n, out.shape[1], h, w, device=image.device)
            total[..., y1:y2, x1:x2] += out
            count[..., y1:y2, x1:x2] += 1
    return total / count


def segmentation_metrics(conf: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU (%) from an accumulated confusion matrix.

    A class absent from both prediction and ground truth has no IoU (None) and is left
    out of the mean -- mmseg's nanmean.
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    return {
        "mIoU": 100 * float(np.nanmean(iou.numpy())) if (union > 0).any() else float("nan"),
        "aAcc": 100 * float(tp.sum() / conf.sum().clamp(min=1)),
        "per_class_IoU": {n: (None if math.isnan(v) else 100 * v) for n, v in zip(names, iou.tolist())},
    }


@torch.no_grad()
def evaluate_segmentation(model: ViTUperNet, cfg: SegmentationConfig, mode: str = "slide",
                          device: str | torch.device | None = "auto", limit: int | None = None) -> dict[str, Any]:
    """mIoU on the synthetic val split or ADE20K `validation` (single scale)."""
    device = resolve_device(device)
    model.eval().to(device)
    conf = torch.zeros(cfg.num_classes, cfg.num_classes, dtype=torch.long)
    if cfg.data == "synthetic":
        val = synthetic("val", cfg, size=limit)
        pairs = ((normalize(val.images[i:i + 250]), val.masks[i:i + 250]) for i in range(0, len(val), 250))
        names = ["background", *val.classes]
    else:
        from torchvision.transforms import functional as TF

        ds = ADE20K(cfg.data, "validation", cfg.reduce_zero_label)
        n = len(ds) if limit is None else min(limit, len(ds))

        def pairs_ade():
            for i in range(n):
                img, mask = ds[i]
                h, w = img.shape[-2:]
                f = min(2048 / max(h, w), 512 / min(h, w))  # test scale (2048, 512), keep ratio
                x = TF.normalize(img.float()[None] / 255, IMAGENET_MEAN, IMAGENET_STD)
                x = F.interpolate(x, size=(int(h * f + 0.5), int(w * f + 0.5)), mode="bilinear", align_corners=False)
                yield x, mask[None], (h, w)

        pairs = pairs_ade()
        names = resource_lines("ade20k_classes.txt")
    for item in pairs:
        x, mask = item[0].to(device), item[1]
        logits = infer_slide(model, x, cfg.input_size, cfg.slide_stride) if mode == "slide" else infer_whole(model, x)
        if len(item) == 3:  # back to the annotation's size
            logits = F.interpolate(logits, size=item[2], mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits.argmax(1).cpu(), mask, cfg.num_classes)
    metrics = segmentation_metrics(conf, names[: cfg.num_classes])
    # the reference a segmenter must beat: the most frequent class predicted everywhere
    majority = torch.zeros_like(conf)
    majority[:, conf.sum(1).argmax()] = conf.sum(1)
    metrics["majority_class_mIoU"] = segmentation_metrics(majority)["mIoU"]
    return metrics


def train_segmentation(cfg: SegmentationConfig, run_dir: str | os.PathLike, progress: bool = True,
                       device: str | torch.device | None = "auto") -> tuple[ViTUperNet, dict[str, Any]]:
    """UperNet fine-tuning per `cfg`, then evaluation; writes model.pth and eval.json."""
    run_dir = Path(run_dir)
    if cfg.data != "synthetic":  # the validation split is checked before training, not after
        ADE20K(cfg.data, "validation", cfg.reduce_zero_label)
        if cfg.num_classes != 150:
            raise DataError(f"num_classes: ADE20K has 150 classes, the config says {cfg.num_classes}")
    engine.seed_everything(cfg.seed)
    model = build_segmenter(cfg)
    rank, world_size = engine.world()
    if world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    engine.train(SegmentationTask(model, cfg), segmentation_batches(cfg, rank, world_size), cfg, run_dir,
                 device=device, progress=progress, optimize=model, layer_decay=cfg.layer_decay)
    metrics = evaluate_segmentation(model, cfg, device=device)
    if rank == 0:
        atomic_save({"model": model.state_dict(), "config": cfg.to_dict()}, run_dir / "model.pth")
        atomic_write_json(metrics, run_dir / "eval.json")
    return model, metrics

