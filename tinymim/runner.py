"""Run the notebooks in order with papermill, into one run directory.

`<run_dir>/notebooks/` receives the executed copies, `<run_dir>/metrics.json` what
they measured, `<run_dir>/runner.json` which notebooks completed with which
parameters -- so a re-run skips those and resumes at the first one not done. The
first failure stops the run with the notebook's name and the failing cell.
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
from .pipeline import REPO_ROOT, resolve_run_dir

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


def _params_key(params: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
) -> RunResult:
    """Execute the notebooks in order into `out` (default: default_run_dir(profile));
    without `only`, the standalone study notebook is left out."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    run_dir = resolve_run_dir(out, profile)
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
    return result
