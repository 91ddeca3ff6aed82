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

import dataclasses
import json
import math
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import engine, stages
from .config import BaseConfig
from .data import MemoryImages
from .data import batches as data_batches
from .devices import (
    PREFETCH,
    autocast_dtype,
    default_workers,
    environment,
    gpu_count,
    is_oom,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    sync,
)
from .evaluation import predict
from .presets import get_config

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


def _batches(stage: str, cfg: BaseConfig, n: int, device: torch.device):
    """The stage's own augmentation over `n` random uint8 images (+ labels / masks) held in
    memory: the host half runs once here, the device half in every timed step, as in a run."""
    g = torch.Generator().manual_seed(0)
    size = cfg.input_size + (cfg.input_size // 8 if stage == "segmentation" else 0)  # crops, as ADE20K's
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, getattr(cfg, "num_classes", 1), (n,), generator=g)
    masks = torch.randint(0, getattr(cfg, "num_classes", 1), (n, size, size), generator=g)
    recipe = stages.get(stage).recipe(cfg, device)
    return data_batches(dataclasses.replace(cfg, num_workers=0), MemoryImages(images, labels, masks), recipe)


def _time_steps(stage: str, cfg: BaseConfig, micro: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Build the stage's task and optimiser at micro-batch `micro`, take one warm-up step,
    then `steps` timed ones: images/s (median of the steps) and peak memory of the steps."""
    cfg = dataclasses.replace(cfg, batch_size=micro, micro_batch_size=None, steps=steps + 1, warmup_steps=0, warmup_epochs=0)
    task, optimize, decay = stages.get(stage).build_task(cfg)  # random weights: throughput does not depend on them
    batches = _batches(stage, cfg, micro, device)
    with tempfile.TemporaryDirectory() as tmp:
        run = engine.start_run(task, batches, cfg, Path(tmp), device, optimize, decay)
        step = next(batches.epoch(0, 0, micro))
        task.train()
        times = []
        for i in range(steps + 1):
            if i == 1:  # the first step pays for kernel selection and allocation: not in the peak either
                reset_peak_memory(device)
            sync(device)
            t0 = time.perf_counter()
            engine.train_step(run, step)
            sync(device)
            if i:
                times.append(time.perf_counter() - t0)
    return {"images_per_s": micro / statistics.median(times), "peak_mem_gib": peak_memory(device)}


def _largest_fit(stage: str, cfg: BaseConfig, cap: int, device: torch.device) -> int:
    """The largest power-of-two micro-batch (8 .. cap) that trains without running out of
    GPU memory (the allocator's OutOfMemoryError, or cuBLAS/cuDNN failing to allocate)."""
    best, micro = 0, 8
    while micro <= cap:
        try:
            _time_steps(stage, cfg, micro, 1, device)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
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
    _, classifier, _ = stages.get("finetune").build_task(cfg)
    n = batch or (256 if device.type == "cuda" else 16)
    images = torch.randint(0, 256, (n, 3, cfg.input_size, cfg.input_size), dtype=torch.uint8)
    predict(classifier, images[: min(n, 8)], device, batch_size=n)  # warm-up
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        predict(classifier, images, device, batch_size=n)
        sync(device)
        times.append(time.perf_counter() - t0)
    rate = n / statistics.median(times) * devices
    return {"check": "evaluate", "model": model, "input_size": cfg.input_size, "device": str(device),
            "batch": n, "images_per_s": round(rate / devices, 2),
            "est_hours_imagenet_val": round(IMAGENET_VAL / rate / 3600, 3),
            "est_hours_imagenet_c": round(IMAGENET_C / rate / 3600, 2),
            "assumes": f"the {devices} device(s) evaluate disjoint shards"}


def check_data(profile: str, devices: int, training: list[dict[str, Any]], device: torch.device,
               micro: int = 64) -> list[dict[str, Any]]:
    """The JPEG pipelines (distillation's two views, fine-tuning's RandAugment) at this
    profile's input size, measured per worker core as `tinymim bench data` measures them,
    scaled by the workers one training process gets here, against the fastest consumer among
    the timed stages; and the host memory a process keeps in flight (workers x prefetch x
    micro-batch)."""
    from .bench import bench_data

    workers = default_workers(devices)
    record = bench_data(images=24, device=device, input_size=get_config("pretrain", None, profile).input_size)
    out = []
    for stage, rows in record["pipelines"].items():
        row = rows["host"]  # the default mode (config `augment`)
        rate = row["worker_images_per_s_per_core"] * max(1, workers)
        consumers = [r["images_per_s"] for r in training if r["stage"] == stage]
        need = max(consumers) if consumers else None
        keeps_up = None if need is None else rate >= need
        note = "per training process, workers on separate cores assumed"
        if keeps_up is False:
            note += ("; does not keep up: try --set augment=device (crop on the device)" if "device" in rows
                     else "; does not keep up: raise num_workers if there are idle cores")
        out.append({"check": "data", "pipeline": stage, "mode": "host", "workers_per_process": workers,
                    "worker_images_per_s_per_core": row["worker_images_per_s_per_core"],
                    "images_per_s": round(rate, 1), "device_ms_per_image": row["device_ms_per_image"],
                    "fastest_consumer_images_per_s": need, "keeps_up": keeps_up,
                    "in_flight_mib": round(max(1, workers) * PREFETCH * micro * row["bytes_per_sample"] / 2**20, 1),
                    "in_flight_for": f"{max(1, workers)} workers x {PREFETCH} x micro-batch {micro}", "note": note})
    return out


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

    report({"check": "environment", **environment(free_memory=True), "device": str(dev), "devices_used": devices})
    wanted = set(only or ["mae", "pretrain", "finetune", "segmentation", "evaluate", "data"])
    for stage, model, teacher in TRAINING[profile]:
        if stage in wanted:
            report(check_training(stage, model, teacher, profile, steps, dev, devices, batch))
    if "evaluate" in wanted:
        for model in EVALUATION[profile]:
            report(check_evaluation(model, profile, dev, devices, batch))
    if "data" in wanted:
        for record in check_data(profile, devices, [r for r in results if r["check"] == "train"], dev):
            report(record)
    report({"check": "done", "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
    return results
