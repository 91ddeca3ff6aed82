"""MAE pre-training (He et al., 2022): how the smoke profile makes its teacher (the
pipeline layer decides when; this stage only trains one from a config).

The encoder is a timm ViT from `models.build_model`; this module adds MAE's random
masking, its light decoder and the per-patch normalised pixel loss. The state-dict
layout is the official one (`encoder.` prefixed here, which the loader strips), so an
MAE made here loads through exactly the code path of an official `_full` checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from . import distributed, engine
from .checkpoints import atomic_save, save_model
from .config import MAEConfig
from .data import Views, batches, train_source
from .data.transforms import normalize
from .devices import resolve_device
from .models import ModelSpec, build_model, sincos_pos_embed


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """N x 3 x H x W -> N x L x (p*p*3), patches in row-major order as MAE."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def random_masking(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random (1 - ratio) of the tokens per sample; mask is 1 where removed."""
    n, length, d = x.shape
    keep = int(length * (1 - ratio))
    noise = torch.rand(n, length, device=x.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


class MAE(nn.Module):
    """Masked autoencoder around a timm ViT encoder; forward(images) -> (loss, parts)."""

    def __init__(self, encoder: VisionTransformer, cfg: MAEConfig):
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        d, dd = encoder.embed_dim, cfg.decoder_dim
        self.patch = encoder.patch_embed.patch_size[0]
        num_patches = encoder.patch_embed.num_patches
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        grid = encoder.patch_embed.grid_size[0]
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dd, grid), persistent=True)
        self.decoder_blocks = nn.ModuleList(Block(dd, cfg.decoder_heads, 4.0, qkv_bias=True) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, self.patch ** 2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        assert num_patches == self.decoder_pos_embed.shape[1] - 1

    def no_weight_decay(self) -> set[str]:
        """The fixed position embedding only: MAE's main_pretrain.py decays the class and mask
        tokens (`add_weight_decay` spares 1-D tensors and biases)."""
        return {"encoder.pos_embed"}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder
        x = enc.patch_embed(x) + enc.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, self.cfg.mask_ratio)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.blocks(torch.cat([cls, x], dim=1))
        return enc.norm(x), mask, ids_restore

    def decode(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(n, length + 1 - x.shape[1], -1)], dim=1)
        tokens = tokens.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(images, self.patch)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Normalised crops (`data.augment.Views` with no jitter, MAE's recipe)."""
        latent, mask, ids_restore = self.encode(x)
        pred = self.decode(latent, ids_restore)
        return self.loss(x, pred, mask), {}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction in pixel space of the normalised input, mask image) for plots."""
        x = normalize(images)
        latent, mask, ids_restore = self.encode(x)
        pred = self.decode(latent, ids_restore)
        if self.cfg.norm_pix_loss:
            target = patchify(x, self.patch)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        p, g = self.patch, x.shape[-1] // self.patch
        def unpatch(t: torch.Tensor) -> torch.Tensor:
            return torch.einsum("nhwpqc->nchpwq", t.reshape(-1, g, g, p, p, 3)).reshape(-1, 3, g * p, g * p)
        mask_img = unpatch(mask.unsqueeze(-1).expand(-1, -1, p * p * 3))
        return unpatch(pred), mask_img


def recipe(cfg: MAEConfig, device: torch.device) -> Views:
    """MAE's augmentation (main_pretrain.py: RandomResizedCrop, flip) in `cfg.augment` mode;
    JPEGs are decoded on the device when it is a GPU and the mode is `device`."""
    return Views(cfg.input_size, tuple(cfg.crop_scale), None, cfg.augment, device_decode=device.type == "cuda")


def build_task(cfg: MAEConfig) -> tuple[MAE, None, None]:
    """The MAE of `cfg`: a fresh encoder (fixed sin-cos position embedding) and its decoder."""
    encoder = build_model(ModelSpec.create(cfg.model, img_size=cfg.input_size), drop_path=cfg.drop_path,
                          fixed_pos_embed=True)
    return MAE(encoder, cfg), None, None


def pretrain_mae(cfg: MAEConfig, run_dir: str | os.PathLike, progress: bool = True,
                 device: str | torch.device | None = "auto") -> Path:
    """Train an MAE per `cfg` in `run_dir`; returns the encoder checkpoint (teacher.pth)."""
    run_dir = Path(run_dir)
    engine.seed_everything(cfg.seed)  # init is a function of the config seed
    task, _, _ = build_task(cfg)
    encoder = task.encoder
    rank, world_size = distributed.world()
    dev = resolve_device(device)
    engine.train(task, batches(cfg, train_source(cfg, "pool"), recipe(cfg, dev), rank, world_size), cfg, run_dir,
                 device=device, progress=progress)
    out = run_dir / "teacher.pth"
    if rank == 0:
        save_model(encoder, out, extra={"config": cfg.to_dict(), "source": "MAE pre-training (this kit)"})
        atomic_save(task.state_dict(), run_dir / "mae_full.pth")  # MAE's `_full` layout: encoder + decoder
    distributed.barrier(dev)  # e.g. the distillation that follows in the same torchrun job loads it
    return out
