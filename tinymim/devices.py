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
    autocast is emulated and measured ~17x slower than fp32 (an AVX2 EPYC here), with it
    ~4x faster (AMX)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto': bf16 on GPUs that have it, fp16 on older GPUs; on a CPU bf16 only where it
    is native (`native_bf16_cpu`), else fp32."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if native_bf16_cpu() else None


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto`/None: `cuda:<LOCAL_RANK>` when CUDA is available, else `cpu`; `cuda` without
    an index: the same per-process GPU; anything else as given, checked to exist."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
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
    one for a pinned `cuda:N`, none for the CPU."""
    name = str(device or "auto").lower()
    if name == "cpu" or not torch.cuda.is_available():
        return 0
    return 1 if ":" in name else torch.cuda.device_count()


def default_workers(local_world_size: int | None = None) -> int:
    """Data-loader processes per training process: the CPUs this process may use, shared
    by the processes on this node, one left for the main process, at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(16, cpus // local - 1))


def loader_options(num_workers: int | None, persistent: bool = True) -> dict[str, Any]:
    """DataLoader keywords that keep an accelerator fed: workers (None: `default_workers`),
    pinned host memory when there is a GPU to copy to, four batches prefetched per worker,
    and (for training, `persistent`) workers that live across epochs."""
    workers = default_workers() if num_workers is None else num_workers
    opts: dict[str, Any] = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    if workers > 0:
        opts |= {"persistent_workers": persistent, "prefetch_factor": 4}
    return opts


def environment() -> dict[str, Any]:
    """What a report or `tinymim doctor` states about this host: versions, devices, bf16."""
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
            free, total = torch.cuda.mem_get_info(i)
            env["gpus"].append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                "memory_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1),
                                "bf16": torch.cuda.is_bf16_supported()})
    return env
