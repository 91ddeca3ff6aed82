"""Training stages from a notebook on one device or many.

`train_stage` is what notebooks (and the pipeline layer) call: on a CPU or one GPU it runs
the stage in this process; with several GPUs visible (or `nproc` set) it runs the stage's
CLI under `torchrun --standalone --nproc_per_node N` as a subprocess, streams its progress
into the caller's output, waits, and returns what the in-process call returns, read back
from the run directory. A rank that fails stops the call with that rank's error line.
Multi-node training stays on the CLI (README: "Several nodes"); a notebook pointed at a
run directory such a run filled reads its finished result instead of training again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .checkpoints import atomic_write_json, load_classifier, open_checkpoint, read_checkpoint
from .config import BaseConfig
from .devices import DeviceError, gpu_count, pinned_gpus

# stage -> the CLI command that trains it (all torchrun-ready) and the file it finishes with
STAGES: dict[str, tuple[str, str]] = {
    "mae": ("mae", "teacher.pth"),
    "pretrain": ("pretrain", "student.pth"),
    "finetune": ("finetune", "model.pth"),
    "segmentation": ("segment", "model.pth"),
}
_ERROR = re.compile(r"^error \(rank (?P<rank>\d+)\): (?P<message>.*)")  # what `tinymim` prints under torchrun
_BAR = re.compile(r"(?P<n>\d+)/(?P<total>\d+) \[(?P<info>[^\]]*)\]")  # tqdm's "6/800 [00:01<00:09, 5.1it/s, loss=..]"


class LaunchFailed(RuntimeError):
    """A torchrun-launched stage failed; the message names the rank and its error."""


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


def _finished_config(stage: str, run_dir: Path) -> dict[str, Any] | None:
    """The config the stage's final file in `run_dir` was trained with, if it is there."""
    path = run_dir / STAGES[stage][1]
    if not path.exists():
        return None
    return read_checkpoint(path).get("config") if stage == "segmentation" else open_checkpoint(path).meta.get("config")


def _result(stage: str, run_dir: Path) -> Any:
    """What the in-process stage function returns, read back from its run directory."""
    final = run_dir / STAGES[stage][1]
    if stage in ("mae", "pretrain"):
        return final
    metrics = json.loads((run_dir / "eval.json").read_text())
    if stage == "finetune":
        return load_classifier(final, num_classes=None), metrics
    from .segmentation import load_segmenter

    return load_segmenter(final)[0], metrics


def _in_process(stage: str, cfg: BaseConfig, run_dir: Path, device: str | None, progress: bool) -> Any:
    if stage == "mae":
        from .mae import pretrain_mae

        return pretrain_mae(cfg, run_dir, progress=progress, device=device)
    if stage == "pretrain":
        from .pretrain import pretrain

        return pretrain(cfg, run_dir, progress=progress, device=device)
    if stage == "finetune":
        from .finetune import train_classifier

        return train_classifier(cfg, run_dir, progress=progress, device=device)
    from .segmentation import train_segmentation

    return train_segmentation(cfg, run_dir, progress=progress, device=device)


def _forward(segment: str, bar: Any, log: Callable[[str], None]) -> None:
    """One piece of child output: a rank-0 tqdm update moves the caller's bar, the rest
    is logged as it comes."""
    match = _BAR.search(segment)
    if match is None:
        log(segment)
        return
    bar.total, bar.n = int(match["total"]), int(match["n"])
    bar.set_postfix_str(", ".join(match["info"].split(", ")[2:]), refresh=False)  # after elapsed<left, rate
    bar.refresh()
    rest = segment[match.end():].strip()  # another stream's line that landed behind the bar
    if rest:
        log(rest)


def torchrun(args: list[str], nproc: int, log: Callable[[str], None] = print, progress: bool = True,
             env: dict[str, str] | None = None) -> None:
    """`torchrun --standalone --nproc_per_node N -m tinymim ARGS` with its output streamed
    as it comes: rank 0's training bar drives a tqdm bar here (a widget in a notebook),
    other lines go to `log`. Raises LaunchFailed naming the first failing rank and its
    `error (rank N):` line (`tinymim`'s one-line errors). Interrupting the caller (a
    notebook's stop button) stops the ranks; the run resumes from its checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "tinymim", *args]
    child_env = os.environ | {"PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "1"} | (env or {})
    errors: dict[int, str] = {}
    tail: list[str] = []
    bar = tqdm(total=0, desc=f"{args[0]} x{nproc}", disable=not progress)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env) as proc:
        assert proc.stdout is not None
        buffer = b""
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                *pieces, buffer = re.split(rb"[\r\n]", buffer + chunk)
                for raw in pieces:
                    segment = raw.decode(errors="replace").rstrip()
                    if not segment.strip():
                        continue
                    if match := _ERROR.match(segment):
                        errors.setdefault(int(match["rank"]), match["message"])
                    tail = (tail + [segment])[-20:]
                    if not errors or match:  # after a rank's error, torchrun's own traceback adds nothing
                        _forward(segment, bar, log)
        except KeyboardInterrupt:
            proc.terminate()  # torchrun passes SIGTERM on to the ranks
            raise
        proc.wait()
    bar.close()
    if proc.returncode:
        if errors:
            rank = min(errors)
            raise LaunchFailed(f"tinymim {args[0]} under torchrun: rank {rank} failed: {errors[rank]}")
        raise LaunchFailed(f"tinymim {args[0]} under torchrun exited with code {proc.returncode}; "
                           f"last output:\n" + "\n".join(tail))


def train_stage(stage: str, cfg: BaseConfig, run_dir: str | os.PathLike, device: str | None = "auto",
                nproc: int | None = None, progress: bool = True, log: Callable[[str], None] = print) -> Any:
    """Train `stage` ('mae', 'pretrain', 'finetune', 'segmentation') per `cfg` into `run_dir`
    with the result of the stage function: a checkpoint path (mae, pretrain) or
    (model, metrics) (finetune, segmentation).

    One process (CPU, one GPU, `nproc=1`): in process. Several: torchrun, as above. A run
    directory already finished with this config (e.g. by a multi-node CLI run) is read, not
    trained again; one holding another config is refused by the stage, as in process.
    """
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {sorted(STAGES)}, got {stage!r}")
    run_dir = Path(run_dir)
    n = processes(device, nproc)
    if n == 1:
        return _in_process(stage, cfg, run_dir, device, progress)
    if _finished_config(stage, run_dir) == cfg.to_dict():
        log(f"{run_dir}: {stage} already finished with this config; reading it")
        return _result(stage, run_dir)
    env, child_device = child_devices(device, n)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = atomic_write_json(cfg.to_dict(), run_dir / "launch_config.json")
    torchrun([STAGES[stage][0], "--config", str(config_file), "--out", str(run_dir), "--device", child_device],
             n, log=log, progress=progress, env=env)
    return _result(stage, run_dir)
