"""Classification: MAE-recipe fine-tuning (Table 2), DeiT-style distillation fine-tuning
(TinyMIM*-T), scratch baselines, top-1/top-5 evaluation and linear probes.

timm supplies the pieces: `create_transform` (RandAugment, random erasing, bicubic
resize/crop), Mixup/CutMix, label smoothing, soft-target cross-entropy, DeiT's
distilled ViT and layer-wise lr decay (through the engine's `create_optimizer_v2`).
Written here: the hard-label distillation loss, which timm does not ship.
"""

from __future__ import annotations

import hashlib
import json
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
from .config import FinetuneConfig, get_config
from .data import ImageNetFolder, LoaderBatches, TensorBatches, limit, split_dir, synthetic
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, random_resized_crop_flip
from .models import (
    CheckpointError,
    ModelSpec,
    adapt_pos_embed,
    build_model,
    clean_state_dict,
    load_classifier,
    load_weights,
    model_spec,
    read_checkpoint,
    save_model,
)


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
    heads: tuple[int, ...] | None = None
    sd: dict[str, torch.Tensor] = {}
    if cfg.pretrained:
        ckpt = read_checkpoint(cfg.pretrained)
        sd = clean_state_dict(ckpt.get("model", ckpt))
        if "spec" in ckpt and cfg.heads is None:
            heads = tuple(ckpt["spec"]["heads"])
    spec = ModelSpec.create(cfg.model, num_classes=cfg.num_classes, heads=cfg.heads, img_size=cfg.input_size,
                            global_pool=cfg.global_pool, extra_fc=cfg.extra_fc, dist_token=cfg.dist_token)
    if heads is not None:
        if len(heads) != len(spec.heads):
            raise CheckpointError(f"{cfg.pretrained}: {len(heads)} blocks, but {cfg.model} has {len(spec.heads)}")
        spec = replace(spec, heads=heads)
    model = build_model(spec, drop_path=cfg.drop_path)
    if sd:
        if cfg.dist_token and "pos_embed" in sd and sd["pos_embed"].shape[1] == model.pos_embed.shape[1] - 1:
            pe = sd["pos_embed"]  # the distillation token starts at the class token's position
            sd["pos_embed"] = torch.cat([pe[:, :1], pe[:, :1], pe[:, 1:]], dim=1)
        sd = adapt_pos_embed(sd, model)
        has_norm = any(k.startswith("norm.") for k in model.state_dict())
        load_weights(model, sd, str(cfg.pretrained), allow_missing=("head.", "head_dist.", "fc_norm.", "dist_token"),
                     allow_unexpected=() if has_norm else ("norm.",))
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


def classification_batches(cfg: FinetuneConfig, rank: int = 0, world_size: int = 1):
    if cfg.data == "synthetic":
        train = synthetic("train", cfg, size=cfg.data_limit)
        return TensorBatches(train.images, train.labels, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank,
                             world_size=world_size)
    ds = limit(ImageNetFolder(split_dir(cfg.data, "train"), transform=train_transform(cfg)), cfg.data_limit)
    return LoaderBatches(ds, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, rank=rank,
                         world_size=world_size)


def train_classifier(cfg: FinetuneConfig, run_dir: str | os.PathLike, progress: bool = True,
                     device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune (or train from scratch when `cfg.pretrained` is None), then evaluate.

    Writes model.pth (with its head layout), metrics.jsonl and eval.json to `run_dir`.
    """
    run_dir = Path(run_dir)
    teacher = None
    if cfg.dist_token:
        teacher = load_classifier(cfg.teacher_classifier, cfg.num_classes)  # fails before any training
    engine.seed_everything(cfg.seed)  # init is a function of the config seed
    model = build_classifier(cfg)
    rank, world_size = engine.world()
    start = time.perf_counter()
    result = engine.train(Classifier(model, cfg, teacher), classification_batches(cfg, rank, world_size), cfg,
                          run_dir, device=device, progress=progress)
    if cfg.dist_token:
        model.set_distilled_training(False)
    metrics = {"train_seconds": round(time.perf_counter() - start, 1), "steps": result.get("step"),
               "heads": list(model_spec(model).heads), **evaluate(model, cfg, device=device)}
    if rank == 0:
        save_model(model, run_dir / "model.pth", extra={"config": cfg.to_dict()})
        (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    return model, metrics


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500,
            device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits for uint8 (normalised here) or already-normalised float images."""
    model.eval().to(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        out.append(model(normalize(x) if x.dtype == torch.uint8 else x).float().cpu())
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
def evaluate(model: nn.Module, cfg: Any, split: str = "val", device: str | torch.device = "cpu",
             batch_size: int = 250) -> dict[str, float]:
    """Top-1/top-5 (%) on the config's data: the synthetic split, or `<data>/<split>`
    ImageNet-style folders read with `eval_transform`."""
    if cfg.data == "synthetic":
        ds = synthetic(split, cfg)
        logits, labels = predict(model, ds.images, device=device), ds.labels
    else:
        ds = ImageNetFolder(split_dir(cfg.data, split), transform=eval_transform(cfg.input_size))
        loader = DataLoader(ds, batch_size=batch_size, num_workers=cfg.num_workers)
        model.eval().to(device)
        outs, ys = [], []
        for x, y in loader:
            outs.append(model(x.to(device)).float().cpu())
            ys.append(y)
        logits, labels = torch.cat(outs), torch.cat(ys)
    return {**topk_accuracy(logits, labels), "n": len(labels)}


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts, rows = true class, columns = predicted class."""
    idx = labels * num_classes + logits.argmax(dim=1)
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


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


def scratch_dir(run_dir: str | os.PathLike, cfg: FinetuneConfig) -> Path:
    """Where a run directory keeps a from-scratch baseline, named by its config: notebooks
    01, 03 and 05 share one when their configs agree (the engine then just resumes a
    finished run) and never mix up two that differ."""
    key = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(run_dir) / "baselines" / f"{cfg.model}-scratch-{key}"


def smoke_learnability(teacher: nn.Module, run_dir: str | os.PathLike, overrides: dict | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """The smoke profile's two sanity checks on the synthetic data.

    (a) a micro ViT trained from scratch on the labelled split must beat chance by far
    (the baseline of notebook 03, kept in the run directory's baselines/);
    (b) the MAE teacher's linear probe must beat the linear probe of a randomly
    initialised ViT of the same size -- i.e. pre-training on the pool learned something.
    """
    cfg = comparison_configs("smoke", None, overrides=overrides)["scratch"]
    _, scratch = train_classifier(cfg, scratch_dir(run_dir, cfg), progress=progress)
    spec = model_spec(teacher)
    torch.manual_seed(cfg.seed)
    random_init = build_model(ModelSpec.create(spec.arch, heads=spec.heads[0], img_size=spec.img_size))
    return {
        "chance_top1": 100.0 / cfg.num_classes,
        "scratch_model": cfg.model,
        "scratch_steps": scratch["steps"],
        "scratch_seconds": scratch["train_seconds"],
        "scratch_top1": scratch["top1"],
        "scratch_top5": scratch["top5"],
        "teacher_probe_top1": probe_model(teacher, cfg)["top1"],
        "random_init_probe_top1": probe_model(random_init, cfg)["top1"],
    }


def comparison_configs(profile: str, student: str | os.PathLike | None, model: str | None = None,
                       overrides: dict | None = None) -> dict[str, FinetuneConfig]:
    """Notebook 03's pair: the distilled student fine-tuned, and the same model from
    scratch under the same recipe but without layer decay (no pre-trained hierarchy)."""
    overrides = dict(overrides or {})
    out = {"scratch": get_config("finetune", model, profile, overrides | {"pretrained": None, "layer_decay": 1.0})}
    if student is not None:
        out["distilled"] = get_config("finetune", model, profile, {"pretrained": str(student)} | overrides)
    return out


def run_comparison(run_dir: str | os.PathLike, profile: str, student: str | os.PathLike, model: str | None = None,
                   overrides: dict | None = None, with_scratch: bool = True,
                   progress: bool = True) -> dict[str, Path]:
    """Fine-tune the distilled student (run_dir/03_finetune/distilled) and the scratch
    baseline (shared, see `scratch_dir`); returns each run directory, which holds
    model.pth, eval.json and metrics.jsonl. Finished runs are not trained again."""
    configs = comparison_configs(profile, student, model, overrides)
    dirs = {"distilled": Path(run_dir) / "03_finetune" / "distilled"}
    if with_scratch:
        dirs["scratch"] = scratch_dir(run_dir, configs["scratch"])
    for name, path in dirs.items():
        finished = (path / "eval.json").exists() and (path / "model.pth").exists()
        if not (finished and read_checkpoint(path / "model.pth").get("config") == configs[name].to_dict()):
            train_classifier(configs[name], path, progress=progress)  # resumes; refuses another config
    return dirs


def obtain_classifiers(run_dir: str | os.PathLike, profile: str, progress: bool = True) -> dict[str, Path]:
    """The checkpoints of notebook 03's comparison in `run_dir`, made now if missing
    (smoke: the student too, on demand)."""
    from .pretrain import obtain_student

    student = obtain_student(run_dir, profile, progress=progress)
    if profile != "smoke":
        dirs = {"distilled": Path(run_dir) / "03_finetune" / "distilled",
                "scratch": scratch_dir(run_dir, comparison_configs(profile, None)["scratch"])}
        missing = [str(p / "model.pth") for p in dirs.values() if not (p / "model.pth").exists()]
        if missing:
            raise FileNotFoundError(f"no fine-tuned models at {missing}: run notebook 03 first, or pass checkpoints")
        return {name: path / "model.pth" for name, path in dirs.items()}
    dirs = run_comparison(run_dir, profile, student, progress=progress)
    return {name: path / "model.pth" for name, path in dirs.items()}
