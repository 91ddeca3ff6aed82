"""Per-head attention internals of a timm ViT block: the inputs of TinyMIM's targets.

TinyMIM's relation targets are computed on `norm1(x)` of one block, per head, class
token included. The capture is written once, here, and serves the distillation loss,
the attention widgets and the benchmark alike.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer


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


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_h)) -- the attention map (and TinyMIM's Q-K relation)."""
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


@torch.no_grad()
def attention_maps(model: VisionTransformer, images: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Attention probabilities of `block` (default: last), B x heads x N x N."""
    block = block or len(model.blocks)
    x = tokens_before(model, images, block)
    q, k, _ = block_qkv(model.blocks[block - 1], x)
    return attention_probs(q, k)
