"""Classification: MAE-recipe fine-tuning (Table 2), DeiT-style distillation fine-tuning
(TinyMIM*-T), and top-1/top-5 evaluation on the config's data.

timm supplies the pieces: the augmentation (`data.augment.Classify`: RandAugment, random
erasing, Mixup/CutMix), label smoothing, soft-target cross-entropy, DeiT's distilled ViT
and layer-wise lr decay (through the engine's `create_optimizer_v2`).
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
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import distributed, engine
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
    Classify,
    DataError,
    ImageNetFolder,
    LoaderBatches,
    batches,
    builtin,
    classes_of,
    folder_classes,
    is_builtin,
    resource_lines,
    split_dir,
    train_source,
)
from .devices import loader_options, resolve_device
from .evaluation import check_input_size, eval_resize, eval_transform, predict, topk_accuracy
from .models import ModelSpec, build_model, model_spec


class Classifier(nn.Module):
    """forward(images, targets) -> (loss, parts) on the device half of `Classify`'s recipe
    (targets soft under Mixup/CutMix). With a `teacher`, DeiT hard-label distillation: the
    class head learns the labels, the distillation head the teacher's argmax, half and half."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, teacher: nn.Module | None = None):
        super().__init__()
        self.model, self.teacher = model, teacher
        if cfg.mixup > 0 or cfg.cutmix > 0:
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

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        out = self.model(x)
        if self.teacher is None:
            return self.criterion(out, targets), {}
        cls_out, dist_out = out
        with torch.inference_mode():
            hard = self.teacher(x).argmax(dim=1)
        base = self.criterion(cls_out, targets)
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


def build_task(cfg: FinetuneConfig, teacher: nn.Module | None = None) -> tuple[Classifier, nn.Module, float]:
    """(the fine-tuning task, the model whose parameters the optimiser groups, its layer decay);
    `teacher`: TinyMIM*-T's hard-label classifier."""
    model = build_classifier(cfg)
    return Classifier(model, cfg, teacher), model, cfg.layer_decay


def recipe(cfg: FinetuneConfig, device: torch.device | None = None) -> Classify:
    """MAE's fine-tuning augmentation (Table 2: RandAugment, random erasing, Mixup/CutMix with
    label smoothing) in `cfg.augment` mode."""
    return Classify(cfg.input_size, tuple(cfg.crop_scale), cfg.rand_augment, cfg.reprob, cfg.mixup, cfg.cutmix,
                    cfg.label_smoothing, cfg.num_classes, cfg.augment)


def label_space(cfg: FinetuneConfig) -> list[str] | None:
    """The classes a classifier trained on folders predicts, label i = classes[i]: the
    1000 ImageNet-1K wnids for a 1000-way model on wnid folders, else the train folders
    sorted. Checked against `num_classes` before any training; None for a built-in dataset
    (its labels are its classes' positions)."""
    if is_builtin(cfg.data):
        classes = classes_of(cfg.data)
        if cfg.num_classes < len(classes):
            raise DataError(f"num_classes: {cfg.data} has {len(classes)} classes, the config says {cfg.num_classes}; "
                            f"drop num_classes (it defaults to the data's) or set num_classes={len(classes)}")
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
                           classes: list[str] | None = None) -> LoaderBatches:
    return batches(cfg, train_source(cfg, "train", classes), recipe(cfg), rank, world_size)


def train_classifier(cfg: FinetuneConfig, run_dir: str | os.PathLike, progress: bool = True,
                     device: str | torch.device | None = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune (or train from scratch when `cfg.pretrained` is None), then evaluate.

    Writes model.pth (with its head layout), metrics.jsonl and eval.json to `run_dir`.
    """
    run_dir = Path(run_dir)
    classes = label_space(cfg)  # inputs are checked before any training: classes, val split, teacher
    if not is_builtin(cfg.data):
        val = split_dir(cfg.data, "val")
        unknown = sorted(set(folder_classes(val)) - set(classes or []))
        if unknown:
            raise DataError(f"{val}: class folder(s) {unknown[:5]} are not among the {len(classes or [])} classes "
                            f"of {split_dir(cfg.data, 'train')}")
        ImageNetFolder(val, classes=classes)  # an empty class folder is named now, not after training
    teacher = None
    if cfg.dist_token:
        teacher = load_classifier(cfg.teacher_classifier, cfg.num_classes)
    engine.seed_everything(cfg.seed)  # init is a function of the config seed
    task, model, layer_decay = build_task(cfg, teacher)
    rank, world_size = distributed.world()
    train_batches = classification_batches(cfg, rank, world_size, classes)
    start = time.perf_counter()
    result = engine.train(task, train_batches, cfg, run_dir, device=device, progress=progress, optimize=model,
                          layer_decay=layer_decay)
    if cfg.dist_token:
        model.set_distilled_training(False)
    metrics = {"train_seconds": round(time.perf_counter() - start, 1), "steps": result.get("step"),
               "heads": list(model_spec(model).heads), **evaluate(model, cfg, device=device, classes=classes)}
    if rank == 0:
        save_model(model, run_dir / "model.pth", extra={"config": cfg.to_dict(), "classes": classes})
        atomic_write_json(metrics, run_dir / "eval.json")
    distributed.barrier(resolve_device(device))  # a caller on any rank may read them next
    return model, metrics


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Any, split: str = "val", device: str | torch.device | None = "auto",
             batch_size: int = 250, classes: list[str] | None = None) -> dict[str, float]:
    """Top-1/top-5 (%) on the config's data: the built-in split, or `<data>/<split>`
    class folders read with MAE's evaluation transform (`eval_resize`), labelled by the
    model's `classes` (the list recorded at training; None: the ImageNet-1K order for wnid
    folders). Under torchrun each rank evaluates its shard and the counts are summed."""
    device = resolve_device(device)
    check_input_size(model, cfg.input_size)
    if is_builtin(cfg.data):
        ds = builtin(split, cfg)
        mine = list(distributed.shard(len(ds)))
        logits, labels = predict(model, ds.images[mine], device=device, batch_size=batch_size)[0], ds.labels[mine]
    else:
        ds = ImageNetFolder(split_dir(cfg.data, split), classes=classes,
                            transform=eval_transform(cfg.input_size, eval_resize(cfg.input_size)))
        shard = Subset(ds, distributed.shard(len(ds)))
        logits, labels = predict(model, DataLoader(shard, batch_size=batch_size, **loader_options(cfg.num_workers, False)),
                                 device)
    return topk_accuracy(logits, labels, across_ranks=device)
