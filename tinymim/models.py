"""ViT builders on timm and the TinyMIM student/teacher layouts.

All models are timm `VisionTransformer`s, so their state-dict keys are the ones MAE,
DeiT and timm checkpoints use. What TinyMIM adds is a per-block head layout (the
student's last block takes the teacher's head count) and TinyMIM*-T's extra 192 -> 1280
projection; both are recorded in our checkpoints (`ModelSpec`) so any checkpoint
rebuilds exactly the model that wrote it -- which lets a distilled student serve as the
next teacher. Reading and writing checkpoints lives in `checkpoints.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import ARCH_SHAPES


@dataclass(frozen=True)
class Arch:
    """The shape of a plain ViT (supplementary Table 1 for T/S/B). Give one directly to
    `ModelSpec.create` to build a ViT of any size."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: int = 224

    @property
    def ffn_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


# the named shapes: resources/archs.json (sources there)
ARCHS: dict[str, Arch] = {name: Arch(**shape) for name, shape in ARCH_SHAPES.items()}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise KeyError(f"unknown model {name!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[name]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored in every checkpoint we write.

    `arch` names the shape (a key of ARCHS, or any name for a custom `shape`); `shape`
    holds the numbers, so a checkpoint of a custom-sized ViT rebuilds without a registry.
    """

    arch: str
    heads: tuple[int, ...]  # per block
    num_classes: int = 0
    global_pool: str = "avg"  # avg (MAE fine-tuning, with fc_norm) | token
    img_size: int = 224
    extra_fc: int = 0  # TinyMIM*-T: width of the FC layer before the classifier (1280)
    dist_token: bool = False  # DeiT-style distillation token with its own head
    shape: Arch | None = None  # None: ARCHS[arch]

    @property
    def dims(self) -> Arch:
        return self.shape or get_arch(self.arch)

    @classmethod
    def create(
        cls,
        arch: str | Arch,
        num_classes: int = 0,
        heads: int | None = None,
        last_heads: int | None = None,
        global_pool: str = "avg",
        img_size: int | None = None,
        extra_fc: int = 0,
        dist_token: bool = False,
        name: str = "custom",
    ) -> ModelSpec:
        """A spec from a model name, or from an `Arch` given directly (named `name`)."""
        a, arch_name, shape = (arch, name, arch) if isinstance(arch, Arch) else (get_arch(arch), arch, None)
        h = heads or a.num_heads
        layout = [h] * a.depth
        if last_heads:
            layout[-1] = last_heads
        for i, n in enumerate(layout):
            if a.embed_dim % n:
                raise ValueError(f"{arch_name}: block {i + 1} has {n} heads, which does not divide width {a.embed_dim}")
        if dist_token and num_classes <= 0:
            raise ValueError("a distillation token needs a classifier (num_classes > 0)")
        return cls(arch_name, tuple(layout), num_classes, "token" if dist_token else global_pool,
                   img_size or a.img_size, extra_fc, dist_token, shape)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["heads"] = list(self.heads)
        d["shape"] = asdict(self.dims)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        d = dict(d)
        d["heads"] = tuple(d["heads"])
        shape = d.pop("shape", None)
        if shape is not None and not (d["arch"] in ARCHS and Arch(**shape) == ARCHS[d["arch"]]):
            d["shape"] = Arch(**shape)
        return cls(**d)


class _MAELayerIds:
    """Layer ids for layer-wise lr decay as MAE/BEiT count them: the embeddings (class and
    distillation tokens, position and patch embedding) are layer 0, block i is layer
    i + 1, and everything else -- the final norm, fc_norm, the heads -- is unmatched and
    keeps the full lr (timm's own matcher puts the final norm with the last block)."""

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^(?:cls_token|dist_token|pos_embed|patch_embed)", "blocks": r"^blocks\.(\d+)"}


class ViT(_MAELayerIds, VisionTransformer):
    """timm's VisionTransformer (same keys and forward) with MAE's layer ids."""


class DistilledViT(_MAELayerIds, VisionTransformerDistilled):
    """timm's DeiT distilled ViT (TinyMIM*-T) with MAE's layer ids."""


def build_model(spec: ModelSpec, drop_path: float = 0.0, mae_init: bool = True, fixed_pos_embed: bool = False,
                dynamic_img_size: bool = False, layer_scale: float | None = None) -> VisionTransformer:
    """A timm ViT for `spec`.

    `mae_init` applies MAE's initialisation (2-D sin-cos position embedding, xavier
    linears, patch projection as a linear, class token N(0, .02)); with `mae_init=False`
    timm's own init is kept. `fixed_pos_embed` freezes the position embedding, as MAE and
    the TinyMIM student pre-train it; fine-tuning and segmentation train it (MAE's and
    TinyMIM's fine-tuning code). `dynamic_img_size` accepts any input size, resampling
    the position embedding on the fly (segmentation). `layer_scale` adds timm's LayerScale
    (`ls1`/`ls2.gamma`, trainable, initialised to that value) to every block, as the release's
    segmentation backbone (BEiT's `init_values`).
    """
    a = spec.dims
    if len(spec.heads) != a.depth:
        raise ValueError(f"{spec.arch}: head layout has {len(spec.heads)} entries, model has {a.depth} blocks")
    # DeiT's class (timm): a distillation token beside the class token, a second head, and
    # the two heads' predictions averaged outside distilled training
    model = (DistilledViT if spec.dist_token else ViT)(
        img_size=spec.img_size,
        patch_size=a.patch_size,
        embed_dim=a.embed_dim,
        depth=a.depth,
        num_heads=spec.heads[0],
        mlp_ratio=a.mlp_ratio,
        qkv_bias=True,
        num_classes=spec.num_classes,
        global_pool=spec.global_pool,
        fc_norm=spec.global_pool == "avg" and spec.num_classes > 0,
        drop_path_rate=drop_path,
        dynamic_img_size=dynamic_img_size,
        init_values=layer_scale,
    )
    for blk, h in zip(model.blocks, spec.heads):
        if blk.attn.num_heads != h:
            blk.attn = Attention(a.embed_dim, num_heads=h, qkv_bias=True)
    if spec.extra_fc:
        if spec.num_classes <= 0:
            raise ValueError("extra_fc needs a classifier (num_classes > 0)")
        # MobileNetV3-style: one FC widens the pooled feature before the classifier; with a
        # distillation token both heads share it (one extra layer, as the paper counts it)
        fc, act = nn.Linear(a.embed_dim, spec.extra_fc), nn.Hardswish()
        model.head = nn.Sequential(OrderedDict(fc=fc, act=act, classifier=nn.Linear(spec.extra_fc, spec.num_classes)))
        if spec.dist_token:
            model.head_dist = nn.Sequential(OrderedDict(
                fc=fc, act=act, classifier=nn.Linear(spec.extra_fc, spec.num_classes)))
    if mae_init:
        init_mae_(model)
    model.pos_embed.requires_grad_(not fixed_pos_embed)
    model.tinymim_spec = spec  # type: ignore[attr-defined]
    return model


def relative_position_index(window: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """BEiT's index into a relative position bias table for a `window` of patches after
    `prefix` tokens: the patch pairs first, then 3 entries per prefix token (to the patches,
    from the patches, to itself), the class token's last -- timm's `gen_relative_position_index`
    for one prefix token; TinyMIM*-T's segmentation backbone (class + distillation token) for two,
    in the release's order of assignment (Segmentation/TinyMIMstar-T/backbone/mae.py)."""
    from timm.models.beit import gen_relative_position_index

    one = gen_relative_position_index(window)
    if prefix == 1:
        return one
    if prefix != 2:
        raise ValueError(f"relative position bias: 1 or 2 prefix tokens, got {prefix}")
    area, num = window[0] * window[1], (2 * window[0] - 1) * (2 * window[1] - 1) + 6
    index = torch.zeros(area + 2, area + 2, dtype=one.dtype)
    index[2:, 2:] = one[1:, 1:]
    index[1, 0:], index[0:, 1], index[1, 1] = num - 6, num - 5, num - 4  # distillation token
    index[0, 0:], index[0:, 0], index[0, 0] = num - 3, num - 2, num - 1  # class token
    return index


class RelPosAttention(Attention):
    """timm's attention with BEiT's per-block relative position bias, as the release's
    segmentation backbone has it (zero-initialised, trainable; `relative_position_bias_table`
    names it). The table is made for the training `window` of patches; a forward on another grid
    (`grid`, set by the caller for each input) resamples it bicubically (timm's
    `resize_rel_pos_bias_table_simple`)."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], prefix: int = 1, qkv_bias: bool = True):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.window, self.prefix, self.grid = tuple(window), prefix, tuple(window)
        extra = 3 * prefix
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1) + extra, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window, prefix), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """heads x N x N: the bias of every token pair on the current grid."""
        from timm.layers import resize_rel_pos_bias_table_simple

        table, index = self.relative_position_bias_table, self.relative_position_index
        if self.grid != self.window:
            size = (2 * self.grid[0] - 1) * (2 * self.grid[1] - 1) + 3 * self.prefix
            table = resize_rel_pos_bias_table_simple(table, self.grid, (size, table.shape[1]))
            index = relative_position_index(self.grid, self.prefix).to(table.device)
        n = index.shape[0]
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        bias = self.position_bias().unsqueeze(0).to(x.dtype)
        return super().forward(x, attn_mask=bias if attn_mask is None else attn_mask + bias, **kwargs)


def add_relative_position_bias(model: VisionTransformer, window: tuple[int, int]) -> None:
    """Every block's attention becomes a `RelPosAttention` for `window` (its weights kept)."""
    for blk in model.blocks:
        old = blk.attn
        new = RelPosAttention(old.qkv.in_features, old.num_heads, window, model.num_prefix_tokens,
                              qkv_bias=old.qkv.bias is not None)
        new.load_state_dict(old.state_dict(), strict=False)
        new.fused_attn = old.fused_attn
        blk.attn = new


def set_fused_attention(model: VisionTransformer, fused: bool) -> None:
    """timm's fused `scaled_dot_product_attention` (True) or explicit matmul + softmax
    (False) in every block of `model`: the same arithmetic, different kernels."""
    for blk in model.blocks:
        blk.attn.fused_attn = fused


def choose_attention_kernel(models: list[VisionTransformer], device: torch.device, dtype: torch.dtype | None,
                            batch: int, reps: int = 3, margin: float = 0.0) -> str:
    """Measure one attention layer (forward + backward, the widest model's width and token
    count, `dtype` autocast) with each kernel, set the faster one on every block of
    `models`, and name it ('sdpa' or 'math'); math must beat SDPA by `margin` (a share) to
    be chosen. Measured, not assumed: on a CPU with AMX, bf16 SDPA was ~3x slower than
    matmul + softmax at 197 tokens; on GPUs SDPA is flash attention."""
    import copy
    import time

    widest = max(models, key=lambda m: m.embed_dim)
    attn = copy.deepcopy(widest.blocks[0].attn).to(device).requires_grad_(True)
    tokens = widest.patch_embed.num_patches + widest.num_prefix_tokens
    x = torch.randn(batch, tokens, widest.embed_dim, device=device, requires_grad=True)
    best: dict[bool, float] = {}
    for fused in (True, False):
        attn.fused_attn = fused
        for i in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                y = attn(x)
            y.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call of each kernel pays for its setup
                best[fused] = min(best.get(fused, float("inf")), time.perf_counter() - t0)
    fused = best[False] >= best[True] * (1 - margin)
    for model in models:
        set_fused_attention(model, fused)
    return "sdpa" if fused else "math"


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, (1, [1 +] grid*grid, dim)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def emb(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    pe = torch.cat([emb(gx), emb(gy)], dim=1)  # as MAE's meshgrid(w, h): column coordinate first
    if cls_token:
        pe = torch.cat([torch.zeros(1, dim, dtype=pe.dtype), pe], dim=0)
    return pe.float().unsqueeze(0)


def init_mae_(model: VisionTransformer) -> None:
    """MAE initialisation, in place (models_mae.initialize_weights)."""
    grid = model.patch_embed.grid_size[0]
    pe = sincos_pos_embed(model.embed_dim, grid, cls_token=model.cls_token is not None)
    if getattr(model, "dist_token", None) is not None:  # zero slot for the distillation token too
        pe = torch.cat([pe[:, :1], pe], dim=1)
        nn.init.normal_(model.dist_token, std=0.02)
    model.pos_embed.data.copy_(pe)
    w = model.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if model.cls_token is not None:
        nn.init.normal_(model.cls_token, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for head in (model.head, getattr(model, "head_dist", None)):
        if isinstance(head, nn.Linear):  # MAE fine-tuning: a near-zero classifier at start
            nn.init.trunc_normal_(head.weight, std=2e-5)


def model_spec(model: nn.Module) -> ModelSpec:
    spec = getattr(model, "tinymim_spec", None)
    if spec is None:
        raise ValueError("model was not built by tinymim.models.build_model (no spec attached)")
    return spec


# ---------------------------------------------------------------------------------
# model summary


def count_flops(fn: Any, models: list[nn.Module]) -> int:
    """FLOPs of one call of `fn` (a forward, or forward + backward), counted by torch with
    every ViT of `models` on timm's explicit attention (the same arithmetic whichever kernel
    runs it; torch's counter does not see inside the fused CPU kernel), then put back."""
    from torch.utils.flop_counter import FlopCounterMode

    attns = [m for model in models for m in model.modules() if hasattr(m, "fused_attn")]
    fused = [m.fused_attn for m in attns]
    try:
        for m in attns:
            m.fused_attn = False
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for m, f in zip(attns, fused):
            m.fused_attn = f
    return counter.get_total_flops()


def _forward_macs(model: nn.Module, img_size: int) -> float:
    """Multiply-accumulates of one eval-mode forward at `img_size` (what papers call FLOPs)."""
    x = torch.zeros(1, 3, img_size, img_size)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        flops = count_flops(lambda: model(x), [model])
    model.train(was_training)
    return flops / 2


def summary_row(name: str, spec: ModelSpec) -> dict[str, Any]:
    """Params (total, and without the final classifier) and GMACs of one model."""
    model = build_model(spec, mae_init=False)
    total = sum(p.numel() for p in model.parameters())
    head = model.head.classifier if spec.extra_fc else model.head
    cls_params = sum(p.numel() for p in head.parameters()) if isinstance(head, nn.Linear) else 0
    a = spec.dims
    return {
        "model": name,
        "width": a.embed_dim,
        "depth": a.depth,
        "heads": "/".join(str(h) for h in sorted(set(spec.heads), key=spec.heads.index)),
        "mlp": a.ffn_dim,
        "patch": a.patch_size,
        "input": spec.img_size,
        "params_M": round(total / 1e6, 2),
        "params_no_classifier_M": round((total - cls_params) / 1e6, 2),
        "GFLOPs": round(_forward_macs(model, spec.img_size) / 1e9, 3),
    }


def paper_model_specs(num_classes: int = 1000) -> dict[str, ModelSpec]:
    """The models the paper reports, for the summary table."""
    return {
        "ViT-T": ModelSpec.create("vit_tiny", num_classes),
        "ViT-S": ModelSpec.create("vit_small", num_classes),
        "ViT-B": ModelSpec.create("vit_base", num_classes),
        "ViT-L": ModelSpec.create("vit_large", num_classes),
        "TinyMIM*-T": ModelSpec.create("tinymim_star_tiny", num_classes, extra_fc=1280),
    }


def summary_table(profile: str = "smoke"):
    """Model sizes as a DataFrame: the paper's models, plus the micro ones in `smoke`.

    Published sizes to compare: ViT-T 5.7M / 1.3G, ViT-S 22M / 4.6G, ViT-B 86M / 17.6G,
    TinyMIM*-T 5.8M / 1.3G -- the TinyMIM*-T figure counts its 192->1280 FC but not the
    1280 x 1000 classifier (with it, 7.0M), which is why both columns are shown.
    """
    import pandas as pd

    specs = dict(paper_model_specs())
    if profile == "smoke":
        for name in ("micro_tiny", "micro_small", "micro_base"):
            specs[name] = ModelSpec.create(name, num_classes=10)
    return pd.DataFrame([summary_row(name, spec) for name, spec in specs.items()]).set_index("model")


