"""TinyMIM distillation pre-training: one stage, or a chain (sequential distillation).

The teacher is given (`cfg.teacher_path`); making one when there is none is the
pipeline layer's business, not this stage's.

A run directory gets `checkpoint.pth` (training state, for resume), `metrics.jsonl`,
and at the end `student.pth` + `student.safetensors`: the student encoder with its head
layout recorded, so it loads back through `load_teacher` as the next teacher.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from . import distributed, engine
from .checkpoints import atomic_write_json, load_teacher, save_model
from .config import PretrainConfig
from .data import Views, batches, train_source
from .devices import resolve_device
from .distill import Distiller, default_teacher_block, quantize_teacher
from .models import ModelSpec, build_model, model_spec


def build_student(cfg: PretrainConfig, teacher_heads: int):
    """The student of docs/method.md: MAE init, its own heads except the last block, which
    takes the teacher's head count (head alignment). Stochastic depth as the release's
    models_tinymim.py: the same rate in every block but the last (whose MLP the loss never
    reaches), not timm's linear ramp, which would regularise half as much."""
    from timm.layers import DropPath

    spec = ModelSpec.create(cfg.model, heads=cfg.student_heads, last_heads=teacher_heads, img_size=cfg.input_size)
    student = build_model(spec, fixed_pos_embed=True)
    if cfg.drop_path > 0:
        for blk in student.blocks[:-1]:
            blk.drop_path1, blk.drop_path2 = DropPath(cfg.drop_path), DropPath(cfg.drop_path)
    return student


def build_task(cfg: PretrainConfig, teacher: VisionTransformer | None = None) -> tuple[Distiller, None, None]:
    """The distillation task of `cfg`: the student (docs/method.md's init and head alignment)
    against `teacher` -- or, for timing runs, a randomly initialised one of `cfg.teacher`."""
    if teacher is None:
        teacher = build_model(ModelSpec.create(cfg.teacher, img_size=cfg.input_size))
    block = cfg.teacher_block or default_teacher_block(teacher)
    student = build_student(cfg, teacher.blocks[block - 1].attn.num_heads)
    return Distiller(student, teacher, block, cfg.target, cfg.mask_ratio, relations=cfg.relations), None, None


def pretrain(cfg: PretrainConfig, run_dir: str | os.PathLike, progress: bool = True,
             stop_after: int | None = None, device: str | torch.device | None = "auto") -> Path:
    """Distil `cfg.model` from the teacher; returns the student checkpoint path.

    Everything that can be wrong with the pairing (head alignment, token counts) is
    checked before the first step (`distill.check_pairing`); the config checked the rest.
    """
    run_dir = Path(run_dir)
    if not cfg.teacher_path:
        raise ValueError("teacher_path: the teacher checkpoint to distil from is required "
                         "(an official MAE checkpoint, or a tinymim one)")
    teacher_path = Path(cfg.teacher_path)
    teacher = load_teacher(None, teacher_path, img_size=cfg.input_size)
    arch = model_spec(teacher).arch
    if arch != cfg.teacher:
        raise ValueError(f"{teacher_path} holds a {arch}, but the config says teacher={cfg.teacher!r}; "
                         f"set teacher={arch} (e.g. --set teacher={arch})")
    engine.seed_everything(cfg.seed)  # the student's init is a function of the config seed
    task, _, _ = build_task(cfg, quantize_teacher(teacher, cfg.teacher_quant, resolve_device(device)))
    student, block = task.student, task.teacher_block
    rank, world_size = distributed.world()
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        resolved = {"teacher_resolved": str(teacher_path), "teacher_block_resolved": block}
        atomic_write_json(cfg.to_dict() | resolved, run_dir / "config.json")
    result = engine.train(task, batches(cfg, train_source(cfg, "pool"), recipe(cfg, resolve_device(device)), rank,
                                        world_size), cfg, run_dir, device=device, progress=progress,
                          stop_after=stop_after)
    out = run_dir / "student.pth"
    if result["done"] and rank == 0:
        save_model(student, out, extra={"config": cfg.to_dict(), "teacher": str(teacher_path),
                                        "teacher_block": block}, safetensors=True)
    distributed.barrier(resolve_device(device))  # the next stage (a chain's next student) reads it on every rank
    return out


def recipe(cfg: PretrainConfig, device: torch.device) -> Views:
    """TinyMIM's two views (Table 1: crop scale, student-only colour jitter) in `cfg.augment`
    mode; JPEGs are decoded on the device when it is a GPU and the mode is `device`."""
    return Views(cfg.input_size, tuple(cfg.crop_scale), cfg.color_jitter, cfg.augment,
                 device_decode=device.type == "cuda")


def pretrain_sequential(cfg: PretrainConfig, chain: list[str], run_dir: str | os.PathLike,
                        progress: bool = True, device: str | torch.device | None = "auto") -> list[Path]:
    """Sequential distillation, e.g. chain ['vit_small', 'vit_tiny'] from a ViT-B teacher:
    each distilled student is the next stage's teacher (run dirs run_dir/<i>_<model>)."""
    paths: list[Path] = []
    teacher, teacher_path = cfg.teacher, cfg.teacher_path
    for i, model in enumerate(chain, start=1):
        stage = replace(cfg, model=model, teacher=teacher, teacher_path=teacher_path,
                        teacher_block=cfg.teacher_block if i == 1 else None)
        paths.append(pretrain(stage, Path(run_dir) / f"{i}_{model}", progress=progress, device=device))
        teacher, teacher_path = model, str(paths[-1])
    return paths

