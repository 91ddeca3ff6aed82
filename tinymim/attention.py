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
    """a bᵀ / sqrt(d_h): the logits of a Q-K (a=q, b=k) or V-V (a=b=v) relation, in fp32 even
    under autocast -- the KL of the distillation loss compares softmaxes of these, and bf16
    logits would round away differences of the loss's own size (fp16 may overflow)."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().transpose(-2, -1) * a.shape[-1] ** -0.5


@torch.no_grad()
def relation_maps(model: VisionTransformer, images: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Q-K and V-V relation probabilities of `block` (1-indexed), B x heads x N x N."""
    q, k, v = block_qkv(model.blocks[block - 1], tokens_before(model, images, block))
    return {"qk": relation_logits(q, k).softmax(-1), "vv": relation_logits(v, v).softmax(-1)}


@torch.no_grad()
def all_block_qkv(model: VisionTransformer, images: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v) of every block in one forward pass: what every map of an image is made
    from (the explorer computes this once per model and image)."""
    x = tokens_before(model, images, 1)
    out = []
    for blk in model.blocks:
        out.append(block_qkv(blk, x))
        x = blk(x)
    return out


def maps_from_qkv(qkv: list[tuple[torch.Tensor, ...]]) -> dict[str, list[torch.Tensor]]:
    """Per block: Q-K attention and V-V relation probabilities, B x heads x N x N."""
    return {"qk": [relation_logits(q, k).softmax(-1) for q, k, _ in qkv],
            "vv": [relation_logits(v, v).softmax(-1) for _, _, v in qkv]}


def attention_rollout(attn: list[torch.Tensor], upto: int | None = None) -> torch.Tensor:
    """Abnar & Zuidema's rollout through blocks 1..upto (default: all): per block the
    head-mean attention plus the residual identity, rows renormalised, multiplied in
    order. B x N x N; row 0 is what the class token has gathered from each token."""
    n = attn[0].shape[-1]
    eye = torch.eye(n, dtype=attn[0].dtype, device=attn[0].device)
    out = eye.expand(attn[0].shape[0], n, n)
    for a in attn[: upto or len(attn)]:
        a = 0.5 * a.mean(dim=1) + 0.5 * eye
        out = (a / a.sum(-1, keepdim=True)) @ out
    return out


def _patch_distances(grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Euclidean distance in pixels between every pair of patch centres, P x P."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * patch
    return torch.cdist(centres, centres)


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch: int, prefix: int = 1) -> torch.Tensor:
    """Per head, the image-space distance (pixels) a patch query attends over: the
    attention-weighted distance to the key patches, averaged over query patches
    (Dosovitskiy et al., 2021, Fig. 7). Prefix tokens (class, distillation) are left out
    and each query's weights over patches renormalised. attn: [B x] heads x N x N."""
    a = attn[..., prefix:, prefix:]
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    dist = _patch_distances(grid, patch).to(a)
    per_query = (a * dist).sum(-1)  # [B x] heads x P
    return per_query.mean(-1) if per_query.dim() == 2 else per_query.mean(dim=(0, -1))


def attention_entropy(attn: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Per head, the entropy (nats) of a patch query's attention over all keys, averaged
    over query patches (and images): low = focused, log N = uniform."""
    a = attn[..., prefix:, :]
    ent = -(a * a.clamp_min(1e-12).log()).sum(-1)
    return ent.mean(-1) if ent.dim() == 2 else ent.mean(dim=(0, -1))


@torch.no_grad()
def attention_statistics(model: VisionTransformer, images: torch.Tensor) -> dict[str, list[list[float]]]:
    """Per block and head: mean attention distance (pixels) and attention entropy (nats)
    of `model` over normalised `images` -- what "does the student attend locally where
    the teacher does?" is answered with."""
    grid, patch = tuple(model.patch_embed.grid_size), model.patch_embed.patch_size[0]
    maps = maps_from_qkv(all_block_qkv(model.eval(), images))["qk"]
    prefix = model.num_prefix_tokens
    return {"distance": [mean_attention_distance(a, grid, patch, prefix).tolist() for a in maps],
            "entropy": [attention_entropy(a, prefix).tolist() for a in maps]}
