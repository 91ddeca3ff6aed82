"""ViT builders on timm, the TinyMIM student/teacher layouts, and safe checkpoint I/O.

All models are timm `VisionTransformer`s, so their state-dict keys are the ones MAE,
DeiT and timm checkpoints use. What TinyMIM adds is a per-block head layout (the
student's last block takes the teacher's head count) and TinyMIM*-T's extra 192 -> 1280
projection; both are recorded in our checkpoints so any checkpoint rebuilds exactly
the model that wrote it -- which lets a distilled student serve as the next teacher.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from timm.layers import Attention, resample_abs_pos_embed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

CHECKPOINT_FORMAT = "tinymim/1"


@dataclass(frozen=True)
class Arch:
    """The shape of a plain ViT (Table 1 of the supplementary for T/S/B)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: int = 224

    @property
    def ffn_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


ARCHS: dict[str, Arch] = {
    # paper sizes (ViT-L: the MAE teacher of ViT-B)
    "vit_tiny": Arch(192, 12, 3),
    "vit_small": Arch(384, 12, 6),
    "vit_base": Arch(768, 12, 12),
    "vit_large": Arch(1024, 24, 16),
    # TinyMIM*-T's backbone: ViT-T with 12 heads instead of 3 (same weights' shapes)
    "tinymim_star_tiny": Arch(192, 12, 12),
    # smoke sizes: 32 px images, patch 8 (a 4x4 grid: measured to learn several times
    # faster per CPU-minute than patch 4), the paper's T < S < B ordering; widths divisible by the teacher's 6 heads
    "micro_tiny": Arch(96, 4, 3, patch_size=8, img_size=32),
    "micro_small": Arch(144, 4, 4, patch_size=8, img_size=32),
    "micro_base": Arch(192, 6, 6, patch_size=8, img_size=32),
}

# timm model names whose weights match an entry above (for `timm:` teacher sources)
TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely or does not fit the model."""


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise KeyError(f"unknown model {name!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[name]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored in every checkpoint we write."""

    arch: str
    heads: tuple[int, ...]  # per block
    num_classes: int = 0
    global_pool: str = "avg"  # avg (MAE fine-tuning, with fc_norm) | token
    img_size: int = 224
    extra_fc: int = 0  # TinyMIM*-T: width of the FC layer before the classifier (1280)
    dist_token: bool = False  # DeiT-style distillation token with its own head

    @classmethod
    def create(
        cls,
        arch: str,
        num_classes: int = 0,
        heads: int | None = None,
        last_heads: int | None = None,
        global_pool: str = "avg",
        img_size: int | None = None,
        extra_fc: int = 0,
        dist_token: bool = False,
    ) -> ModelSpec:
        a = get_arch(arch)
        h = heads or a.num_heads
        layout = [h] * a.depth
        if last_heads:
            layout[-1] = last_heads
        for i, n in enumerate(layout):
            if a.embed_dim % n:
                raise ValueError(f"{arch}: block {i + 1} has {n} heads, which does not divide width {a.embed_dim}")
        if dist_token and num_classes <= 0:
            raise ValueError("a distillation token needs a classifier (num_classes > 0)")
        return cls(arch, tuple(layout), num_classes, "token" if dist_token else global_pool,
                   img_size or a.img_size, extra_fc, dist_token)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["heads"] = list(self.heads)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        d = dict(d)
        d["heads"] = tuple(d["heads"])
        return cls(**d)


def build_model(spec: ModelSpec, drop_path: float = 0.0, mae_init: bool = True,
                dynamic_img_size: bool = False) -> VisionTransformer:
    """A timm ViT for `spec`.

    `mae_init` applies MAE's initialisation (fixed 2-D sin-cos position embedding, xavier
    linears, patch projection as a linear, class token N(0, .02)) -- the student recipe
    of METHOD.md. With `mae_init=False` timm's own init is kept. `dynamic_img_size`
    accepts any input size, resampling the position embedding on the fly (segmentation).
    """
    a = get_arch(spec.arch)
    if len(spec.heads) != a.depth:
        raise ValueError(f"{spec.arch}: head layout has {len(spec.heads)} entries, model has {a.depth} blocks")
    # DeiT's class (timm): a distillation token beside the class token, a second head, and
    # the two heads' predictions averaged outside distilled training
    model = (VisionTransformerDistilled if spec.dist_token else VisionTransformer)(
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
    model.tinymim_spec = spec  # type: ignore[attr-defined]
    return model


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
    model.pos_embed.requires_grad_(False)
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


def count_flops(model: nn.Module, img_size: int) -> float:
    """Multiply-accumulates of one forward pass at `img_size` (what papers call FLOPs).

    torch's counter does not see inside the CPU flash-attention kernel, so attention is
    counted on timm's explicit (unfused) path, then the model is put back as it was.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, img_size, img_size)
    was_training = model.training
    attns = [m for m in model.modules() if hasattr(m, "fused_attn")]
    fused = [m.fused_attn for m in attns]
    model.eval()
    try:
        for m in attns:
            m.fused_attn = False
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        for m, f in zip(attns, fused):
            m.fused_attn = f
        model.train(was_training)
    return counter.get_total_flops() / 2


def summary_row(name: str, spec: ModelSpec) -> dict[str, Any]:
    """Params (total, and without the final classifier) and GMACs of one model."""
    model = build_model(spec, mae_init=False)
    total = sum(p.numel() for p in model.parameters())
    head = model.head.classifier if spec.extra_fc else model.head
    cls_params = sum(p.numel() for p in head.parameters()) if isinstance(head, nn.Linear) else 0
    a = get_arch(spec.arch)
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
        "GFLOPs": round(count_flops(model, spec.img_size) / 1e9, 3),
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


# ---------------------------------------------------------------------------------
# checkpoints: atomic writes, safe reads


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
    os.replace(tmp, path)
    return path


def save_model(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Our checkpoint format: weights + the ModelSpec that rebuilds them + plain metadata."""
    payload = {"format": CHECKPOINT_FORMAT, "spec": model_spec(model).to_dict(),
               "model": model.state_dict(), **dict(extra or {})}
    return atomic_save(payload, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a `.pth`/`.pt` or `.safetensors` file without ever unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        out: dict[str, Any] = {"model": tensors}
        if "tinymim_spec" in meta:
            import json

            out["spec"] = json.loads(meta["tinymim_spec"])
            out["format"] = CHECKPOINT_FORMAT
        return out
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load -- the file contains Python objects beyond tensors and plain data "
            f"(a pickle that could run code). Only weights_only checkpoints are accepted; convert it in a "
            f"trusted environment. Details: {str(e).splitlines()[0]}"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _state_dict_of(ckpt: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            sd = ckpt[key]
            break
    else:
        sd = ckpt
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: no tensors found (looked under 'model', 'state_dict', 'module' and the top level)")
    return sd


# keys of an MAE `_full` checkpoint (decoder, mask token) that a teacher does not need
_DECODER_PREFIXES = ("decoder_", "mask_token")


def clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip `module.`/`encoder.` prefixes and drop MAE's decoder and mask token."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "encoder.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith(_DECODER_PREFIXES):
            continue
        out[k] = v
    return out


def adapt_pos_embed(sd: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Interpolate a checkpoint's position embedding to the model's patch grid (bicubic)."""
    if "pos_embed" not in sd or sd["pos_embed"].shape == model.pos_embed.shape:
        return sd
    src = sd["pos_embed"]
    n_prefix = model.num_prefix_tokens if not model.no_embed_class else 0
    n_src = src.shape[1] - n_prefix
    old = int(round(n_src ** 0.5))
    if old * old != n_src:
        raise CheckpointError(f"pos_embed: {src.shape[1]} tokens is not {n_prefix} prefix + a square grid")
    sd = dict(sd)
    sd["pos_embed"] = resample_abs_pos_embed(src, new_size=list(model.patch_embed.grid_size),
                                             old_size=[old, old], num_prefix_tokens=n_prefix)
    return sd


def load_weights(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> None:
    """Load `sd` into `model`, failing with the exact keys and shapes that do not fit.

    `allow_missing` / `allow_unexpected` are key prefixes that may legitimately differ
    (e.g. the classifier head when fine-tuning a pre-trained encoder).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in sd if k not in own and not k.startswith(tuple(allow_unexpected))]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:20]))
    if problems:
        raise CheckpointError(f"{source}: does not fit the model -- " + " | ".join(problems))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def _infer_arch(sd: Mapping[str, torch.Tensor], path: Path) -> str:
    """Guess the arch of a plain ViT state dict from its widths and depth."""
    try:
        width = sd["patch_embed.proj.weight"].shape[0]
        patch = sd["patch_embed.proj.weight"].shape[-1]
    except KeyError:
        raise CheckpointError(f"{path}: no 'patch_embed.proj.weight' -- not a ViT checkpoint") from None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for name, a in ARCHS.items():  # the first match is the plain model (vit_tiny before TinyMIM*-T)
        if (a.embed_dim, a.depth, a.patch_size) == (width, depth, patch):
            return name
    raise CheckpointError(f"{path}: no known model has width {width}, depth {depth}, patch {patch}; "
                          f"pass the model name explicitly")


def load_teacher(name: str | None, path: str | os.PathLike | None = None, img_size: int | None = None,
                 heads: int | None = None) -> VisionTransformer:
    """A frozen, eval-mode ViT encoder from a checkpoint.

    Accepts official MAE encoder checkpoints (`{'model': ...}` with MAE/timm key names)
    and their `_full` variant (decoder and mask token dropped), `module.`/`encoder.`
    prefixes, safetensors files, and our own checkpoints, whose recorded head layout is
    used as is (a distilled student whose last block has 12 heads is rebuilt that way).
    `name` is the arch (e.g. 'vit_base'); None infers it from the weights. `name` may
    also be 'timm:<model name>' to take timm's pretrained weights -- from `path` when
    given (offline), otherwise from the hub (an explicit, online user choice).
    The position embedding is interpolated when `img_size` differs from the checkpoint's.
    """
    if name and name.startswith("timm:"):
        model = _load_timm_teacher(name[5:], path, img_size)
    else:
        if path is None:
            raise CheckpointError(f"teacher {name!r}: a checkpoint path is required")
        path = Path(path)
        ckpt = read_checkpoint(path)
        sd = clean_state_dict(_state_dict_of(ckpt, path))
        if "spec" in ckpt:  # ours: rebuild exactly what was trained, without the classifier
            spec = ModelSpec.from_dict(ckpt["spec"])
            if name and name != spec.arch:
                raise CheckpointError(f"{path}: checkpoint holds a {spec.arch}, but teacher {name!r} was asked for")
            spec = replace(spec, num_classes=0, extra_fc=0, dist_token=False, global_pool="avg",
                           img_size=img_size or spec.img_size)
        else:
            arch = name or _infer_arch(sd, path)
            spec = ModelSpec.create(arch, heads=heads, img_size=img_size)
        model = build_model(spec, mae_init=False)
        sd = {k: v for k, v in sd.items() if k != "dist_token"}
        if "dist_token" in (ckpt.get("spec") or {}) and ckpt["spec"]["dist_token"]:
            sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], dim=1)
        sd = adapt_pos_embed(sd, model)
        load_weights(model, sd, str(path), allow_unexpected=("head.", "fc_norm.", "head_dist."))
    model.eval().requires_grad_(False)
    return model


def _load_timm_teacher(timm_name: str, path: str | os.PathLike | None, img_size: int | None) -> VisionTransformer:
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0}
    if img_size:
        kwargs["img_size"] = img_size
    if path is not None:
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: checkpoint file not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    model = timm.create_model(timm_name, pretrained=True, **kwargs)  # offline with a file; hub only if the user gives none
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f"timm:{timm_name} is a {type(model).__name__}, not a VisionTransformer")
    arch = next((k for k, a in ARCHS.items() if (a.embed_dim, a.depth) == (model.embed_dim, len(model.blocks))), None)
    if arch is None:
        raise CheckpointError(f"timm:{timm_name}: width {model.embed_dim} / depth {len(model.blocks)} is not a known arch")
    model.tinymim_spec = ModelSpec.create(arch, img_size=model.patch_embed.img_size[0],  # type: ignore[attr-defined]
                                          heads=model.blocks[0].attn.num_heads)
    return model


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


def load_classifier(source: str | os.PathLike, num_classes: int | None = 1000) -> nn.Module:
    """A frozen, eval-mode classifier: a fine-tuned tinymim checkpoint path (rebuilt from
    its recorded spec), or 'timm:<model name>=<weights file>' for any timm classifier
    (offline). Used as the hard-label teacher of DeiT-style distillation fine-tuning and
    for evaluation; `num_classes=None` accepts a tinymim checkpoint's own class count."""
    source = str(source)
    if source.startswith("timm:"):
        import timm

        name, sep, path = source[5:].partition("=")
        if not sep or not Path(path).is_file():
            raise CheckpointError(f"{source}: expected timm:<model name>=<existing weights file>")
        model = timm.create_model(name, pretrained=True, num_classes=num_classes or 1000,  # offline: weights from `path`
                                  pretrained_cfg_overlay={"file": path})
    else:
        ckpt = read_checkpoint(source)
        if "spec" not in ckpt:
            raise CheckpointError(f"{source}: not a tinymim checkpoint (no model spec); for other classifiers "
                                  f"use timm:<model name>=<weights file>")
        spec = ModelSpec.from_dict(ckpt["spec"])
        if num_classes is not None and spec.num_classes != num_classes:
            raise CheckpointError(f"{source}: a {spec.num_classes}-class classifier, {num_classes} classes expected")
        model = build_model(spec, mae_init=False)
        load_weights(model, clean_state_dict(_state_dict_of(ckpt, Path(source))), source)
    return model.eval().requires_grad_(False)
