"""Run the notebooks in order with papermill, into one run directory -- here, or detached on SLURM.

`<run_dir>/notebooks/` receives the executed copies, `<run_dir>/metrics.json` what
they measured, `<run_dir>/runner.json` which notebooks completed with which
parameters -- so a re-run skips those and resumes at the first one not done. The
first failure stops the run with the notebook's name and the failing cell.

`submit_detached` hands the whole run to SLURM and returns at once: one small driver job per
notebook, chained with afterok, each executing its notebook with the `cluster` parameter, so
every training stage inside becomes a SLURM job of the given shape, as from a live kernel. A
later `run` on the same directory skips what completed, reports the jobs still queued or
running instead of racing them, and renders the report of what has finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import atomic_write
from .config import REPO_ROOT
from .pipeline import resolve_run_dir

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
# run only when named (`--only 08`, `tinymim study`): the study is its own hour, not part of a pipeline run
STANDALONE = ("08_ablations",)


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook and the cell."""


def list_notebooks(notebooks_dir: str | os.PathLike = NOTEBOOKS_DIR, only: Sequence[str] | None = None) -> list[Path]:
    """`NN_name.ipynb` files in order; `only` keeps those whose number or stem is listed."""
    nbs = sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not nbs:
        raise FileNotFoundError(f"{notebooks_dir}: no notebooks named NN_*.ipynb")
    if only:
        wanted = {o.strip() for o in only if o.strip()}
        picked = [nb for nb in nbs if nb.stem[:2] in wanted or nb.stem in wanted]
        unknown = wanted - {nb.stem[:2] for nb in picked} - {nb.stem for nb in picked}
        if unknown:
            raise ValueError(f"--only: no notebook {sorted(unknown)} in {notebooks_dir} "
                             f"(have {[nb.stem for nb in nbs]})")
        nbs = picked
    return nbs


@dataclass
class RunResult:
    run_dir: Path
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)  # held by SLURM jobs of a detached run
    jobs: dict[str, str] = field(default_factory=dict)  # notebook -> SLURM job id (submit_detached)


# parameters that say where a notebook runs, not what it computes: a run finished on SLURM is
# the same run when read back from a login node without them
PLACEMENT = ("device", "nproc", "cluster")


def _params_key(params: dict[str, Any]) -> str:
    what = {k: v for k, v in params.items() if k not in PLACEMENT}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _read_state(path: Path) -> dict[str, Any]:
    """runner.json; a torn or garbled one (a kill mid-write of an older version) only
    costs re-running the notebooks, which resume from their own checkpoints."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        warnings.warn(f"{path}: unreadable ({e}); every notebook is run again (each resumes its own work)",
                      stacklevel=3)
        return {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(state, indent=2).encode()))


def _git_state() -> dict[str, Any]:
    """The commit this kit ran from, and whether it had uncommitted changes."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None}


def run(
    profile: str = "smoke",
    out: str | os.PathLike | None = None,
    only: Sequence[str] | None = None,
    notebooks_dir: str | os.PathLike = NOTEBOOKS_DIR,
    parameters: dict[str, Any] | None = None,
    kernel_name: str | None = None,
    log=print,
    in_job: bool = False,
) -> RunResult:
    """Execute the notebooks in order into `out` (default: default_run_dir(profile));
    without `only`, the standalone study notebook is left out. A notebook a detached run
    submitted and SLURM still holds stops the run there (`in_job`: this is that job)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    run_dir = resolve_run_dir(out, profile, (parameters or {}).get("data"))
    state_path = run_dir / "runner.json"
    state = _read_state(state_path)
    params = {"profile": profile, "run_dir": str(run_dir), **(parameters or {})}
    key = _params_key(params)
    result = RunResult(run_dir)
    (run_dir / "notebooks").mkdir(exist_ok=True)
    from .devices import environment

    state["environment"] = {**environment(), **_git_state()}  # what the report states about this run
    _write_state(state_path, state)
    notebooks = [nb for nb in list_notebooks(notebooks_dir, only) if only or nb.stem not in STANDALONE]
    for nb in notebooks:
        done = state.get(nb.stem, {})
        if done.get("status") == "completed" and done.get("params") == key:
            log(f"[skip] {nb.name}: already completed in {run_dir}")
            result.skipped.append(nb.stem)
            continue
        if done.get("status") == "submitted" and done.get("params") == key and not in_job:
            queued = _job_state(done["job_id"], run_dir)
            if queued:
                log(f"[wait] {nb.name}: SLURM job {done['job_id']} is {queued}; run again when it has finished")
                result.waiting.append(nb.stem)
                break
        log(f"[run ] {nb.name} ...")
        start = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(run_dir / "notebooks" / nb.name), parameters=params,
                                kernel_name=kernel_name, progress_bar=False, cwd=str(nb.parent))
        except PapermillExecutionError as e:
            state[nb.stem] = {"status": "failed", "params": key, "cell": e.cell_index, "error": e.ename}
            _write_state(state_path, state)
            raise NotebookFailed(
                f"{nb.name} failed in cell {e.cell_index} (execution count {e.exec_count}): {e.ename}: {e.evalue}. "
                f"Executed copy: {run_dir / 'notebooks' / nb.name}") from None
        seconds = time.perf_counter() - start
        state[nb.stem] = {"status": "completed", "params": key, "seconds": round(seconds, 1),
                          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_state(state_path, state)
        result.executed.append(nb.stem)
        result.seconds[nb.stem] = seconds
        log(f"[done] {nb.name} in {seconds:.0f} s")
    if result.waiting and (run_dir / "metrics.json").exists():
        from .reports import render_report

        render_report([run_dir])  # what has finished so far
        log(f"report of what has finished: {run_dir / 'REPORT.md'}")
    return result


ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")


def _job_state(job_id: str, run_dir: Path) -> str | None:
    """The state of a driver job while SLURM still holds it, else None."""
    import submitit

    state = submitit.SlurmJob(folder=run_dir / "slurm", job_id=job_id).state
    return state if state.split(" ")[0] in ACTIVE else None


class NotebookJob:
    """A detached run's driver job: one notebook, executed by `run` on a compute node."""

    def __init__(self, profile: str, out: str, notebook: str, notebooks_dir: str, parameters: dict[str, Any]):
        self.args = (profile, out, notebook, notebooks_dir, parameters)

    def __call__(self) -> list[str]:
        profile, out, notebook, notebooks_dir, parameters = self.args
        return run(profile, out, [notebook], notebooks_dir, parameters, in_job=True).executed


def submit_detached(profile: str, out: str | os.PathLike | None, only: Sequence[str] | None,
                    cluster: dict[str, Any], notebooks_dir: str | os.PathLike = NOTEBOOKS_DIR,
                    parameters: dict[str, Any] | None = None, log=print) -> RunResult:
    """Submit the run's notebooks not yet completed as driver jobs chained with afterok (each
    its notebook's `cluster` stage jobs), record them in runner.json, and return at once."""
    from .cluster import Cluster

    spec = Cluster.from_dict(cluster)
    driver = Cluster(partition=spec.partition, account=spec.account, qos=spec.qos, time=spec.time,
                     signal_delay_s=spec.signal_delay_s)  # one task: the stages' jobs have the GPUs
    run_dir = resolve_run_dir(out, profile, (parameters or {}).get("data"))
    state_path = run_dir / "runner.json"
    state = _read_state(state_path)
    params = {"profile": profile, "run_dir": str(run_dir), **(parameters or {}), "cluster": spec.to_dict()}
    key = _params_key(params)
    result = RunResult(run_dir)
    after: list[str] = []
    for nb in [nb for nb in list_notebooks(notebooks_dir, only) if only or nb.stem not in STANDALONE]:
        if state.get(nb.stem, {}).get("status") == "completed" and state[nb.stem].get("params") == key:
            result.skipped.append(nb.stem)
            continue
        job = driver.executor(run_dir / "slurm", f"tinymim-{nb.stem}", after).submit(
            NotebookJob(profile, str(run_dir), nb.stem, str(notebooks_dir), params))
        state[nb.stem] = {"status": "submitted", "params": key, "job_id": job.job_id, "after": list(after),
                          "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_state(state_path, state)
        result.jobs[nb.stem] = job.job_id
        log(f"[sbatch] {nb.name}: SLURM job {job.job_id}" + (f" (after {', '.join(after)})" if after else ""))
        after = [job.job_id]
    return result
