"""Which device a run uses, and what this host offers.

One rule for every stage, CLI command and notebook: `device="auto"` means the GPU when
there is one (under torchrun: this process's GPU, `LOCAL_RANK`), else the CPU; an
explicit device (`cuda`, `cuda:1`, `cpu`) wins. Mixed precision follows the device
(`autocast_dtype`). The data-loader defaults live here too, because they
depend on the same question: is there a GPU to feed?
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


class DeviceError(ValueError):
    """A device that does not exist here, named with what does."""


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16). Without it, bf16
    autocast is emulated and much slower than fp32, with it faster (the figures:
    docs/environment.md)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def native_bf16_gpu(index: int | None = None) -> bool:
    """Whether GPU `index` (None: the current one) has bf16 tensor cores: compute capability
    8.0 or newer (Ampere on). `torch.cuda.is_bf16_supported()` also counts emulation by
    default, which makes a V100 or T4 train slowly in bf16 instead of fp16 + GradScaler."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto': bf16 on GPUs that have it natively (`native_bf16_gpu`), fp16 + GradScaler on
    older GPUs; on a CPU bf16 only where it is native (`native_bf16_cpu`), else fp32."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16_gpu(device.index) else torch.float16
    return torch.bfloat16 if native_bf16_cpu() else None


def pinned_gpus(device: str | torch.device | None) -> list[int] | None:
    """The GPU indices `cuda:N` or `cuda:N,M,...` names (a list pins the GPUs of a multi-process
    launch); None for auto, cpu or `cuda`."""
    name = str(device or "auto").strip().lower()
    if not name.startswith("cuda:"):
        return None
    try:
        return [int(i) for i in name[5:].split(",")]
    except ValueError:
        raise DeviceError(f"device: expected cuda:N or cuda:N,M,..., got {device!r}") from None


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto`/None: `cuda:<LOCAL_RANK>` when CUDA is available, else `cpu`; `cuda` without
    an index: the same per-process GPU; anything else as given, checked to exist."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if "," in name:
        raise DeviceError(f"device {device!r} names several GPUs, which is for launching one process per GPU "
                          f"(launch.train_stage, tinymim run --nproc); one process takes one device")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DeviceError(f"device: {device!r} is not supported; expected auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = local if dev.index is None else dev.index
    if index >= count:
        have = f"{count} GPU(s): cuda:0..cuda:{count - 1}" if count else "no CUDA GPU"
        raise DeviceError(f"device: {device!r} was asked for, but this host has {have}; use device=auto or cpu")
    return torch.device("cuda", index)


def gpu_count(device: str | torch.device | None = "auto") -> int:
    """How many GPUs a run on `device` can spread over: all visible ones for `auto`/`cuda`,
    the pinned ones for `cuda:N[,M...]` (checked to exist), none for the CPU."""
    name = str(device or "auto").lower()
    if name == "cpu" or not torch.cuda.is_available():
        return 0
    pinned = pinned_gpus(name)
    if pinned is None:
        return torch.cuda.device_count()
    for index in pinned:
        resolve_device(f"cuda:{index}")  # an error naming what the host has
    return len(pinned)


def default_workers(local_world_size: int | None = None) -> int:
    """Data-loader processes per training process: the CPUs this process may use, shared
    by the processes on this node, one left for the main process, at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(16, cpus // local - 1))


PREFETCH = 2  # batches in flight per data worker


def loader_options(num_workers: int | None, persistent: bool = True) -> dict[str, Any]:
    """DataLoader keywords that keep an accelerator fed: workers (None: `default_workers`),
    pinned host memory when there is a GPU to copy to, two (micro-)batches prefetched per
    worker, and (for training, `persistent`) workers that live across epochs. In flight:
    workers x 2 micro-batches of uint8 (`doctor` prints the bytes)."""
    workers = default_workers() if num_workers is None else num_workers
    opts: dict[str, Any] = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    if workers > 0:
        opts |= {"persistent_workers": persistent, "prefetch_factor": PREFETCH}
    return opts


def environment(free_memory: bool = False) -> dict[str, Any]:
    """What a report or `tinymim doctor` states about this host: versions, devices, bf16 per
    GPU. `free_memory` also asks each GPU how much memory is free -- which creates a CUDA
    context (~0.5 GB) on every GPU, so only the doctor, which is about to use them, asks; the
    long-lived `tinymim run` process must not hold memory on the GPUs its children train on."""
    import timm

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cpu_native_bf16": native_bf16_cpu(), "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpu = {"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                   "memory_gib": round(props.total_memory / 2**30, 1), "bf16": native_bf16_gpu(i)}
            if free_memory:
                gpu["free_gib"] = round(torch.cuda.mem_get_info(i)[0] / 2**30, 1)
            env["gpus"].append(gpu)
    return env


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a timer around GPU work measures nothing without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (so a figure covers the timed steps only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float | None:
    """GiB the allocator held at most since `reset_peak_memory`; None on a CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


_OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def is_oom(error: BaseException) -> bool:
    """Whether `error` means the device ran out of memory: the allocator's OutOfMemoryError, or
    the RuntimeError cuBLAS / cuDNN raise when their own workspace allocation fails."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MARKERS))
