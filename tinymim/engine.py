"""The one training loop: pre-training, MAE, fine-tuning and segmentation all run here.

A *task* is an `nn.Module` whose `forward(*batch)` returns `(loss, components)`; its
trainable parameters (requires_grad) are what the optimizer sees, so a frozen teacher
inside a distillation task costs no optimizer state. The loop is deliberately flat
(MAE's `train_one_epoch` is the model): per-iteration lr schedule, gradient
accumulation to the config's effective batch, AMP, DDP when launched by torchrun,
atomic checkpoints and exact resume, a NaN guard, tqdm and JSON-lines metrics.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from torch import nn
from tqdm.auto import tqdm

from .config import BaseConfig
from .models import atomic_save


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class Batches(Protocol):
    """What the engine iterates: per-rank batches, reproducible from (epoch, start)."""

    def __len__(self) -> int: ...  # batches per epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Sequence[torch.Tensor]]: ...


@dataclass
class Plan:
    """How the config's effective batch maps onto this run's devices."""

    steps: int
    warmup_steps: int
    steps_per_epoch: int
    world_size: int
    accum_steps: int
    micro_batch: int


def make_plan(cfg: BaseConfig, steps_per_epoch: int, world_size: int = 1) -> Plan:
    per_rank = cfg.batch_size // world_size
    micro = min(cfg.micro_batch_size or per_rank, per_rank)
    if cfg.batch_size % world_size or per_rank % micro:
        raise ValueError(f"batch_size {cfg.batch_size} must split evenly over {world_size} device(s) "
                         f"x micro_batch_size {micro}")
    steps = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    if warmup >= steps and steps > 1:
        raise ValueError(f"warm-up ({warmup} steps) must be shorter than training ({steps} steps)")
    return Plan(steps, warmup, steps_per_epoch, world_size, per_rank // micro, micro)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and plain data (weights_only-loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto': bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def build_optimizer(task: nn.Module, cfg: BaseConfig) -> torch.optim.Optimizer:
    """AdamW with timm's param groups: no decay on biases, norms and the model's
    `no_weight_decay()` names (position embedding, class token). With `layer_decay` in
    the config, the task keeps all trainable weights in one timm model, `task.model`,
    whose `group_matcher` gives timm's layer-wise lr decay."""
    layer_decay = getattr(cfg, "layer_decay", None)
    target = task.model if layer_decay is not None else task
    return create_optimizer_v2(target, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                               layer_decay=layer_decay, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: BaseConfig, plan: Plan):
    """Per-iteration linear warm-up, then cosine (or linear) decay to `min_lr`."""
    common = dict(t_initial=max(1, plan.steps - plan.warmup_steps), lr_min=cfg.min_lr,
                  warmup_t=plan.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    if cfg.schedule == "linear":
        return PolyLRScheduler(optimizer, power=1.0, **common)
    return CosineLRScheduler(optimizer, **common)


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed() -> torch.device:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU,
    also across nodes) and return this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _trainable_state(task: nn.Module) -> dict[str, torch.Tensor]:
    """State of the parts that train (frozen teachers are rebuilt, not checkpointed)."""
    frozen = {n for n, p in task.named_parameters() if not p.requires_grad and n.split(".")[0] == "teacher"}
    return {k: v for k, v in task.state_dict().items() if k not in frozen and not k.startswith("teacher.")}


def train(
    task: nn.Module,
    batches: Batches,
    cfg: BaseConfig,
    run_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train `task` for the configured steps, resuming from `run_dir/checkpoint.pth`.

    Returns the last logged metrics plus `done` (all configured steps taken).
    `stop_after` ends the run early after that many steps, leaving a checkpoint -- for
    tests and time-boxed runs; calling again resumes.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    rank, world_size = world()
    plan = make_plan(cfg, len(batches), world_size)
    task.to(device)
    optimizer = build_optimizer(task, cfg)
    scheduler = build_scheduler(optimizer, cfg, plan)
    dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model = task
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)

    ckpt_path = run_dir / "checkpoint.pth"
    step = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _check_same_run(state.get("config", {}), cfg.to_dict(), ckpt_path)
        task.load_state_dict(state["task"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        _set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
    else:
        seed_everything(cfg.seed + rank)
    if step >= plan.steps:
        return _last_metrics(run_dir) | {"done": True}

    def save(step: int) -> None:
        rngs = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if rank == 0:
            atomic_save({"task": _trainable_state(task), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "step": step, "rng": rngs,
                         "config": cfg.to_dict(), "plan": plan.__dict__}, ckpt_path)

    log = _open_log(run_dir, step) if rank == 0 else None
    writer = _tensorboard(run_dir) if rank == 0 else None
    bar = tqdm(total=plan.steps, initial=step, disable=not progress or rank != 0, desc=run_dir.name, leave=False,
               mininterval=2.0)  # readable in log files too
    sums: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), dtype=torch.bool, device=device)
    window_start, window_steps = time.perf_counter(), 0
    last: dict[str, Any] = {}
    end = plan.steps if stop_after is None else min(plan.steps, step + stop_after)
    task.train()
    epoch, offset = divmod(step, plan.steps_per_epoch)
    it = batches.epoch(epoch, offset)
    while step < end:
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            it = batches.epoch(epoch)
            continue
        scheduler.step_update(step)
        batch = [t.to(device, non_blocking=True) for t in _flatten(batch)]
        chunks = list(zip(*(t.split(plan.micro_batch) for t in batch)))
        for i, chunk in enumerate(chunks):
            sync = i == len(chunks) - 1
            ctx = model.no_sync() if world_size > 1 and not sync else nullcontext()
            with ctx, torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, parts = model(*chunk)
            scaler.scale(loss / len(chunks)).backward()
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / len(chunks)
            bad |= ~torch.isfinite(loss.detach())
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(task.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        bar.update(1)
        is_log = step % cfg.log_every == 0 or step == end
        is_ckpt = step % cfg.ckpt_every == 0 or step == end
        if is_log or is_ckpt:
            if bool(bad):  # one host sync per log/checkpoint, never per step
                raise TrainingDiverged(
                    f"{run_dir}: loss became NaN/inf between steps {step - window_steps + 1} and {step}; "
                    f"the last good checkpoint ({ckpt_path}) is kept. Lower lr or check the data.")
        if is_log:
            elapsed = time.perf_counter() - window_start
            last = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4),
                    "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0),
                    **{k: float(v) / window_steps for k, v in sums.items()},
                    "imgs_per_s": window_steps * cfg.batch_size / max(elapsed, 1e-9)}
            if world_size > 1:
                last = _mean_across_ranks(last)
            if log is not None:
                log.write(json.dumps(last) + "\n")
                log.flush()
            if writer is not None:
                for k, v in last.items():
                    if k != "step":
                        writer.add_scalar(k, v, step)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            sums, window_start, window_steps = {}, time.perf_counter(), 0
        if is_ckpt:
            save(step)
    bar.close()
    if log is not None:
        log.close()
    if writer is not None:
        writer.close()
    return last | {"done": step >= plan.steps}


# settings that may change between a run and its resumption without changing the result
_RESUMABLE_CHANGES = {"log_every", "ckpt_every", "num_workers", "micro_batch_size"}


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint written under another config (a silent mix-up)."""
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in _RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:8])
        raise ValueError(f"{path}: holds a run with another config ({details}); "
                         f"use a new run directory, or delete this one to start over")


def _flatten(batch) -> list[torch.Tensor]:
    """A collated batch may nest views, e.g. ((student_view, teacher_view), labels)."""
    out: list[torch.Tensor] = []
    for item in batch:
        out.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return out


def _mean_across_ranks(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = [k for k in metrics if k not in ("step", "epoch", "lr")]
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    out = dict(metrics)
    for k, v in zip(keys, (t / dist.get_world_size()).tolist()):
        out[k] = v
    out["imgs_per_s"] = metrics["imgs_per_s"]
    return out


def _open_log(run_dir: Path, step: int):
    """Open metrics.jsonl for appending, dropping lines logged after the resumed step."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept))
    return open(path, "a")


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All logged steps of a run, for plots."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tb"))

