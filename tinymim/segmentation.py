"""Semantic segmentation on a plain ViT: multi-scale adapter + UperNet (ADE20K, Table 3).

No maintained library ships UperNet on a plain ViT for current torch (mmseg/mmcv pins
are stale), so this is a small plain-PyTorch port of what the TinyMIM release trains
(Segmentation/, on mae_segmentation): a BEiT-style ViT backbone -- timm's ViT with layer scale
(`init_values=1`) and a per-block relative position bias, both trainable -- whose blocks 4, 6, 8,
12 become a 4x/2x/1x/0.5x feature pyramid (two 2x transposed convs with norm + GELU; one 2x
transposed conv; identity; 2x max-pool), mmseg's UPerHead (pyramid pooling 1/2/3/6 + FPN fusion)
and an auxiliary FCN head on the third level (loss weight 0.4), initialised as mmseg/mmcv do;
the cross-entropy averages over all pixels, ignored ones counting 0 (mmseg 0.x). TinyMIM*-T has
the release's own pyramid (`StarAdapter`). Inference is whole-image or sliding-window (mmseg's
`slide`); mIoU comes from an accumulated confusion matrix, with classes absent from both
prediction and ground truth left out of the mean, as mmseg does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from . import distributed, engine
from .checkpoints import (
    CLASSIFIER_KEYS,
    SEGMENTATION_ONLY,
    CheckpointError,
    atomic_save,
    atomic_write_json,
    load_encoder,
    open_checkpoint,
    read_checkpoint,
)
from .config import SegmentationConfig
from .data import (
    ADE20K,
    IGNORE_INDEX,
    DataError,
    LoaderBatches,
    Segment,
    batches,
    is_builtin,
    resource_lines,
    synthetic,
    train_source,
)
from .data.transforms import normalize
from .devices import resolve_device
from .evaluation import confusion_matrix, inference_autocast
from .models import ModelSpec, RelPosAttention, add_relative_position_bias, build_model
from .presets import config_from_dict

STAR = "tinymim_star_tiny"
STAR_WIDTH = 1280  # TinyMIM*-T's widened last level (Segmentation/TinyMIMstar-T/backbone/mae.py: conv1x1)


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """mmcv's ConvModule(conv, BN, ReLU)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


def init_head_(head: nn.Module) -> None:
    """mmseg's initialisation of a decode head: ConvModule convolutions kaiming-normal (fan_out,
    relu) with BatchNorm 1/0 (mmcv), the classifier `conv_seg` N(0, 0.01) with bias 0."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(head.classify.weight, std=0.01)
    nn.init.zeros_(head.classify.bias)


class MultiScaleAdapter(nn.Module):
    """Token maps of 4 blocks (all at the patch stride) -> 4x, 2x, 1x, 0.5x resolution."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.keep = nn.Identity()
        self.down2 = nn.MaxPool2d(2)
        self.channels = [dim] * 4

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [op(f) for op, f in zip((self.up4, self.up2, self.keep, self.down2), feats)]


class StarAdapter(nn.Module):
    """TinyMIM*-T's released pyramid: every level widened to 4 x the width (768 for ViT-T's 192);
    the last from the widened last block (`wide` channels, 1280) by a strided 3x3 convolution."""

    def __init__(self, dim: int, wide: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, 2 * dim, 2, 2), nn.BatchNorm2d(2 * dim), nn.GELU(),
                                 nn.ConvTranspose2d(2 * dim, 4 * dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, 4 * dim, 2, 2)
        self.keep = nn.Conv2d(dim, 4 * dim, 1)
        self.down2 = nn.Conv2d(wide, 4 * dim, 3, stride=2, padding=1)
        self.channels = [4 * dim] * 4

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
        init_head_(self)

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
        init_head_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.dropout(self.conv(x)))


class ViTUperNet(nn.Module):
    """ViT backbone (any input size: position embeddings and relative position biases are
    resampled on the fly) + adapter + UperNet + auxiliary FCN. forward(x) -> (logits,
    aux_logits) at a quarter of the patch stride (1/4 of the input for patch 16); callers
    upsample. `widen` (TinyMIM*-T's LN + Linear + GELU) applies to the last level's tokens."""

    def __init__(self, backbone: VisionTransformer, out_indices: Sequence[int], num_classes: int,
                 channels: int = 512, aux_channels: int = 256, adapter: nn.Module | None = None,
                 widen: nn.Module | None = None):
        super().__init__()
        depth = len(backbone.blocks)
        if len(out_indices) != 4 or not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)}: need 4 block indices in 0..{depth - 1}")
        if not backbone.dynamic_img_size:
            raise ValueError("the backbone must be built with dynamic_img_size=True (any input size)")
        self.backbone, self.out_indices = backbone, tuple(out_indices)
        # never reached by the loss -- the features leave the blocks directly -- so frozen (DDP
        # refuses parameters without gradient): the final norm, and the blocks after the last level
        for unused in (backbone.norm, *backbone.blocks[max(out_indices) + 1:]):
            unused.requires_grad_(False)
        self.widen = widen
        self.adapter = adapter or MultiScaleAdapter(backbone.embed_dim)
        self.decode = UPerHead(self.adapter.channels, channels, num_classes)
        self.aux = FCNHead(self.adapter.channels[2], aux_channels, num_classes)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer ids for layer-wise lr decay as BEiT/MAE's segmentation: the embeddings,
        then one per block; everything else -- the adapter, heads, TinyMIM*-T's widening -- is
        unmatched and keeps the full lr."""
        return {"stem": r"^backbone\.(?:cls_token|dist_token|pos_embed|patch_embed)",
                "blocks": r"^backbone\.blocks\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        return {"backbone.pos_embed", "backbone.cls_token", "backbone.dist_token"}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        t = b.patch_embed(x)  # B x H x W x C (dynamic size)
        h, w = t.shape[1:3]
        for blk in b.blocks:
            if isinstance(blk.attn, RelPosAttention):
                blk.attn.grid = (h, w)
        t = b.norm_pre(b._pos_embed(t))
        feats = []
        last = max(self.out_indices)
        for i, blk in enumerate(b.blocks):
            t = blk(t)
            if i in self.out_indices:
                if i == last and self.widen is not None:
                    t = self.widen(t)
                feats.append(t[:, b.num_prefix_tokens:].transpose(1, 2).reshape(len(x), -1, h, w))
            if i == last:
                break
        feats = self.adapter(feats)
        return self.decode(feats), self.aux(feats[2])


def build_segmenter(cfg: SegmentationConfig) -> ViTUperNet:
    """The segmentation model of the release: the backbone with layer scale and relative
    position bias (`cfg.layer_scale`, `cfg.rel_pos_bias`: both recorded in the run's config; off
    gives a plain timm ViT), the encoder weights through `checkpoints.load_encoder` (absolute
    position embedding kept and resampled to the input grid, as the release's loader does; the
    layer scales and bias tables created, not loaded; a classifier checkpoint's heads ignored).
    TinyMIM*-T: its class and distillation tokens, 12 heads, and the released pyramid."""
    ckpt = open_checkpoint(cfg.pretrained) if cfg.pretrained else None
    spec = ModelSpec.create(cfg.model, img_size=cfg.input_size)
    if ckpt is not None and ckpt.spec is not None:
        spec = replace(spec, heads=ckpt.spec.heads)
    star = cfg.model == STAR
    if star:  # a backbone, not a classifier: the distillation token without its head
        spec = replace(spec, dist_token=True, global_pool="token")
    backbone = build_model(spec, drop_path=cfg.drop_path, dynamic_img_size=True, layer_scale=cfg.layer_scale)
    if cfg.rel_pos_bias:
        add_relative_position_bias(backbone, tuple(backbone.patch_embed.grid_size))
    if ckpt is not None:
        load_encoder(backbone, ckpt, allow_missing=SEGMENTATION_ONLY, allow_unexpected=CLASSIFIER_KEYS)
    dim = backbone.embed_dim
    adapter = widen = None
    if star:
        adapter = StarAdapter(dim, STAR_WIDTH)
        widen = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, STAR_WIDTH), nn.GELU())
        nn.init.trunc_normal_(widen[1].weight, std=0.02)  # the release backbone's Linear init
        nn.init.zeros_(widen[1].bias)
    return ViTUperNet(backbone, cfg.out_indices, cfg.num_classes, cfg.channels, cfg.aux_channels, adapter, widen)


def build_task(cfg: SegmentationConfig, device: torch.device | None = None) -> tuple[SegmentationTask, ViTUperNet, float]:
    """(the segmentation task, the model the optimiser groups, its layer decay); SyncBatchNorm
    when the run is distributed on GPUs (it has no CPU kernels: gloo runs keep per-rank BN)."""
    model = build_segmenter(cfg)
    if distributed.active() and device is not None and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return SegmentationTask(model, cfg), model, cfg.layer_decay


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
    """forward(images, masks) -> (loss, parts): `pixel_loss` + aux_weight x the auxiliary's,
    on the device half of `data.augment.Segment`'s recipe."""

    def __init__(self, model: ViTUperNet, cfg: SegmentationConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits, aux = self.model(images)
        main, aux = pixel_loss(logits, masks), pixel_loss(aux, masks)
        return main + self.cfg.aux_weight * aux, {"loss_main": main.detach(), "loss_aux": aux.detach()}


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """mmseg 0.x's CrossEntropyLoss (the release's): logits upsampled to the mask, per-pixel
    cross-entropy, averaged over all pixels -- an ignored pixel counts as 0, it is not left
    out of the denominator (`avg_non_ignore=False`)."""
    logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, masks.long(), ignore_index=IGNORE_INDEX, reduction="none").mean()


def segmentation_batches(cfg: SegmentationConfig, rank: int = 0, world_size: int = 1) -> LoaderBatches:
    """The training crops: ADE20K's `training` split, or the synthetic labelled split with its
    masks (`data_limit` of them, stratified by the main object's class), through the same recipe."""
    if cfg.data == "synthetic":
        source = train_source(cfg, "train", masks=True)
    else:
        source = ADE20K(cfg.data, "training", cfg.reduce_zero_label)
    return batches(cfg, source, recipe(cfg), rank, world_size)


def recipe(cfg: SegmentationConfig, device: torch.device | None = None) -> Segment:
    """The ADE20K training crops (mmseg's pipeline; its (2048, 512) scale is (4, 1) x the crop)."""
    return Segment(cfg.input_size, (4 * cfg.input_size, cfg.input_size), ignore_index=IGNORE_INDEX)


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
    """mIoU on the synthetic val split or ADE20K `validation` (single scale). Under torchrun
    each rank infers its shard of the images and the confusion matrices are summed."""
    device = resolve_device(device)
    model.eval().to(device)
    if cfg.data == "synthetic":
        val = synthetic("val", cfg, size=limit)
        mine = list(distributed.shard(len(val)))
        pairs = ((normalize(val.images[mine[i:i + 250]]), val.masks[mine[i:i + 250]]) for i in range(0, len(mine), 250))
        names = ["background", *val.classes]
    else:
        ds = ADE20K(cfg.data, "validation", cfg.reduce_zero_label)
        n = len(ds) if limit is None else min(limit, len(ds))

        def pairs_ade():
            for i in distributed.shard(n):
                img, mask = ds[i]
                h, w = img.shape[-2:]
                f = min(2048 / max(h, w), 512 / min(h, w))  # test scale (2048, 512), keep ratio
                x = F.interpolate(normalize(img[None]), size=(int(h * f + 0.5), int(w * f + 0.5)), mode="bilinear",
                                  align_corners=False)
                yield x, mask[None], (h, w)

        pairs = pairs_ade()
        names = resource_lines("ade20k_classes.txt")
    conf = torch.zeros(cfg.num_classes, cfg.num_classes, dtype=torch.long)
    for item in pairs:
        x, mask = item[0].to(device), item[1]
        with inference_autocast(device):
            logits = infer_slide(model, x, cfg.input_size, cfg.slide_stride) if mode == "slide" else infer_whole(model, x)
        if len(item) == 3:  # back to the annotation's size
            logits = F.interpolate(logits.float(), size=item[2], mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits.argmax(1).cpu(), mask, cfg.num_classes)
    conf = distributed.all_reduce_sum(conf, device).cpu()
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
    if is_builtin(cfg.data) and cfg.data != "synthetic":
        raise DataError(f"data: {cfg.data!r} has no masks; segmentation runs on the built-in synthetic data or an "
                        f"ADE20K folder (images/ + annotations/)")
    if cfg.data != "synthetic":  # the validation split is checked before training, not after
        ADE20K(cfg.data, "validation", cfg.reduce_zero_label)
        if cfg.num_classes != 150:
            raise DataError(f"num_classes: ADE20K has 150 classes, the config says {cfg.num_classes}")
    engine.seed_everything(cfg.seed)
    dev = resolve_device(device)
    task, model, layer_decay = build_task(cfg, dev)
    rank, world_size = distributed.world()
    engine.train(task, segmentation_batches(cfg, rank, world_size), cfg, run_dir, device=device, progress=progress,
                 optimize=model, layer_decay=layer_decay)
    metrics = evaluate_segmentation(model, cfg, device=device)
    if rank == 0:
        atomic_save({"model": model.state_dict(), "config": cfg.to_dict()}, run_dir / "model.pth")
        atomic_write_json(metrics, run_dir / "eval.json")
    distributed.barrier(dev)  # a caller on any rank may read them next
    return model, metrics
