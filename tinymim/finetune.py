"""Classification: MAE-recipe fine-tuning (Table 2), DeiT-style distillation fine-tuning
(TinyMIM*-T), and top-1/top-5 evaluation on the config's data.

timm supplies the pieces: `create_transform` (RandAugment, random erasing, bicubic
resize/crop), Mixup/CutMix, label smoothing, soft-target cross-entropy, DeiT's
distilled ViT and layer-wise lr decay (through the engine's `create_optimizer_v2`).
Written here: the hard-label distillation loss, which timm does not ship.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from . import engine
from .checkpoints import (
    CLASSIFIER_KEYS,
    CheckpointError,
    atomic_write_json,
    load_classifier,
    load_encoder,
    open_checkpoint,
    save_model,
)
from .config import FinetuneConfig
from .data import (
    DataError,
    ImageNetFolder,
    LoaderBatches,
    TensorBatches,
    folder_classes,
    limit,
    resource_lines,
    split_dir,
    synthetic,
)
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, random_resized_crop_flip
from .devices import loader_options
from .evaluation import predict, topk_accuracy
from .models import ModelSpec, build_model, model_spec


class Classifier(nn.Module):
    """forward(images, labels) -> (loss, parts). In-memory uint8 batches are augmented here
    (crop + flip + random erasing; RandAugment needs PIL images and runs in the file
    pipeline). With a `teacher`, DeiT hard-label distillation: the class head learns the
    labels, the distillation head the teacher's argmax, half and half."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, teacher: nn.Module | None = None):
        super().__init__()
        self.model, self.teacher = model, teacher
        self.img_size, self.crop_scale = cfg.input_size, tuple(cfg.crop_scale)
        self.erasing = RandomErasing(cfg.reprob, mode="pixel", device="cpu") if cfg.reprob > 0 else None
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=cfg.num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            model.set_distilled_training(True)

    frozen_modules = ("teacher",)  # the engine neither optimises nor checkpoints it

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x = images
        if x.dtype == torch.uint8:
            x = normalize(random_resized_crop_flip(x.float() / 255, self.img_size, scale=self.crop_scale))
            if self.erasing is not None:
                self.erasing.device = x.device
                x = self.erasing(x)
        if self.mixup is not None:
            x, labels = self.mixup(x, labels)
        out = self.model(x)
        if self.teacher is None:
            return self.criterion(out, labels), {}
        cls_out, dist_out = out
        with torch.inference_mode():
            hard = self.teacher(x).argmax(dim=1)
        base = self.criterion(cls_out, labels)
        dist = F.cross_entropy(dist_out, hard.clone())
        return 0.5 * base + 0.5 * dist, {"loss_cls": base.detach(), "loss_dist": dist.detach()}


def build_classifier(cfg: FinetuneConfig) -> nn.Module:
    """The model to fine-tune, with pre-trained encoder weights when `cfg.pretrained` is set.

    Head layout: `cfg.heads` when given (uniform); else the layout recorded in a tinymim
    checkpoint (a distilled student keeps its teacher-aligned last block); else the
    model's own. Only the classifier head(s), `fc_norm` and the distillation token may
    be missing from the checkpoint; anything else missing or unexpected is an error.
    """
    ckpt = open_checkpoint(cfg.pretrained) if cfg.pretrained else None
    spec = ModelSpec.create(cfg.model, num_classes=cfg.num_classes, heads=cfg.heads, img_size=cfg.input_size,
                            global_pool=cfg.global_pool, extra_fc=cfg.extra_fc, dist_token=cfg.dist_token)
    if ckpt is not None and ckpt.spec is not None and cfg.heads is None:
        if len(ckpt.spec.heads) != len(spec.heads):
            raise CheckpointError(f"{ckpt.path}: {len(ckpt.spec.heads)} blocks, but {cfg.model} has {len(spec.heads)}")
        spec = replace(spec, heads=ckpt.spec.heads)
    model = build_model(spec, drop_path=cfg.drop_path)
    if ckpt is not None:
        load_encoder(model, ckpt, allow_missing=(*CLASSIFIER_KEYS, "dist_token"))
    return model


def train_transform(cfg: FinetuneConfig):
    """MAE's fine-tuning pipeline (timm): RandomResizedCrop bicubic, flip, RandAugment,
    ImageNet normalisation, random erasing (pixel mode)."""
    return create_transform(cfg.input_size, is_training=True, scale=tuple(cfg.crop_scale),
                            auto_augment=cfg.rand_augment or None, color_jitter=cfg.color_jitter or 0.0,
                            interpolation="bicubic", re_prob=cfg.reprob, re_mode="pixel", re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(input_size: int):
    """Resize (input/0.875: 256 for 224) bicubic -> centre crop -> ImageNet normalisation."""
    return create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=0.875,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def label_space(cfg: FinetuneConfig) -> list[str] | None:
    """The classes a classifier trained on folders predicts, label i = classes[i]: the
    1000 ImageNet-1K wnids for a 1000-way model on wnid folders, else the train folders
    sorted. Checked against `num_classes` before any training; None for synthetic data."""
    if cfg.data == "synthetic":
        return None
    train = split_dir(cfg.data, "train")
    found = folder_classes(train)
    wnids = resource_lines("imagenet_1k_wnids.txt")
    space = wnids if cfg.num_classes == 1000 and set(found) <= set(wnids) else found
    if len(space) > cfg.num_classes:
        raise DataError(f"{train}: {len(space)} class folders, but num_classes={cfg.num_classes}; "
                        f"set num_classes={len(space)} (--set num_classes={len(space)})")
    return space


def classification_batches(cfg: FinetuneConfig, rank: int = 0, world_size: int = 1,
                           classes: list[str] | None = None):
    if cfg.data == "synthetic":
        train = synthetic("train", cfg, size=cfg.data_limit)
        return TensorBatches(train.images, train.labels, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank,
                             world_size=world_size)
    ds = limit(ImageNetFolder(split_dir(cfg.data, "train"), transform=train_transform(cfg), classes=classes),
               cfg.data_limit)
    return LoaderBatches(ds, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, rank=rank,
                         world_size=world_size)


def train_classifier(cfg: FinetuneConfig, run_dir: str | os.PathLike, progress: bool = True,
                     device: str | torch.device | None = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune (or train from scratch when `cfg.pretrained` is None), then evaluate.

    Writes model.pth (with its head layout), metrics.jsonl and eval.json to `run_dir`.
    """
    run_dir = Path(run_dir)
    classes = label_space(cfg)  # inputs are checked before any training: classes, val split, teacher
    if cfg.data != "synthetic":
        val = split_dir(cfg.data, "val")
        unknown = sorted(set(folder_classes(val)) - set(classes or []))
        if unknown:
            raise DataError(f"{val}: class folder(s) {unknown[:5]} are not among the {len(classes or [])} classes "
                            f"of {split_dir(cfg.data, 'train')}")
    teacher = None
    if cfg.dist_token:
        teacher = load_classifier(cfg.teacher_classifier, cfg.num_classes)
    engine.seed_everything(cfg.seed)  # init is a function of the config seed
    model = build_classifier(cfg)
    rank, world_size = engine.world()
    batches = classification_batches(cfg, rank, world_size, classes)
    start = time.perf_counter()
    result = engine.train(Classifier(model, cfg, teacher), batches, cfg, run_dir, device=device, progress=progress,
                          optimize=model, layer_decay=cfg.layer_decay)
    if cfg.dist_token:
        model.set_distilled_training(False)
    metrics = {"train_seconds": round(time.perf_counter() - start, 1), "steps": result.get("step"),
               "heads": list(model_spec(model).heads), **evaluate(model, cfg, device=device, classes=classes)}
    if rank == 0:
        save_model(model, run_dir / "model.pth", extra={"config": cfg.to_dict(), "classes": classes})
        atomic_write_json(metrics, run_dir / "eval.json")
    return model, metrics


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Any, split: str = "val", device: str | torch.device | None = "auto",
             batch_size: int = 250, classes: list[str] | None = None) -> dict[str, float]:
    """Top-1/top-5 (%) on the config's data: the synthetic split, or `<data>/<split>`
    class folders read with `eval_transform`, labelled by the model's `classes` (the
    list recorded at training; None: the ImageNet-1K order for wnid folders)."""
    if cfg.data == "synthetic":
        ds = synthetic(split, cfg)
        logits, labels = predict(model, ds.images, device=device, batch_size=batch_size)[0], ds.labels
    else:
        ds = ImageNetFolder(split_dir(cfg.data, split), transform=eval_transform(cfg.input_size), classes=classes)
        logits, labels = predict(model, DataLoader(ds, batch_size=batch_size, **loader_options(cfg.num_workers, False)), device)
    return {**topk_accuracy(logits, labels), "n": len(labels)}
