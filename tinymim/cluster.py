"""SLURM through submitit: a training stage as one job, one task per GPU, requeued on preemption.

MAE ships the same idea as `submitit_pretrain.py`; here it is one class for every registered stage.
Each task takes its rank, world size, local rank and rendezvous from SLURM (submitit's
`TorchDistributedEnvironment`), joins the process group and runs the stage exactly as a torchrun
rank does (`Stage.run` after `distributed.setup`). On SLURM's warning signal (preemption or the time
limit) submitit calls `StageJob.checkpoint`, which requeues the same job: it resumes from the run
directory's last checkpoint like any restarted run -- exactly, since the data order and every
sample's augmentation are functions of (seed, epoch, index), not of the process that draws them.
Every attempt is recorded in `<run_dir>/slurm/attempts.jsonl`; a task that fails writes its error
line to `<run_dir>/slurm/error-task<N>.json`, which the caller reports (`launch`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import submitit
import torch

from . import distributed, stages
from .checkpoints import atomic_write_json
from .stages import StageResult

_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<h>\d+):(?P<m>[0-5]\d)$")


class ClusterError(ValueError):
    """A cluster spec that cannot be submitted; the message names the field."""


@dataclass(frozen=True)
class Cluster:
    """Where and how big a SLURM job is. `tasks_per_node` defaults to `gpus_per_node` (one task
    per GPU), or 1 on a CPU partition; `time` is SLURM's [D-]H:MM."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    time: str = "4:00"
    signal_delay_s: int = 120  # the warning before the kill: time to finish a step and requeue
    max_requeues: int = 10  # time-limit requeues before the job gives up (preemptions are not counted)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Cluster:
        """A spec from a notebook parameter or the CLI; unknown keys and bad values are named."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known - {"kind"})
        if unknown:
            raise ClusterError(f"cluster: unknown field(s) {unknown}; expected some of {sorted(known)}")
        if spec.get("kind", "slurm") != "slurm":
            raise ClusterError(f"cluster.kind: expected 'slurm', got {spec['kind']!r}")
        cluster = cls(**{k: v for k, v in spec.items() if k != "kind"})
        cluster.check()
        return cluster

    def check(self) -> None:
        for name in ("nodes", "signal_delay_s"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ClusterError(f"cluster.{name}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ("gpus_per_node", "max_requeues"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ClusterError(f"cluster.{name}: expected an integer >= 0, got {getattr(self, name)!r}")
        for name in ("tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ClusterError(f"cluster.{name}: expected a positive integer, got {value!r}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ClusterError(f"cluster.tasks_per_node={self.tasks_per_node} with gpus_per_node={self.gpus_per_node}:"
                               " the stages run one task per GPU")
        self.minutes()

    def tasks(self) -> int:
        """Tasks (training processes) per node."""
        return self.tasks_per_node or self.gpus_per_node or 1

    def minutes(self) -> int:
        match = _TIME.match(str(self.time))
        if not match:
            raise ClusterError(f"cluster.time: expected [D-]H:MM (e.g. 72:00), got {self.time!r}")
        return (int(match["d"] or 0) * 24 + int(match["h"])) * 60 + int(match["m"])

    def executor(self, folder: Path, name: str, after: list[str] | None = None,
                 array: int | None = None) -> submitit.SlurmExecutor:
        """A submitit executor for this spec; `after` = job ids this job waits for (afterok)."""
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=self.max_requeues)
        params: dict[str, Any] = {
            "job_name": name, "nodes": self.nodes, "ntasks_per_node": self.tasks(), "time": self.minutes(),
            "signal_delay_s": self.signal_delay_s, "stderr_to_stdout": True,
            "partition": self.partition, "account": self.account, "qos": self.qos, "constraint": self.constraint,
            "mem": self.mem, "cpus_per_task": self.cpus_per_task, "gpus_per_node": self.gpus_per_node or None,
            "dependency": f"afterok:{':'.join(after)}" if after else None,
            "array_parallelism": array,
        }
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "slurm", **asdict(self)}


def job_folder(run_dir: Path) -> Path:
    """Where a stage's SLURM logs, submission pickles and attempt records live."""
    return Path(run_dir) / "slurm"


class StageJob(submitit.helpers.Checkpointable):
    """One registered stage on every task of a SLURM job. Checkpointable: requeued as it is, it
    resumes from the run directory."""

    def __init__(self, stage: str, config: dict[str, Any], run_dir: str, device: str = "auto"):
        self.stage, self.config, self.run_dir, self.device = stage, config, run_dir, device

    def __call__(self) -> StageResult:
        from .presets import config_from_dict

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ["TINYMIM_PROGRESS"] = "json"  # rank 0's progress as lines the caller reads from the log
        if "OMP_NUM_THREADS" not in os.environ and "SLURM_CPUS_PER_TASK" in os.environ:
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))  # the task's CPUs, not the node's
        folder = job_folder(Path(self.run_dir))
        restart, job_id = int(os.environ.get("SLURM_RESTART_COUNT", 0)), submitit.JobEnvironment().job_id
        if env.rank == 0:
            _append(folder / "attempts.jsonl", {
                "job_id": job_id, "restart": restart,
                "world_size": env.world_size, "nodes": int(os.environ.get("SLURM_JOB_NUM_NODES", 1)),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            device = distributed.setup(self.device)
            return stages.get(self.stage).run(config_from_dict(self.config), self.run_dir, device=device)
        except Exception as e:
            atomic_write_json({"task": env.rank, "job_id": job_id, "restart": restart, "time": time.time(),
                               "error": type(e).__name__, "message": " ".join(str(e).split())},
                              folder / f"error-task{env.rank}.json")
            raise
        finally:
            distributed.teardown()


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def attempts(run_dir: Path) -> list[dict[str, Any]]:
    """Every start of the stage's job in `run_dir` (the first, then one per requeue)."""
    path = job_folder(run_dir) / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def task_error(run_dir: Path) -> dict[str, Any] | None:
    """The first error a task of the job's last attempt wrote (the others' are usually the
    collective that lost it); errors of an attempt that was requeued do not count."""
    started = attempts(run_dir)
    last = (started[-1]["job_id"], started[-1]["restart"]) if started else None
    errors = [json.loads(p.read_text()) for p in job_folder(run_dir).glob("error-task*.json")]
    errors = [e for e in errors if last is None or (e["job_id"], e["restart"]) == last]
    return min(errors, key=lambda e: e["time"]) if errors else None


def submit(stage: str, cfg: Any, run_dir: str | os.PathLike, cluster: Cluster, device: str = "auto",
           after: list[str] | None = None) -> submitit.Job:
    """Submit `stage` per `cfg` into `run_dir` as one job; returns at once. Old task errors of
    `run_dir` are cleared, so a resubmission reports only its own."""
    run_dir = Path(run_dir)
    folder = job_folder(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("error-task*.json"):
        old.unlink()
    spec = stages.get(stage)
    job = cluster.executor(folder, f"tinymim-{spec.name}", after).submit(
        StageJob(spec.name, cfg.to_dict(), str(run_dir), device))
    _append(folder / "jobs.jsonl", {"job_id": job.job_id, "stage": spec.name, "after": after or [],
                                    "cluster": cluster.to_dict(), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return job


def rank0_log(job: submitit.Job) -> Path:
    """Task 0's log (stdout and stderr), where its progress lines go."""
    return submitit.core.utils.JobPaths(job.paths.folder, job_id=job.job_id, task_id=0).stdout
