"""Supervised training and evaluation of ViT classifiers: fine-tuning, scratch baselines,
top-1/top-5 evaluation and linear probes.

The task wraps a timm ViT; timm supplies Mixup/CutMix, label smoothing, soft-target
cross-entropy and layer-wise lr decay (through the engine's `create_optimizer_v2`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from . import engine
from .config import FinetuneConfig
from .data import TensorBatches, synthetic
from .data.transforms import normalize, random_resized_crop_flip
from .models import ModelSpec, build_model, clean_state_dict, load_weights, read_checkpoint, save_model


class Classifier(nn.Module):
    """forward(images, labels) -> (loss, {}); in-memory uint8 batches are augmented here."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig):
        super().__init__()
        self.model = model
        self.img_size = cfg.input_size
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=cfg.num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x = images
        if x.dtype == torch.uint8:
            x = normalize(random_resized_crop_flip(x.float() / 255, self.img_size, scale=(0.35, 1.0)))
        if self.mixup is not None:
            x, labels = self.mixup(x, labels)
        return self.criterion(self.model(x), labels), {}


def build_classifier(cfg: FinetuneConfig) -> nn.Module:
    spec = ModelSpec.create(cfg.model, num_classes=cfg.num_classes, heads=cfg.heads, img_size=cfg.input_size,
                            global_pool=cfg.global_pool)
    model = build_model(spec, drop_path=cfg.drop_path)
    if cfg.pretrained:
        path = Path(cfg.pretrained)
        sd = clean_state_dict(read_checkpoint(path)["model"])
        load_weights(model, sd, str(path), allow_missing=("head.", "fc_norm."), allow_unexpected=("norm.",))
    return model


def train_classifier(cfg: FinetuneConfig, run_dir: str | os.PathLike, progress: bool = True) -> nn.Module:
    """Fine-tune (or train from scratch when `cfg.pretrained` is None) on the config's data."""
    run_dir = Path(run_dir)
    engine.seed_everything(cfg.seed)  # init is a function of the config seed
    model = build_classifier(cfg)
    if cfg.data != "synthetic":
        raise NotImplementedError("folder fine-tuning arrives with the ImageNet fine-tuning stage")
    train = synthetic("train", cfg)
    batches = TensorBatches(train.images, train.labels, batch_size=cfg.batch_size, seed=cfg.seed)
    engine.train(Classifier(model, cfg), batches, cfg, run_dir, progress=progress)
    save_model(model, run_dir / "model.pth", extra={"config": cfg.to_dict()})
    return model


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits for uint8 (normalised here) or already-normalised float images."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        out.append(model(normalize(x) if x.dtype == torch.uint8 else x).float())
    return torch.cat(out)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each k (k larger than the class count is skipped)."""
    out = {}
    for k in ks:
        if k <= logits.shape[1]:
            hit = logits.topk(k, dim=1).indices.eq(labels.view(-1, 1)).any(dim=1)
            out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Average-pooled patch tokens of the final norm: the linear-probe representation."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        tokens = model.forward_features(normalize(x) if x.dtype == torch.uint8 else x)
        out.append(tokens[:, model.num_prefix_tokens:].mean(dim=1).float())
    return torch.cat(out)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 weight_decay: float = 1e-4, max_iter: int = 300) -> dict[str, float]:
    """Multinomial logistic regression on frozen features (standardised with the train
    statistics, as MAE's BatchNorm-without-affine probe), fit by L-BFGS; val top-1/5."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    num_classes = int(train_y.max()) + 1
    torch.manual_seed(0)
    head = nn.Linear(tx.shape[1], num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(tx), train_y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return topk_accuracy(head(vx), val_y)


def probe_model(model: nn.Module, cfg: Any) -> dict[str, float]:
    """Linear probe of `model` on the synthetic labelled train split, scored on val."""
    train, val = synthetic("train", cfg), synthetic("val", cfg)
    return linear_probe(features(model, train.images), train.labels, features(model, val.images), val.labels)


def smoke_learnability(teacher: nn.Module, run_dir: str | os.PathLike, overrides: dict | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """The smoke profile's two sanity checks on the synthetic data.

    (a) a micro ViT trained from scratch on the labelled split must beat chance by far;
    (b) the MAE teacher's linear probe must beat the linear probe of a randomly
    initialised ViT of the same size -- i.e. pre-training on the pool learned something.
    """
    import time

    from .config import get_config
    from .models import model_spec

    run_dir = Path(run_dir)
    # from scratch: no layer-wise decay (there is no pre-trained hierarchy to protect)
    cfg = get_config("finetune", profile="smoke", overrides={"layer_decay": 1.0} | dict(overrides or {}))
    start = time.perf_counter()
    scratch = train_classifier(cfg, run_dir / "scratch", progress=progress)
    seconds = time.perf_counter() - start
    val = synthetic("val", cfg)
    acc = topk_accuracy(predict(scratch, val.images), val.labels)
    spec = model_spec(teacher)
    torch.manual_seed(cfg.seed)
    random_init = build_model(ModelSpec.create(spec.arch, heads=spec.heads[0], img_size=spec.img_size))
    return {
        "chance_top1": 100.0 / cfg.num_classes,
        "scratch_model": cfg.model,
        "scratch_steps": engine.make_plan(cfg, 1).steps,
        "scratch_seconds": round(seconds, 1),
        "scratch_top1": acc["top1"],
        "scratch_top5": acc["top5"],
        "teacher_probe_top1": probe_model(teacher, cfg)["top1"],
        "random_init_probe_top1": probe_model(random_init, cfg)["top1"],
    }
