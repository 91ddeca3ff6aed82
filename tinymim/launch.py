"""Training stages from a notebook on one device, many, or a SLURM cluster: one interface, one result.

`train_stage` is what notebooks, the pipeline layer and the study call. On a CPU or one GPU
it runs the stage in this process; with several GPUs visible (or `nproc` set) it runs the
stage's CLI command under `torchrun --standalone --nproc_per_node N` as a subprocess; with
`cluster` it submits the stage as a SLURM job (`cluster.py`, submitit). Rank 0 of a launched
stage reports its progress as JSON lines (`engine.progress_line`) that drive a tqdm bar here;
the call waits and returns the same `StageResult`, read back from the run directory. A rank
(or task) that fails stops the call with its error line; interrupting the call stops the ranks
or cancels the job. A run directory already finished with the same config (by a multi-node
CLI run, say) is read, not trained again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import cluster as slurm
from . import stages
from .checkpoints import atomic_write_json
from .config import BaseConfig
from .devices import DeviceError, gpu_count, pinned_gpus
from .stages import StageResult

_ERROR = re.compile(r"^error \(rank (?P<rank>\d+)\): (?P<message>.*)")  # what `tinymim` prints under torchrun


class LaunchFailed(RuntimeError):
    """A launched stage failed; the message names the rank (or task) and its error."""


def processes(device: str | None = "auto", nproc: int | None = None) -> int:
    """How many training processes a stage gets: `nproc` when given, else one per GPU a
    run on `device` may use (`devices.gpu_count`), at least one."""
    if nproc is not None:
        if nproc < 1:
            raise ValueError(f"nproc: expected a positive number of processes, got {nproc}")
        return nproc
    return max(1, gpu_count(device))


def child_devices(device: str | None, nproc: int) -> tuple[dict[str, str], str]:
    """(environment, --device) for the ranks of a launch on `device`. NCCL needs one GPU per
    rank, so pinned GPUs (`cuda:1,2`) become the ranks' CUDA_VISIBLE_DEVICES (each rank then
    takes its LOCAL_RANK's), one per process; a single pinned GPU for several processes is an
    error naming why."""
    pinned = pinned_gpus(device)
    if pinned is None:
        return {}, device or "auto"
    if len(pinned) != nproc:
        raise DeviceError(f"device {device!r} pins {len(pinned)} GPU(s) for {nproc} processes: NCCL needs one GPU "
                          f"per process; pin as many as processes (e.g. device='cuda:0,1' for nproc=2), or use "
                          f"device='cuda' for all visible GPUs")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [visible.split(",")[i] for i in pinned] if visible else [str(i) for i in pinned]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}, "cuda"


class Progress:
    """Rank 0's JSON progress lines (`engine.PROGRESS`) as a tqdm bar (a widget in a notebook);
    every other line goes to `log` as it comes."""

    def __init__(self, desc: str, log: Callable[[str], None], enabled: bool = True):
        self.bar = tqdm(total=0, desc=desc, disable=not enabled)
        self.log = log

    def feed(self, line: str) -> None:
        record = _progress(line)
        if record is None:
            self.log(line)
            return
        self.bar.total, self.bar.n = record["total"], record["step"]
        self.bar.set_postfix(loss=f"{record['loss']:.4f}" if record.get("loss") is not None else "", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _progress(line: str) -> dict[str, Any] | None:
    if not line.startswith('{"tinymim": "progress"'):
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def torchrun(args: list[str], nproc: int, log: Callable[[str], None] = print, progress: bool = True,
             env: dict[str, str] | None = None) -> None:
    """`torchrun --standalone --nproc_per_node N -m tinymim ARGS` with its output streamed
    as it comes. Raises LaunchFailed naming the first failing rank and its `error (rank N):`
    line (`tinymim`'s one-line errors). Interrupting the caller (a notebook's stop button)
    stops the ranks; the run resumes from its checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "tinymim", *args]
    child_env = os.environ | {"PYTHONUNBUFFERED": "1", "TINYMIM_PROGRESS": "json"} | (env or {})
    errors: dict[int, str] = {}
    tail: list[str] = []
    bar = Progress(f"{args[0]} x{nproc}", log, progress)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env, text=True,
                          errors="replace") as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip()
                if not line.strip():
                    continue
                if match := _ERROR.match(line):
                    errors.setdefault(int(match["rank"]), match["message"])
                tail = (tail + [line])[-20:]
                if not errors or match:  # after a rank's error, torchrun's own traceback adds nothing
                    bar.feed(line)
        except KeyboardInterrupt:
            proc.terminate()  # torchrun passes SIGTERM on to the ranks
            raise
    bar.close()
    if proc.returncode:
        if errors:
            rank = min(errors)
            raise LaunchFailed(f"tinymim {args[0]} under torchrun: rank {rank} failed: {errors[rank]}")
        raise LaunchFailed(f"tinymim {args[0]} under torchrun exited with code {proc.returncode}; "
                           f"last output:\n" + "\n".join(tail))


def _new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines appended to `path` since `offset` (a log that shrank -- a requeued job's
    -- is read from its start again)."""
    if not path.exists():
        return [], offset
    size = path.stat().st_size
    offset = 0 if size < offset else offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return data[:end].decode(errors="replace").splitlines(), offset + end


def follow(job: Any, stage: str, run_dir: str | os.PathLike, log: Callable[[str], None] = print,
           progress: bool = True, poll_s: float = 1.0, state_every_s: float = 10.0) -> StageResult:
    """Wait for a submitted stage's job, rank 0's progress from its log driving a tqdm bar; its
    `StageResult`, or LaunchFailed with the failing task's error line. Interrupting the call
    cancels the job (a later call resubmits, and the stage resumes from its checkpoint)."""
    run_dir, log_path, offset = Path(run_dir), slurm.rank0_log(job), 0
    bar = Progress(f"{stage} on SLURM job {job.job_id}", log, progress)
    last_state = time.monotonic()
    try:
        while True:
            force = time.monotonic() - last_state > state_every_s  # scheduler queries are rationed
            last_state = time.monotonic() if force else last_state
            done = job.done(force_check=force)
            lines, offset = _new_lines(log_path, offset)
            for line in lines:
                if line.strip():
                    bar.feed(line)
            if done:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        job.cancel(check=False)
        log(f"cancelled SLURM job {job.job_id}; the stage resumes from {run_dir} when launched again")
        raise
    finally:
        bar.close()
    return _job_result(job, stage, run_dir)


def _job_result(job: Any, stage: str, run_dir: Path) -> StageResult:
    error = slurm.task_error(run_dir)
    if error:
        raise LaunchFailed(f"tinymim {stage} on SLURM job {job.job_id}: task {error['task']} failed: "
                           f"{error['message']}")
    try:
        job.results()
    except Exception as e:  # cancelled, killed, node failure: submitit's own account
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise LaunchFailed(f"tinymim {stage} on SLURM job {job.job_id} ended {job.state}: "
                           f"{lines[-1] if lines else type(e).__name__}") from None
    return stages.get(stage).result(run_dir)


def train_stage(stage: str, cfg: BaseConfig, run_dir: str | os.PathLike, device: str | None = "auto",
                nproc: int | None = None, progress: bool = True, log: Callable[[str], None] = print,
                cluster: slurm.Cluster | dict[str, Any] | None = None) -> StageResult:
    """Train `stage` (a name of `stages`: mae, pretrain, finetune, segmentation) per `cfg` into
    `run_dir`; returns its `StageResult` (the final file, the metrics; `.model()` loads it).

    A run directory already finished with this config is read, not trained again; one holding
    another config is refused by the stage. Otherwise, with `cluster` (a `cluster.Cluster` or
    its dict, e.g. {"nodes": 4, "gpus_per_node": 8, "partition": "gpu"}): one SLURM job, followed
    until it ends; else one process (CPU, one GPU, `nproc=1`): in process; several: torchrun.
    """
    spec = stages.get(stage)
    run_dir = Path(run_dir)
    if spec.finished_config(run_dir) == cfg.to_dict():
        log(f"{run_dir}: {spec.name} already finished with this config; reading it")
        return spec.result(run_dir)
    if cluster is not None:
        cluster = cluster if isinstance(cluster, slurm.Cluster) else slurm.Cluster.from_dict(cluster)
        job = slurm.submit(spec.name, cfg, run_dir, cluster, device or "auto")
        log(f"{spec.name}: SLURM job {job.job_id} ({cluster.nodes} node(s) x {cluster.tasks()} task(s)); "
            f"log {slurm.rank0_log(job)}")
        return follow(job, spec.name, run_dir, log, progress)
    n = processes(device, nproc)
    if n == 1:
        return spec.run(cfg, run_dir, device=device, progress=progress)
    env, child_device = child_devices(device, n)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = atomic_write_json(cfg.to_dict(), run_dir / "launch_config.json")
    torchrun([spec.name, "--config", str(config_file), "--out", str(run_dir), "--device", child_device],
             n, log=log, progress=progress, env=env)
    return spec.result(run_dir)
