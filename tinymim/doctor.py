"""`tinymim doctor`: what this host can do with the paper's recipes, measured.

The first thing to run on a GPU host. It prints the environment, then a few real
training steps of every stage at the paper's sizes (ViT-T/S/B at 224 px, ViT-L as
ViT-B's teacher; UperNet at 512 px) on random 224 px images through the same tasks and
`engine.train_step` the runs use, the evaluation path, and the ImageNet-style JPEG
pipeline -- one JSON line each, with images/s, peak memory, the micro-batch that fits,
the accumulation the paper's batch needs here, and the wall-clock estimate of the full
paper schedule on this host (linear scaling over its devices assumed, and said).
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import engine
from .config import BaseConfig, get_config
from .data import TensorBatches, two_view_batches
from .data.transforms import TwoViews
from .devices import autocast_dtype, default_workers, environment, gpu_count, resolve_device
from .distill import Distiller, default_teacher_block
from .evaluation import predict
from .finetune import Classifier, build_classifier, classification_batches
from .mae import MAE
from .models import ModelSpec, build_model
from .pretrain import build_student
from .segmentation import SegmentationTask, build_segmenter

IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_C = 1_281_167, 50_000, 50_000 * 15 * 5
# (stage, model, teacher) trained for a few steps; smoke sizes for a quick look at the same paths
TRAINING = {
    "paper": [("mae", "vit_base", None), ("pretrain", "vit_tiny", "vit_base"), ("pretrain", "vit_small", "vit_base"),
              ("pretrain", "vit_base", "vit_large"), ("finetune", "vit_tiny", None), ("finetune", "vit_small", None),
              ("finetune", "vit_base", None), ("segmentation", "vit_small", None)],
    "smoke": [("mae", "micro_base", None), ("pretrain", "micro_tiny", "micro_base"), ("finetune", "micro_tiny", None),
              ("segmentation", "micro_tiny", None)],
}
EVALUATION = {"paper": ["vit_tiny", "vit_small", "vit_base"], "smoke": ["micro_tiny"]}


def _task(stage: str, cfg: BaseConfig) -> tuple[torch.nn.Module, torch.nn.Module | None, float | None]:
    """(task, module the optimiser groups, layer decay) -- as the stage builds them, with
    random weights (throughput does not depend on them)."""
    if stage == "mae":
        return MAE(build_model(ModelSpec.create(cfg.model, img_size=cfg.input_size), fixed_pos_embed=True), cfg), None, None
    if stage == "pretrain":
        teacher = build_model(ModelSpec.create(cfg.teacher, img_size=cfg.input_size))
        block = cfg.teacher_block or default_teacher_block(teacher)
        student = build_student(cfg, teacher.blocks[block - 1].attn.num_heads)
        views = TwoViews(cfg.input_size, cfg.crop_scale, cfg.color_jitter)
        return Distiller(student, teacher, block, cfg.target, cfg.mask_ratio, views=views, relations=cfg.relations), None, None
    if stage == "finetune":
        model = build_classifier(cfg)
        return Classifier(model, cfg), model, cfg.layer_decay
    model = build_segmenter(cfg)
    return SegmentationTask(model, cfg), model, cfg.layer_decay


def _batch(stage: str, cfg: BaseConfig, n: int) -> tuple[torch.Tensor, ...]:
    """Random uint8 images (the tasks augment in-memory batches on the device) + labels/masks."""
    g = torch.Generator().manual_seed(0)
    size = cfg.input_size + (cfg.input_size // 8 if stage == "segmentation" else 0)  # crops, as ADE20K's
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    if stage == "finetune":
        return images, torch.randint(0, cfg.num_classes, (n,), generator=g)
    if stage == "segmentation":
        return images, torch.randint(0, cfg.num_classes, (n, size, size), generator=g)
    return (images,)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(stage: str, cfg: BaseConfig, micro: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Build the stage's task and optimiser at micro-batch `micro`, take one warm-up step,
    then `steps` timed ones: images/s (median of the steps) and peak memory."""
    cfg = _with(cfg, batch_size=micro, micro_batch_size=None, steps=steps + 1, warmup_steps=0, warmup_epochs=0)
    task, optimize, decay = _task(stage, cfg)
    batch = _batch(stage, cfg, micro)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        run = engine.start_run(task, TensorBatches(*batch, batch_size=micro), cfg, Path(tmp), device, optimize, decay)
        task.train()
        times = []
        for i in range(steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            engine.train_step(run, batch)
            _sync(device)
            if i:  # the first step pays for kernel selection and allocation
                times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": micro / statistics.median(times), "peak_mem_gib": peak}


def _with(cfg: BaseConfig, **values: Any) -> BaseConfig:
    import dataclasses

    return dataclasses.replace(cfg, **values)


def _largest_fit(stage: str, cfg: BaseConfig, cap: int, device: torch.device) -> int:
    """The largest power-of-two micro-batch (8 .. cap) that trains without running out of
    GPU memory."""
    best, micro = 0, 8
    while micro <= cap:
        try:
            _time_steps(stage, cfg, micro, 1, device)
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        best, micro = micro, micro * 2
    if not best:
        raise torch.OutOfMemoryError(f"{stage} {cfg.model}: not even a micro-batch of 8 fits on {device}")
    return best


def _paper_images(cfg: BaseConfig) -> int:
    """Images the paper schedule processes: steps x batch, or epochs x ImageNet-1K train."""
    return cfg.steps * cfg.batch_size if cfg.steps else round(cfg.epochs * IMAGENET_TRAIN)


def _plan(paper_batch: int, fits: int, devices: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for the paper's effective batch on `devices`: the
    largest divisor of the per-device batch that fits."""
    per_device = max(1, paper_batch // devices)
    micro = max(d for d in range(1, min(fits, per_device) + 1) if per_device % d == 0)
    return micro, per_device // micro


def check_training(stage: str, model: str, teacher: str | None, profile: str, steps: int, device: torch.device,
                   devices: int, batch: int | None) -> dict[str, Any]:
    cfg = get_config(stage, model, profile, {"teacher": teacher} if teacher else None)
    paper_batch, searched = cfg.batch_size, batch is None and device.type == "cuda"
    if batch is None:  # search on a GPU; on a CPU a small fixed batch (the point there is the path, not the fit)
        batch = _largest_fit(stage, cfg, min(1024, max(8, paper_batch // devices)), device) if device.type == "cuda" else 2
    timed = _time_steps(stage, cfg, batch, steps, device)
    micro, accum = _plan(paper_batch, batch, devices)
    host = timed["images_per_s"] * devices
    images = _paper_images(cfg)
    return {"check": "train", "stage": stage, "model": model, "teacher": teacher, "input_size": cfg.input_size,
            "device": str(device), "precision": str(autocast_dtype(cfg.amp, device) or torch.float32).split(".")[-1],
            "micro_batch": batch, "searched": searched, "steps_timed": steps,
            "images_per_s": round(timed["images_per_s"], 2), "peak_mem_gib": _round(timed["peak_mem_gib"]),
            "paper_batch": paper_batch, "devices": devices, "micro_batch_size": micro, "accum_steps": accum,
            "paper_images": images, "est_hours_paper_schedule": round(images / host / 3600, 2),
            "assumes": f"linear scaling over {devices} device(s) of this kind"}


def check_evaluation(model: str, profile: str, device: torch.device, devices: int, batch: int | None) -> dict[str, Any]:
    cfg = get_config("finetune", model, profile)
    classifier = build_classifier(cfg)
    n = batch or (256 if device.type == "cuda" else 16)
    images = torch.randint(0, 256, (n, 3, cfg.input_size, cfg.input_size), dtype=torch.uint8)
    predict(classifier, images[: min(n, 8)], device, batch_size=n)  # warm-up
    times = []
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        predict(classifier, images, device, batch_size=n)
        _sync(device)
        times.append(time.perf_counter() - t0)
    rate = n / statistics.median(times) * devices
    return {"check": "evaluate", "model": model, "input_size": cfg.input_size, "device": str(device),
            "batch": n, "images_per_s": round(rate / devices, 2),
            "est_hours_imagenet_val": round(IMAGENET_VAL / rate / 3600, 3),
            "est_hours_imagenet_c": round(IMAGENET_C / rate / 3600, 2),
            "assumes": f"the {devices} device(s) evaluate disjoint shards"}


def _write_jpegs(root: Path, n: int) -> None:
    """`n` ImageNet-like JPEGs (500 x 375, smooth content, quality 90) in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"n{i % 2:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        small.resize((500, 375), Image.BICUBIC).save(folder / f"{i}.JPEG", quality=90)


def check_data(profile: str, devices: int, training: list[dict[str, Any]], images: int = 192) -> list[dict[str, Any]]:
    """Decode + augment throughput of the JPEG pipelines (distillation's two views,
    fine-tuning's RandAugment) with the workers one training process gets here, against the
    fastest consumer among the timed stages."""
    workers = default_workers(devices) if profile == "paper" else 0
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        _write_jpegs(Path(tmp), images)
        for stage, make in (("pretrain", two_view_batches), ("finetune", classification_batches)):
            cfg = get_config(stage, None, profile, {"data": tmp, "batch_size": 32, "num_workers": workers})
            batches = make(cfg)
            t0, seen = None, 0
            for i, batch in enumerate(_take(batches.epoch(0), len(batches))):
                if i == 0:  # worker start-up is paid once per run (persistent workers)
                    t0 = time.perf_counter()
                    continue
                seen += len(batch[-1])  # the labels: one per image (the views come as a pair)
            rate = seen / (time.perf_counter() - t0) if seen else float("nan")
            consumers = [r["images_per_s"] for r in training if r["stage"] == stage]
            need = max(consumers) if consumers else None
            out.append({"check": "data", "pipeline": stage, "workers_per_process": workers,
                        "images_per_s": round(rate, 1), "fastest_consumer_images_per_s": need,
                        "keeps_up": None if need is None else rate >= need,
                        "note": "per training process; raise num_workers (--set num_workers=N) if it does not keep up"})
    return out


def _take(it: Iterable, n: int) -> Iterable:
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def _round(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else round(v, 2)


def run_doctor(profile: str = "paper", steps: int = 3, device: str | None = "auto", batch: int | None = None,
               only: list[str] | None = None, emit: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every check in order; each result is passed to `emit` (default: one JSON line on
    stdout) as soon as it is measured, and all are returned."""
    emit = emit or (lambda record: print(json.dumps(record), flush=True))
    if batch is not None and (batch < 2 or batch % 2):
        raise ValueError(f"--batch {batch}: expected an even micro-batch of at least 2 (Mixup/CutMix pair images)")
    dev = resolve_device(device)
    devices = max(1, gpu_count(device)) if dev.type == "cuda" else 1
    results: list[dict[str, Any]] = []

    def report(record: dict[str, Any]) -> None:
        results.append(record)
        emit(record)

    report({"check": "environment", **environment(), "device": str(dev), "devices_used": devices})
    wanted = set(only or ["mae", "pretrain", "finetune", "segmentation", "evaluate", "data"])
    for stage, model, teacher in TRAINING[profile]:
        if stage in wanted:
            report(check_training(stage, model, teacher, profile, steps, dev, devices, batch))
    if "evaluate" in wanted:
        for model in EVALUATION[profile]:
            report(check_evaluation(model, profile, dev, devices, batch))
    if "data" in wanted:
        for record in check_data(profile, devices, [r for r in results if r["check"] == "train"]):
            report(record)
    report({"check": "done", "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
    return results
