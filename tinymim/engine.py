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
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoints import CheckpointError, atomic_save, atomic_write, atomic_write_json, sweep_temp_files
from .config import BaseConfig, derive_seed
from .devices import autocast_dtype
from .models import choose_attention_kernel, set_fused_attention


class TrainingDiverged(RuntimeError):
    """The loss, gradients or weights became NaN/inf; the last finite checkpoint is kept."""


class Batches(Protocol):
    """What the engine iterates (`data.batches`): per step, this rank's micro-batches as the
    host made them, reproducible from (epoch, start); `prepare` makes one the task's inputs
    on the device (the device half of the augmentation, in fp32, outside autocast)."""

    def __len__(self) -> int: ...  # steps per epoch

    def epoch(self, epoch: int, start: int = 0, micro: int | None = None) -> Iterator[list[Any]]: ...

    def prepare(self, micro_batch: Any, device: torch.device) -> Sequence[torch.Tensor]: ...


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
    if warmup and warmup >= steps:  # the whole run would be warm-up: an lr that never peaks
        raise ValueError(f"warm-up ({warmup} steps) must be shorter than training ({steps} steps)")
    return Plan(steps, warmup, steps_per_epoch, world_size, per_rank // micro, micro)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch from one integer."""
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


def build_optimizer(module: nn.Module, cfg: BaseConfig, layer_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW over `module`'s trainable parameters with timm's groups: no decay on biases,
    norms and the module's `no_weight_decay()` names (position embedding, class token);
    with `layer_decay`, timm's layer-wise lr decay from the module's `group_matcher`."""
    return create_optimizer_v2(module, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                               layer_decay=layer_decay, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: BaseConfig, plan: Plan):
    """Per-iteration linear warm-up, then cosine (or linear) decay to `min_lr`."""
    common = dict(t_initial=max(1, plan.steps - plan.warmup_steps), lr_min=cfg.min_lr,
                  warmup_t=plan.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    if cfg.schedule == "linear":
        return PolyLRScheduler(optimizer, power=1.0, **common)
    return CosineLRScheduler(optimizer, **common)


def _frozen_keys(task: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the submodules a task marks as frozen (`frozen_modules`):
    a teacher is rebuilt from its own checkpoint, never optimised or checkpointed here."""
    return tuple(f"{name}." for name in getattr(task, "frozen_modules", ()))


def _trainable_state(task: nn.Module) -> dict[str, torch.Tensor]:
    frozen = _frozen_keys(task)
    return {k: v for k, v in task.state_dict().items() if not k.startswith(frozen)} if frozen else task.state_dict()


@dataclass
class Run:
    """What one training run holds besides the task: optimiser, schedule, precision and
    where it stands. Built by `start_run`, advanced by `train_step`, saved by `_save`."""

    task: nn.Module
    model: nn.Module  # the task, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    plan: Plan
    cfg: BaseConfig
    device: torch.device
    dtype: torch.dtype | None
    ckpt_path: Path
    prepare: Callable[[Any, torch.device], Sequence[torch.Tensor]]  # the batches' device half
    step: int = 0
    attention_kernel: str | None = None  # 'sdpa' | 'math' in every ViT of the task; None: no ViT


def _wrap(task: nn.Module, device: torch.device) -> nn.Module:
    """DDP of the task's trained part: the frozen modules' parameters and buffers (a teacher)
    are ignored -- never broadcast or all-reduced, so a BatchNorm teacher's buffers or a
    quantised teacher's weights do not travel every step."""
    frozen = _frozen_keys(task)
    if frozen:
        names = [n for n, _ in (*task.named_parameters(), *task.named_buffers()) if n.startswith(frozen)]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, names)
    return nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)


def _cast_frozen(task: nn.Module, dtype: torch.dtype | None) -> None:
    """In a bf16 run, the frozen modules' weights in bf16 once, instead of autocast casting the
    fp32 weights again at every forward (it caches casts only of weights that require grad).
    Modules holding quantised or tensor-subclass weights are left as they are."""
    if dtype != torch.bfloat16:
        return
    for name in getattr(task, "frozen_modules", ()):
        module = getattr(task, name, None)
        if module is None:
            continue
        tensors = [*module.parameters(), *module.buffers()]
        plain = all(type(t) in (torch.Tensor, nn.Parameter) and t.dtype == torch.float32 for t in tensors)
        quantised = any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())
        if plain and not quantised:
            module.to(torch.bfloat16)


def start_run(task: nn.Module, batches: Batches, cfg: BaseConfig, run_dir: Path, device: torch.device,
              optimize: nn.Module | None = None, layer_decay: float | None = None) -> Run:
    """Build optimiser/scheduler/scaler, then resume from run_dir/checkpoint.pth if present.
    `train` drives it; `doctor` times `train_step` on it directly."""
    rank, world_size = distributed.world()
    plan = make_plan(cfg, len(batches), world_size)
    task.to(device)
    optimizer = build_optimizer(optimize if optimize is not None else task, cfg, layer_decay)
    dtype = autocast_dtype(cfg.amp, device)
    _cast_frozen(task, dtype)
    model = _wrap(task, device) if distributed.active() else task
    run = Run(task, model, optimizer, build_scheduler(optimizer, cfg, plan),
              torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), plan, cfg, device, dtype,
              run_dir / "checkpoint.pth", batches.prepare)
    sweep_temp_files(run_dir)
    state = _load_training_state(run_dir)
    if state is not None:
        _check_same_run(state.get("config", {}), cfg.to_dict(), run.ckpt_path)
        task.load_state_dict(state["task"], strict=not _frozen_keys(task))
        optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        run.step = state["step"]
        _restore_rng(state["rng"], rank, world_size, cfg.seed, run.step, run.ckpt_path)
    else:
        seed_everything(derive_seed(cfg.seed, "train", rank))
    run.attention_kernel = _attention_kernel(task, device, dtype, plan.micro_batch,
                                             state.get("attention_kernel") if state else None)
    return run


def _restore_rng(saved: Any, rank: int, world_size: int, seed: int, step: int, path: Path) -> None:
    """Each rank's RNG state as the checkpoint holds it. Resumed on another number of ranks,
    the data order and every host-side augmentation still continue exactly (they are seeded
    per sample); the ranks' own streams (drop path, masking, Mixup) start afresh, said."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == world_size:
        _set_rng_state(states[rank])
        return
    if rank == 0:
        warnings.warn(f"{path}: written by {len(states)} rank(s), resumed on {world_size}: the data order and the "
                      f"per-sample augmentation continue exactly; each rank's own random stream (drop path, "
                      f"masking, Mixup) restarts from a seed, so the run is not bit-identical to an uninterrupted one",
                      stacklevel=3)
    seed_everything(derive_seed(seed, "train", rank, "resumed", step))


def _attention_kernel(task: nn.Module, device: torch.device, dtype: torch.dtype | None, micro_batch: int,
                      recorded: str | None) -> str | None:
    """The attention kernel every ViT of the task runs: the one a resumed run recorded (the
    kernels differ in rounding, so an exact resume keeps it), else -- under autocast, where
    they differ by up to ~3x -- the one measured faster here (rank 0 decides for all); in
    fp32, where they were within a few per cent on every host measured, SDPA without a
    measurement, so two fresh fp32 runs of one config stay bit-identical."""
    from timm.models.vision_transformer import VisionTransformer

    vits = [m for m in task.modules() if isinstance(m, VisionTransformer)]
    if not vits:
        return None
    kernel = recorded
    if kernel is None:
        kernel = "sdpa"
        if dtype is not None:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                kernel = choose_attention_kernel(vits, device, dtype, micro_batch, margin=0.1)
        kernel = distributed.broadcast_object(kernel)
    for vit in vits:
        set_fused_attention(vit, kernel == "sdpa")
    return kernel


def _load_training_state(run_dir: Path) -> dict[str, Any] | None:
    """checkpoint.pth, or -- when it is unreadable (a torn copy, a full disk) --
    checkpoint-prev.pth, saying so; None for a new run."""
    latest, previous = run_dir / "checkpoint.pth", run_dir / "checkpoint-prev.pth"
    errors = []
    for path in (latest, previous):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises zip/unpickling errors of several types
            errors.append(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if errors:
            warnings.warn(f"{errors[0]} -- resuming from the previous checkpoint {path} instead", stacklevel=3)
        return state
    if errors:
        raise CheckpointError(f"{run_dir}: no readable training checkpoint ({'; '.join(errors)}); "
                              f"use a new run directory, or delete these files to start over")
    return None


def _save(run: Run) -> None:
    """Atomic checkpoint of everything an exact resume needs (every rank's RNG states)."""
    rngs = distributed.gather_objects(_rng_state())
    if distributed.world()[0] == 0:
        atomic_save({"task": _trainable_state(run.task), "optimizer": run.optimizer.state_dict(),
                     "scaler": run.scaler.state_dict(), "step": run.step, "rng": rngs,
                     "config": run.cfg.to_dict(), "plan": run.plan.__dict__,
                     "attention_kernel": run.attention_kernel}, run.ckpt_path,
                    previous=run.ckpt_path.with_name("checkpoint-prev.pth"))


def train_step(run: Run, step: Sequence[Any]) -> dict[str, torch.Tensor]:
    """One optimiser step on one effective batch -- this rank's micro-batches `step`, each made
    the task's inputs on the device by `run.prepare` (outside autocast): lr schedule,
    gradients accumulated (DDP syncs on the last), autocast, clipping. Returns the detached
    loss parts; no host sync happens here."""
    run.scheduler.step_update(run.step)
    parts_sum: dict[str, torch.Tensor] = {}
    for i, micro_batch in enumerate(step):
        inputs = run.prepare(micro_batch, run.device)
        sync = i == len(step) - 1
        ctx = run.model.no_sync() if run.model is not run.task and not sync else nullcontext()
        with ctx, torch.autocast(run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
            loss, parts = run.model(*inputs)
        run.scaler.scale(loss / len(step)).backward()
        for k, v in {"loss": loss, **parts}.items():
            parts_sum[k] = parts_sum.get(k, 0) + v.detach().float() / len(step)
    run.scaler.unscale_(run.optimizer)  # a no-op without fp16; the norm is of the true gradients
    params = [p for p in run.task.parameters() if p.grad is not None]
    if run.cfg.clip_grad:
        grad_norm = nn.utils.clip_grad_norm_(params, run.cfg.clip_grad)
    else:
        grad_norm = nn.utils.get_total_norm([p.grad for p in params])
    if run.scaler.is_enabled():  # fp16: an inf norm is a skipped step, not a divergence
        grad_norm = torch.where(torch.isfinite(grad_norm), grad_norm, torch.zeros_like(grad_norm))
    parts_sum["grad_norm"] = grad_norm.detach().float()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return parts_sum


def progress_line(step: int, total: int, loss: float | None) -> str:
    """What a stage launched as a child (torchrun, SLURM) reports on rank 0 instead of a tqdm
    bar when TINYMIM_PROGRESS=json: one JSON line per log step, read by `launch.Progress`."""
    return json.dumps({"tinymim": "progress", "step": step, "total": total, "loss": loss})


class _Logger:
    """Windowed means of the loss parts -> metrics.jsonl (+ TensorBoard) and the bar (or, for
    a launched child, JSON progress lines)."""

    def __init__(self, run: Run, run_dir: Path, progress: bool):
        rank, _ = distributed.world()
        self.run = run
        self.file = _open_log(run_dir, run.step) if rank == 0 else None
        self.writer = _tensorboard(run_dir) if rank == 0 else None
        self.json = rank == 0 and os.environ.get("TINYMIM_PROGRESS") == "json"
        self.bar = tqdm(total=run.plan.steps, initial=run.step, disable=not progress or rank != 0 or self.json,
                        desc=run_dir.name, leave=False, mininterval=2.0)  # readable in log files too
        if self.json:
            print(progress_line(run.step, run.plan.steps, None), flush=True)
        self.sums: dict[str, torch.Tensor] = {}
        self.bad = torch.zeros((), dtype=torch.bool, device=run.device)
        self.start, self.steps = time.perf_counter(), 0
        self.last: dict[str, Any] = {}

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.bad |= ~(torch.isfinite(parts["loss"]) & torch.isfinite(parts["grad_norm"]))
        self.steps += 1
        self.bar.update(1)

    def check_finite(self, run_dir: Path) -> None:
        """Before every log and checkpoint (one host sync, never per step): loss and gradient
        norm finite since the last check, and the weights finite now -- so a checkpoint is
        only ever written of a finite state."""
        run, step = self.run, self.run.step
        trained = [p for p in run.task.parameters() if p.requires_grad]
        weights_ok = bool(torch.stack([torch.isfinite(p).all() for p in trained]).all()) if trained else True
        if bool(self.bad) or not weights_ok:
            lower = run.cfg.lr / 2
            raise TrainingDiverged(
                f"{run_dir}: training diverged (NaN/inf loss, gradients or weights) between steps "
                f"{step - self.steps + 1} and {step}; its last checkpoint (written before, of finite weights) "
                f"is kept. Start again with a lower lr in a new run directory, e.g. --set lr={lower:.3g} "
                f"--out {run_dir}-lr{lower:.3g} (notebooks: overrides={{'lr': {lower:.3g}}}), or add "
                f"--set clip_grad=1.0; check the data if it happens at the same step again.")

    def write(self) -> None:
        run = self.run
        group = run.optimizer.param_groups[0]
        elapsed = time.perf_counter() - self.start
        last = {"step": run.step, "epoch": round(run.step / run.plan.steps_per_epoch, 4),
                "lr": group["lr"] / group.get("lr_scale", 1.0),
                **{k: float(v) / self.steps for k, v in self.sums.items()},
                "imgs_per_s": self.steps * run.cfg.batch_size / max(elapsed, 1e-9)}
        last = distributed.mean_across_ranks(last, run.device, keep=("step", "epoch", "lr", "imgs_per_s"))
        if self.file is not None:
            self.file.write(json.dumps(last) + "\n")
            self.file.flush()
        if self.writer is not None:
            for k, v in last.items():
                if k != "step":
                    self.writer.add_scalar(k, v, run.step)
        self.bar.set_postfix(loss=f"{last['loss']:.4f}")
        if self.json:
            print(progress_line(run.step, run.plan.steps, last["loss"]), flush=True)
        self.last, self.sums, self.start, self.steps = last, {}, time.perf_counter(), 0

    def close(self) -> None:
        self.bar.close()
        for f in (self.file, self.writer):
            if f is not None:
                f.close()


def train(
    task: nn.Module,
    batches: Batches,
    cfg: BaseConfig,
    run_dir: str | os.PathLike,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    stop_after: int | None = None,
    optimize: nn.Module | None = None,
    layer_decay: float | None = None,
) -> dict[str, Any]:
    """Train `task` for the configured steps, resuming from `run_dir/checkpoint.pth`.

    `optimize` is the module whose parameters the optimiser groups (default: the task);
    with `layer_decay` it must provide timm's `group_matcher` (a timm ViT, ViTUperNet).
    Returns the last logged metrics plus `done` (all configured steps taken).
    `stop_after` ends the run early after that many steps, leaving a checkpoint -- for
    tests and time-boxed runs; calling again resumes.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = start_run(task, batches, cfg, run_dir, distributed.setup(device), optimize, layer_decay)
    record = getattr(batches, "record", None)
    if record is not None and distributed.world()[0] == 0:
        atomic_write_json(record, run_dir / "data.json")  # which images: a subset is stated, never implied
    if run.step >= run.plan.steps:
        return _last_metrics(run_dir) | {"done": True}
    end = run.plan.steps if stop_after is None else min(run.plan.steps, run.step + stop_after)
    log = _Logger(run, run_dir, progress)
    task.train()
    epoch, offset = divmod(run.step, run.plan.steps_per_epoch)
    it = batches.epoch(epoch, offset, run.plan.micro_batch)
    try:
        while run.step < end:
            try:
                batch = next(it)
            except StopIteration:
                epoch += 1
                it = batches.epoch(epoch, 0, run.plan.micro_batch)
                continue
            log.add(train_step(run, batch))
            is_log = run.step % cfg.log_every == 0 or run.step == end
            is_ckpt = run.step % cfg.ckpt_every == 0 or run.step == end
            if is_log or is_ckpt:
                log.check_finite(run_dir)
            if is_log:
                log.write()
            if is_ckpt:
                _save(run)
    finally:
        log.close()
    distributed.broadcast_buffers(task, run.device, skip=_frozen_keys(task))  # every rank: the model rank 0 saves
    return log.last | {"done": run.step >= run.plan.steps}


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON lines, tolerant of a torn last line (a kill mid-write): it is dropped with a
    warning. A bad line elsewhere is corruption and an error naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropped a torn last line ({e})", stacklevel=3)
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from None
    return out


def _open_log(run_dir: Path, step: int):
    """Open metrics.jsonl for appending, after atomically dropping the lines logged past
    the resumed step (and a torn last line)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [r for r in _read_jsonl(path) if r.get("step", 0) <= step]
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    return open(path, "a")


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    records = _read_jsonl(run_dir / "metrics.jsonl")
    return records[-1] if records else {}


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All logged steps of a run, for plots."""
    return _read_jsonl(Path(run_dir) / "metrics.jsonl")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tb"))

