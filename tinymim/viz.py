"""Figures for the notebooks: MAE reconstructions, attention maps, training curves."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from .attention import attention_maps, relation_maps
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize


def _to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Normalised C x H x W -> H x W x C in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def plot_reconstruction(mae_model, images: torch.Tensor, n: int = 6):
    """Rows: input, masked input, MAE reconstruction (visible patches pasted back)."""
    torch.manual_seed(0)
    mae_model.eval()
    x = normalize(images[:n])
    recon, mask = mae_model.reconstruct(images[:n])
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
    for i in range(n):
        rows = [x[i], x[i] * (1 - mask[i]), x[i] * (1 - mask[i]) + recon[i] * mask[i]]
        for r, img in enumerate(rows):
            axes[r, i].imshow(_to_rgb(img), interpolation="nearest")
            axes[r, i].axis("off")
    for r, title in enumerate(("input", "masked (75%)", "reconstruction")):
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def plot_attention(model: VisionTransformer, images: torch.Tensor, block: int | None = None, n: int = 4):
    """Class-token attention of each head of `block` (default: last), over the patch grid."""
    x = normalize(images[:n])
    attn = attention_maps(model, x, block)  # B x H x N x N
    grid = model.patch_embed.grid_size
    cls = attn[:, :, 0, model.num_prefix_tokens:].reshape(n, attn.shape[1], *grid)
    heads = attn.shape[1]
    fig, axes = plt.subplots(n, heads + 1, figsize=(1.3 * (heads + 1), 1.3 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(_to_rgb(x[i]), interpolation="nearest")
        for h in range(heads):
            axes[i, h + 1].imshow(cls[i, h], cmap="viridis")
            if i == 0:
                axes[i, h + 1].set_title(f"head {h + 1}", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(f"[CLS] attention, block {block or len(model.blocks)}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(runs: dict[str, Sequence[dict]], key: str = "loss", ax=None):
    """Logged `key` against step for several runs (records from engine.read_metrics)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    for name, records in runs.items():
        ax.plot([r["step"] for r in records], [r[key] for r in records], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend()
    return ax


def save(fig, path: str | os.PathLike) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_relations(models: dict[str, tuple[VisionTransformer, int]], image: torch.Tensor, heads: int = 3):
    """Q-K and V-V relation maps of one image, a row per (model, target block), first heads.

    `models` maps a label (e.g. "teacher", "student before", "student after") to the
    model and its 1-indexed target block.
    """
    x = normalize(image[None])
    fig, axes = plt.subplots(len(models), 2 * heads + 1, figsize=(1.5 * (2 * heads + 1), 1.6 * len(models)),
                             squeeze=False)
    for r, (label, (model, block)) in enumerate(models.items()):
        size = model.patch_embed.img_size
        xm = x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bicubic")
        maps = relation_maps(model, xm, block)
        axes[r, 0].imshow(_to_rgb(x[0]), interpolation="nearest")
        axes[r, 0].set_ylabel(label, fontsize=8)
        for h in range(heads):
            for j, kind in enumerate(("qk", "vv")):
                ax = axes[r, 1 + 2 * h + j]
                ax.imshow(maps[kind][0, h], cmap="magma")
                if r == 0:
                    ax.set_title(f"{kind.upper()} h{h + 1}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_attention_statistics(stats: dict[str, dict[str, list[list[float]]]]):
    """Mean attention distance and entropy per block (x: relative depth, so models of
    different depths line up), one dot per head, the head mean as a line -- a model per
    colour (`stats`: name -> `attention.attention_statistics`)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, label in ((axes[0], "distance", "mean attention distance (px)"), (axes[1], "entropy", "attention entropy (nats)")):
        for i, (name, s) in enumerate(stats.items()):
            depth = len(s[key])
            xs = [(b + 1) / depth for b in range(depth)]
            color = f"C{i}"
            for x, heads in zip(xs, s[key]):
                ax.scatter([x] * len(heads), heads, s=10, color=color, alpha=0.5)
            ax.plot(xs, [sum(h) / len(h) for h in s[key]], color=color, label=f"{name} ({depth} blocks)")
        ax.set_xlabel("block / depth")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_confusion(counts: torch.Tensor, class_names: Sequence[str], ax=None, title: str = ""):
    """Row-normalised confusion matrix (rows = true class)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    rates = counts.float() / counts.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return ax


def plot_segmentation(images: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, num_classes: int, n: int = 6):
    """Rows: image, ground truth over the image, prediction over the image (255 = ignored, grey)."""
    cmap = plt.get_cmap("tab20", max(num_classes, 2))
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
    for i in range(min(n, len(images))):
        rgb = images[i].permute(1, 2, 0).cpu().numpy() if images.dtype == torch.uint8 else _to_rgb(images[i])
        for r, mask in enumerate((None, truth[i], pred[i])):
            ax = axes[r, i]
            ax.imshow(rgb, interpolation="nearest")
            if mask is not None:
                m = mask.cpu().float()
                colored = cmap(m.clamp(max=num_classes - 1).int().numpy() % cmap.N)
                colored[..., 3] = 0.6 * (m != 255).numpy()
                ax.imshow(colored, interpolation="nearest")
            ax.axis("off")
    for r, title in enumerate(("image", "ground truth", "prediction")):
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    return fig
