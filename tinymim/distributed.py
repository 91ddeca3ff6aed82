"""The process group and every collective the kit runs -- written once, on the run's device.

gloo (CPU) accepts tensors on any device; NCCL (GPUs) only CUDA tensors, and fails on a CPU
tensor with "No backend type associated with device type cpu". Every reduction therefore
takes the run's device and builds its tensor there; nothing else in the kit calls
`torch.distributed` collectives (tests/test_distributed.py checks both).

Rules the stages follow (docs/gpu-hosts.md): rank 0 writes a run's files, then
every rank passes `barrier` before anyone reads them; evaluation is sharded (`shard`) and
its counts summed (`all_reduce_sum`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .devices import resolve_device


def active() -> bool:
    """Whether this process is in a process group (launched by torchrun, or SLURM): then the
    trained module is DDP-wrapped and every collective runs -- at world size 1 too, so a
    one-GPU `torchrun --nproc_per_node 1` exercises NCCL and DDP for real."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(device: str | torch.device | None = "auto") -> torch.device:
    """This process's device (`devices.resolve_device`), made current, and the process group
    joined when launched by torchrun or SLURM (RANK and WORLD_SIZE set): NCCL bound to that
    GPU on CUDA (`device_id`, so collectives never guess a GPU), gloo on CPU, also across nodes."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before the group: NCCL's communicator lives on this GPU
        torch.backends.cudnn.benchmark = True  # fixed shapes per stage: let cuDNN pick its kernels once
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (heads, losses)
        torch.backends.cudnn.allow_tf32 = True
    if {"RANK", "WORLD_SIZE"} <= set(os.environ) and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return dev


def teardown() -> None:
    """Leave the process group (at the end of a CLI command under torchrun), so NCCL does
    not warn about -- or hang on -- a group destroyed by interpreter exit."""
    if active():
        dist.destroy_process_group()


def barrier(device: torch.device) -> None:
    """Wait for every rank: after rank 0 wrote a file the others are about to read."""
    if active():
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()


def all_reduce_sum(values: torch.Tensor | Sequence[float], device: torch.device) -> torch.Tensor:
    """The sum over ranks of `values`, computed on `device` (float64 for floats, int64 for
    counts, so a reduced confusion matrix or a correct-count is exact). Returned on `device`;
    without a process group, `values` as such a tensor."""
    t = torch.as_tensor(values)
    t = t.to(device=device, dtype=torch.float64 if t.is_floating_point() else torch.int64)
    if active():
        dist.all_reduce(t)
    return t


def mean_across_ranks(metrics: dict[str, float], device: torch.device, keep: Sequence[str] = ()) -> dict[str, float]:
    """Per-key mean over ranks of scalar metrics (one collective); `keep` keys are left as
    this rank has them (the step, the lr, a rate already counted for every rank)."""
    if not active():
        return dict(metrics)
    rank_count = world()[1]
    keys = [k for k in metrics if k not in keep]
    total = all_reduce_sum([float(metrics[k]) for k in keys], device).cpu().tolist()
    return dict(metrics) | {k: v / rank_count for k, v in zip(keys, total)}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank (a decision one rank measured)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (e.g. RNG states for a checkpoint)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, device: torch.device, skip: Sequence[str] = ()) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank: DDP broadcasts them at
    the start of each forward, so after the last one each rank holds its own -- and a sharded
    evaluation would score each shard with another model than the one rank 0 saves."""
    if not active():
        return
    for name, buf in module.named_buffers():
        if not name.startswith(tuple(skip)):
            t = buf.to(device)
            dist.broadcast(t, src=0)
            buf.copy_(t)


def shard(n: int) -> range:
    """This rank's share of `n` evaluation items: every world-size-th from its rank. Unlike
    `DistributedSampler`, nothing is padded or repeated, so the summed counts over ranks are
    exactly the single-process ones."""
    rank, rank_count = world()
    return range(rank, n, rank_count)
