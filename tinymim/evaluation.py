"""Evaluation shared by every stage: batched inference, top-k, confusion matrices,
frozen features and linear probes.

One inference loop serves fine-tuning, robustness, segmentation and the notebooks: it
takes in-memory images (uint8 are normalised here) or any iterable of (images, labels)
batches, runs on the given device, and can reduce each batch on the device (argmax) so
that 3.75 M ImageNet-C images never hold their logits in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import IGNORE_INDEX
from .data.transforms import normalize
from .devices import autocast_dtype, resolve_device


def _prepare(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return normalize(x) if x.dtype == torch.uint8 else x


@torch.no_grad()
def predict(
    model: nn.Module,
    data: torch.Tensor | Iterable[Sequence[torch.Tensor]],
    device: str | torch.device | None = "auto",
    batch_size: int = 500,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(outputs, labels) of `model` in eval mode over `data`.

    `data`: N x 3 x H x W images (uint8 or normalised float), or an iterable of
    (images, labels) batches such as a DataLoader. Outputs are float logits on the CPU,
    or `reduce(logits)` per batch (e.g. `argmax`); labels are None for a tensor input.
    The model is moved to `device` and stays there, so one evaluated many times (every
    corruption and severity) crosses to the GPU once.
    """
    device = resolve_device(device)
    model.eval().to(device)
    if isinstance(data, torch.Tensor):
        batches: Iterable = ((data[i:i + batch_size], None) for i in range(0, len(data), batch_size))
    else:
        batches = data
    outs, labels = [], []
    for x, y in batches:
        with inference_autocast(device):
            out = model(_prepare(x, device)).float()
        outs.append((reduce(out) if reduce else out).cpu())
        if y is not None:
            labels.append(torch.as_tensor(y))
    if not outs:
        raise ValueError("no images to evaluate")
    return torch.cat(outs), (torch.cat(labels) if labels else None)


def check_input_size(model: nn.Module, input_size: int) -> None:
    """A ViT's position embedding fixes the size it takes: say so before timm's assertion does."""
    trained = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if trained is not None and not getattr(model, "dynamic_img_size", False) and tuple(trained) != (input_size, input_size):
        raise ValueError(f"input_size {input_size}: the model was trained at {trained[0]} px (its position embedding); "
                         f"evaluate at input_size {trained[0]} (evaluate: --input-size {trained[0]}; robustness: "
                         f"--set input_size={trained[0]})")


def eval_resize(input_size: int) -> int:
    """MAE's evaluation resize (main_finetune.py `build_transform`): crop_pct 224/256 up to
    224 px (256 for 224), 1.0 above (a 384-px model sees the image resized to 384)."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return int(input_size / crop_pct)


def eval_transform(input_size: int, resize: int | None):
    """Resize the shorter side to `resize` (bicubic; None: no resize), centre crop to
    `input_size`, as uint8 -- `predict` normalises on the device. Serves fine-tuning's
    evaluation (`eval_resize`) and the robustness protocols (ImageNet-A/R: 256; -C: none)."""
    from torchvision import transforms as T

    steps = [T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC)] if resize else []
    return T.Compose([*steps, T.CenterCrop(input_size), T.PILToTensor()])


@dataclass
class EvalImages:
    """A split as evaluation sees it, in memory: uint8 N x 3 x S x S `images`, `labels`, the
    label space `classes`; `masks` (synthetic data) or the files' `paths` (folders) when there."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    masks: torch.Tensor | None = None
    paths: list[str] | None = None


def eval_tensors(cfg: Any, split: str, classes: Sequence[str] | None = None, n: int | None = None,
                 what: str = "num_images") -> EvalImages:
    """A split of the config's data as evaluation sees it: a built-in split, or `<data>/<split>`
    class folders (labelled by `classes`; None: the sorted train folders) through MAE's
    evaluation crop. `n`: a stratified subset of that many (`data.limit`, seeded by
    `data_seed`), never the first n; `what` names the setting in the error when `n` is below
    the class count. What the linear probes, the synthesised -C copy, the explorer and FiftyOne read."""
    from .data import ImageNetFolder, MemoryImages, builtin, classes_of, is_builtin, limit, split_dir

    if is_builtin(cfg.data):
        ds = builtin(split, cfg)
        pick = limit(MemoryImages(ds.images, ds.labels, classes=ds.classes), n, cfg.data_seed, what).indices
        return EvalImages(ds.images[pick], ds.labels[pick], list(ds.classes),
                          None if ds.masks is None else ds.masks[pick])
    folder = ImageNetFolder(split_dir(cfg.data, split), classes=classes or classes_of(cfg.data),
                            transform=eval_transform(cfg.input_size, eval_resize(cfg.input_size)))
    pick = limit(folder, n, cfg.data_seed, what).indices
    items = [folder[i] for i in pick]
    return EvalImages(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), list(folder.classes),
                      paths=[folder.samples[i][0] for i in pick])


def inference_autocast(device: torch.device):
    """bf16/fp16 inference on a GPU (as training there); on a CPU always fp32, so CPU
    results do not depend on whether the CPU happens to have native bf16."""
    dtype = autocast_dtype("auto", device) if device.type == "cuda" else None
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, int]:
    """How many of the images are right within the top k, for each k (k larger than the class
    count is skipped): counts, so that shards of an evaluation add up exactly."""
    return {f"top{k}": int(logits.topk(k, dim=1).indices.eq(labels.view(-1, 1)).any(dim=1).sum())
            for k in ks if k <= logits.shape[1]}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5),
                  across_ranks: torch.device | None = None) -> dict[str, float]:
    """Top-k accuracy in percent for each k, and "n", the number of images. With `across_ranks`
    (the run's device), `logits`/`labels` are this rank's shard (`distributed.shard`) and the
    counts are summed over ranks there first, so the result equals the single-process one
    exactly."""
    counts = topk_correct(logits, labels, ks)
    total = [*counts.values(), len(labels)]
    if across_ranks is not None:
        total = distributed.all_reduce_sum(total, across_ranks).tolist()
    *correct, n = total
    return {**{k: 100.0 * c / n for k, c in zip(counts, correct)}, "n": n}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """num_classes x num_classes counts, rows = true class, columns = predicted class.

    `pred` and `target` are class indices of any (equal) shape -- labels of images or of
    pixels; targets equal to `ignore_index` are left out.
    """
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, batch_size: int = 500,
             device: str | torch.device | None = "auto") -> torch.Tensor:
    """Average-pooled patch tokens after the final norm: the linear-probe representation
    (on the CPU, whatever device computed it)."""
    device = resolve_device(device)
    model.eval().to(device)
    out = []
    for i in range(0, len(images), batch_size):
        with inference_autocast(device):
            tokens = model.forward_features(_prepare(images[i:i + batch_size], device))
        out.append(tokens[:, model.num_prefix_tokens:].mean(dim=1).float().cpu())
    return torch.cat(out)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 weight_decay: float = 1e-4, max_iter: int = 300, seed: int = 0) -> dict[str, float]:
    """Multinomial logistic regression on frozen features (standardised with the train
    statistics, as MAE's BatchNorm-without-affine probe), fit by L-BFGS; val top-1/5."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    num_classes = int(train_y.max()) + 1
    head = nn.Linear(tx.shape[1], num_classes)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        head.reset_parameters()
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
