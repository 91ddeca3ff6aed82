"""Stages on SLURM through submitit, against a real SLURM on localhost (conftest's `slurm`):
the commands of docs/clusters.md with one node and CPU tasks (gloo). Each test submits into a
folder of its own (job ids restart with the cluster, and submitit reads results by id)."""

import _thread
import functools
import json
import os
import subprocess
import sys
import threading
import time

import nbformat
import pytest
from nbclient import NotebookClient
from runs import micro_teacher, same_weights

from tinymim import cluster as slurm_jobs
from tinymim import launch, stages
from tinymim.presets import get_config

pytestmark = pytest.mark.slow  # real jobs: each task is a Python process that imports torch

# one thread per task, as torchrun sets for its ranks: the same arithmetic, so the same weights
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# enough steps that a signal sent after the first checkpoint arrives mid-run
TINY = {"steps": 30, "warmup_steps": 1, "batch_size": 16, "data_limit": 64, "log_every": 1, "ckpt_every": 5,
        "amp": "none", "drop_path": 0.0}



def _sets(teacher) -> list[str]:
    return [f"--set={k}={v}" for k, v in (TINY | {"teacher_path": teacher}).items()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def teacher(work):
    return micro_teacher(work / "teacher.pth")


@pytest.fixture(scope="module")
def torchrun_student(work, teacher):
    """What docs/clusters.md's first way gives: `torchrun --nproc_per_node 2 -m tinymim pretrain ...`."""
    out = work / "torchrun"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tinymim", "pretrain", "--out", str(out), "--device", "cpu", *_sets(teacher)],
                   check=True, capture_output=True, text=True)
    return out / "student.pth"


def test_submit_gives_the_torchrun_student(slurm, work, teacher, torchrun_student):
    out = work / "submit"
    done = subprocess.run([sys.executable, "-m", "tinymim", "submit", "pretrain", "--nodes", "1",
                           "--tasks-per-node", "2", "--time", "0:10", "--out", str(out), "--device", "cpu",
                           "--wait", *_sets(teacher)], capture_output=True, text=True, timeout=300,
                          env=os.environ | ONE_THREAD)
    assert done.returncode == 0, done.stderr[-2000:]
    head, *_, last = done.stdout.strip().splitlines()
    assert head.startswith("submitted pretrain as SLURM job") and "1 node(s) x 2 task(s)" in head
    assert "scancel" in done.stdout and "1_0_log.out" not in last
    assert json.loads(last)["path"] == str(out / "student.pth")
    assert same_weights(torchrun_student, out / "student.pth")
    (attempt,) = slurm_jobs.attempts(out)
    assert attempt["world_size"] == 2 and attempt["restart"] == 0


def test_a_notebook_cell_with_a_cluster_returns_the_in_process_result(slurm, work):
    cfg = get_config("finetune", "micro_tiny", "smoke", TINY | {"steps": 3, "ckpt_every": 2, "data_limit": 32})
    local = stages.get("finetune").run(cfg, work / "ft-local", device="cpu", progress=False)
    out = work / "ft-slurm"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from tinymim import launch\nfrom tinymim.presets import get_config\n"
        f"cfg = get_config('finetune', 'micro_tiny', 'smoke', {TINY | {'steps': 3, 'ckpt_every': 2, 'data_limit': 32}!r})\n"
        f"result = launch.train_stage('finetune', cfg, {str(out)!r}, device='cpu', "
        "cluster={'nodes': 1, 'tasks_per_node': 1, 'time': '0:10'})\n"
        "print('top1', result.metrics['top1'])")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
    assert f"top1 {local.metrics['top1']}" in text and "SLURM job" in text
    assert same_weights(local.path, out / "model.pth")


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5, seen=lambda: "") -> None:
    """Poll until `predicate` holds; on timeout the message adds `seen()`, what the job did."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s{seen()}")
        time.sleep(poll)


def _state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-a", "--states=all", "-j", job_id, "-o", "%T"],
                          capture_output=True, text=True).stdout.strip()


def _logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_requeued_job_finishes_with_the_uninterrupted_weights(slurm, work, teacher, torchrun_student, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # sbatch passes the submitter's environment on
    cfg = get_config("pretrain", "micro_tiny", "smoke", TINY | {"teacher_path": str(teacher)})
    out = work / "requeue"
    job = slurm_jobs.submit("pretrain", cfg, out, slurm_jobs.Cluster(tasks_per_node=2, time="0:10"), "cpu")
    _wait_for(lambda: _logged_steps(out) >= 6, 180, "6 steps logged", poll=0.1)  # the step-5 checkpoint is written
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)  # what SLURM sends before preemption
    result = launch.follow(job, "pretrain", out, progress=False)
    assert [a["restart"] for a in slurm_jobs.attempts(out)] == [0, 1], "the signal came after the run ended"
    assert result.metrics["step"] == TINY["steps"]
    assert same_weights(torchrun_student, out / "student.pth")


def _job_seen(job, out) -> str:
    """The job's state, its attempts and the end of its last log, for a failed wait."""
    log = slurm_jobs.rank0_log(job)
    tail = log.read_text()[-1500:] if log.exists() else "(no log)"
    return (f"; job {job.job_id} {_state(job.job_id)}, {_logged_steps(out)} step(s) logged, "
            f"attempts {slurm_jobs.attempts(out)}; log:\n{tail}")


def test_a_job_at_its_time_limit_is_requeued_and_resumes(slurm, work, teacher):
    """SLURM's own warning before a two-minute limit (not a signal we send): the job is requeued
    and its next attempt continues from the checkpoint (a run longer than any attempt, cancelled
    once the second attempt has trained, so the test does not depend on this machine's speed).
    SLURM may send the warning up to 60 s early (sbatch(1), --signal): a 15 s warning before a
    2-minute limit leaves every attempt at least 45 s, where a 35 s one before 1 minute could
    come as an attempt starts, every time, on a slow machine."""
    cfg = get_config("pretrain", "micro_tiny", "smoke", TINY | {"teacher_path": str(teacher), "steps": 100000,
                                                               "ckpt_every": 25, "log_every": 25})
    out = work / "time-limit"
    job = slurm_jobs.submit("pretrain", cfg, out, slurm_jobs.Cluster(time="0:02", signal_delay_s=15), "cpu")
    seen = functools.partial(_job_seen, job, out)
    try:
        _wait_for(lambda: _logged_steps(out) >= 1, 180, "a checkpoint", seen=seen)  # step 25: logged and checkpointed
        trained_in = len(slurm_jobs.attempts(out))  # SLURM's warning may come before an attempt trains
        _wait_for(lambda: len(slurm_jobs.attempts(out)) > trained_in, 240, "a requeue at the time limit", seen=seen)
        before = _logged_steps(out)
        _wait_for(lambda: _logged_steps(out) >= before + 2, 120, "the next attempt training", seen=seen)
    finally:
        job.cancel(check=False)
    _wait_for(lambda: _state(job.job_id) == "CANCELLED", 30, "the job cancelled", seen=seen)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 25  # each attempt resumed, none restarted from 0
    assert [a["restart"] for a in slurm_jobs.attempts(out)] == list(range(len(slurm_jobs.attempts(out))))


def test_a_failing_task_stops_the_caller_with_its_error(slurm, work):
    # num_classes given: the folder is then first read inside the task (left out, the config resolves it here)
    cfg = get_config("finetune", "micro_tiny", "smoke", TINY | {"data": str(work / "no-such-data"), "num_classes": 10})
    with pytest.raises(launch.LaunchFailed, match=r"on SLURM job \d+: task \d failed: .*no-such-data"):
        launch.train_stage("finetune", cfg, work / "fails", device="cpu", progress=False,
                           cluster={"tasks_per_node": 2, "time": "0:10"})


def test_interrupting_the_call_cancels_the_job(slurm, work, teacher):
    cfg = get_config("pretrain", "micro_tiny", "smoke", TINY | {"teacher_path": str(teacher), "steps": 200})
    out = work / "cancel"
    job = slurm_jobs.submit("pretrain", cfg, out, slurm_jobs.Cluster(time="0:10"), "cpu")
    threading.Timer(3.0, _thread.interrupt_main).start()  # the notebook's stop button
    with pytest.raises(KeyboardInterrupt):
        launch.follow(job, "pretrain", out, progress=False)
    _wait_for(lambda: _state(job.job_id) == "CANCELLED", 30, "the job cancelled")
    assert not (out / "student.pth").exists()


def test_cluster_specs_are_checked_before_submitting(slurm):
    with pytest.raises(slurm_jobs.ClusterError, match="cluster.time: expected"):
        slurm_jobs.Cluster.from_dict({"time": "90 minutes"})
    with pytest.raises(slurm_jobs.ClusterError, match=r"unknown field\(s\) \['gpus'\]"):
        slurm_jobs.Cluster.from_dict({"gpus": 8})
    assert slurm_jobs.Cluster(gpus_per_node=8).tasks() == 8 and slurm_jobs.Cluster().tasks() == 1
    assert slurm_jobs.Cluster(time="1-02:30").minutes() == 26 * 60 + 30
    assert os.environ["SLURM_CONF"] == str(slurm.root / "slurm.conf")


def _notebook(path, code: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "smoke"\nrun_dir = None\ndevice = "cpu"\nnproc = None\ncluster = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_a_detached_run_chains_its_notebooks_and_a_later_run_reads_them(slurm, work):
    """`tinymim run --cluster slurm --detach` on two notebooks, each one training stage: an MAE
    teacher, then a student distilled from it -- the second job starts after the first ends."""
    notebooks, out = work / "detach-notebooks", work / "detach-run"
    notebooks.mkdir()
    common = ("from pathlib import Path\nfrom tinymim import launch, reports\nfrom tinymim.presets import get_config\n"
              f"tiny = {TINY | {'steps': 3, 'ckpt_every': 2}!r}\n")
    _notebook(notebooks / "01_teacher.ipynb", common +
              "cfg = get_config('mae', profile=profile, overrides=tiny | {'batch_size': 8})\n"
              "r = launch.train_stage('mae', cfg, Path(run_dir) / 'teacher', device, nproc, cluster=cluster)\n"
              "reports.record_metrics(run_dir, '01_teacher', {'loss': r.metrics['loss']})")
    _notebook(notebooks / "02_student.ipynb", common +
              "teacher = Path(run_dir) / 'teacher' / 'teacher.pth'\n"
              "cfg = get_config('pretrain', profile=profile, overrides=tiny | {'teacher_path': str(teacher)})\n"
              "r = launch.train_stage('pretrain', cfg, Path(run_dir) / 'student', device, nproc, cluster=cluster)\n"
              "reports.record_metrics(run_dir, '02_student', {'loss': r.metrics['loss']})")
    cmd = [sys.executable, "-m", "tinymim", "run", "--profile", "smoke", "--out", str(out), "--notebooks",
           str(notebooks), "--device", "cpu"]
    done = subprocess.run(cmd + ["--cluster", "slurm", "--tasks-per-node", "1", "--time", "0:10", "--detach"],
                          capture_output=True, text=True, timeout=120, check=True)
    jobs = json.loads(done.stdout.strip().splitlines()[-1])["jobs"]
    assert list(jobs) == ["01_teacher", "02_student"]
    waiting = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    assert "[wait] 01_teacher.ipynb: SLURM job" in waiting.stdout  # a login-node run does not race the jobs

    _wait_for(lambda: _state(jobs["02_student"]) in ("COMPLETED", "FAILED", "CANCELLED"), 240, "the chain finished")
    assert _state(jobs["01_teacher"]) == _state(jobs["02_student"]) == "COMPLETED"
    (teacher_attempt,), (student_attempt,) = slurm_jobs.attempts(out / "teacher"), slurm_jobs.attempts(out / "student")
    assert teacher_attempt["started"] <= student_attempt["started"]
    assert (out / "student" / "student.pth").exists()
    later = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    assert later.stdout.count("[skip]") == 2 and "[run ]" not in later.stdout  # read, not run again


def test_a_detached_study_is_a_teacher_job_and_a_job_array_a_later_study_reads(slurm, work):
    from tinymim import pipeline, study

    out = work / "study"
    teacher_cache = pipeline.smoke_teacher_run(study.BUDGETS["tiny"].teacher_overrides("synthetic"))[1]
    cached = (teacher_cache / "teacher.pth").exists()  # earlier tests
    done = subprocess.run([sys.executable, "-m", "tinymim", "study", "--budget", "tiny", "--seeds", "1", "--only", "a",
                           "--out", str(out), "--device", "cpu", "--cluster", "slurm", "--time", "0:10", "--detach"],
                          capture_output=True, text=True, timeout=120, check=True)
    jobs = json.loads(done.stdout.strip().splitlines()[-1])
    assert (jobs["teacher_job"] is None) == cached  # the teacher's job only when no finished one is cached
    assert all("_" in j for j in jobs["runs"].values())  # array tasks: <array id>_<index>

    def finished() -> bool:
        return all((out / "runs" / name / "result.json").exists() for name in jobs["runs"])
    _wait_for(finished, 240, "every array task's result")
    recorded = {name: json.loads((out / "runs" / name / "result.json").read_text()) for name in jobs["runs"]}
    results = study.run_study(out, [0], ["a"], "tiny", device="cpu", progress=False, log=lambda line: None)
    assert {f"{r['arm']}-s{r['seed']}": r["top1"] for r in results} == {n: r["top1"] for n, r in recorded.items()}
