"""Per-head attention internals of a timm ViT block, written once.

TinyMIM's relation targets are computed on `norm1(x)` of one block, per head, class
token included. This capture serves the distillation loss (`distill.py`), the attention
figures and widgets (`viz.py`) and the benchmark alike, so all of them see the same maps.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def tokens_before(model: VisionTransformer, images: torch.Tensor, block: int) -> torch.Tensor:
    """The token sequence entering `block` (1-indexed); later blocks are never run."""
    if not 1 <= block <= len(model.blocks):
        raise ValueError(f"block {block} is out of range: the model has blocks 1..{len(model.blocks)}")
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(model.patch_drop(x))
    for blk in model.blocks[: block - 1]:
        x = blk(x)
    return x


def block_qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of `block`'s attention on norm1(x), each B x heads x N x head_dim."""
    attn = block.attn
    b, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


@torch.no_grad()
def attention_maps(model: VisionTransformer, images: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Attention probabilities of `block` (default: last), B x heads x N x N."""
    block = block or len(model.blocks)
    x = tokens_before(model, images, block)
    q, k, _ = block_qkv(model.blocks[block - 1], x)
    return relation_logits(q, k).softmax(dim=-1)


def relation_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a bᵀ / sqrt(d_h): the logits of a Q-K (a=q, b=k) or V-V (a=b=v) relation."""
    return a @ b.transpose(-2, -1) * a.shape[-1] ** -0.5


@torch.no_grad()
def relation_maps(model: VisionTransformer, images: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Q-K and V-V relation probabilities of `block` (1-indexed), B x heads x N x N."""
    q, k, v = block_qkv(model.blocks[block - 1], tokens_before(model, images, block))
    return {"qk": relation_logits(q, k).softmax(-1), "vv": relation_logits(v, v).softmax(-1)}
