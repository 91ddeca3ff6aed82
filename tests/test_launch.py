"""Several processes from a notebook cell (torchrun underneath), and several nodes from the
CLI -- on this CPU with gloo: the same student as the one-node CLI run, bit for bit."""

import json
import os
import socket
import subprocess
import sys

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from runs import micro_teacher, same_weights

from tinymim import launch
from tinymim.presets import get_config

TINY = {"steps": 4, "warmup_steps": 1, "batch_size": 16, "data_limit": 64, "log_every": 1, "ckpt_every": 2,
        "amp": "none", "drop_path": 0.0}
pytestmark = pytest.mark.slow  # each launch starts 2-3 Python processes that import torch


def _sets(teacher) -> list[str]:
    return [f"--set={k}={v}" for k, v in (TINY | {"teacher_path": teacher}).items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def teacher(work):
    return micro_teacher(work / "teacher.pth")


def _result_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"stage"')]


@pytest.fixture(scope="module")
def cli_run(work, teacher) -> subprocess.CompletedProcess:
    """README, one node: `torchrun --standalone --nproc_per_node 2 -m tinymim pretrain ...`."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tinymim", "pretrain", "--out", str(work / "cli"), "--device", "cpu",
                           *_sets(teacher)], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def cli_student(work, cli_run):
    return work / "cli" / "student.pth"


def test_the_cli_under_torchrun_prints_one_result_line(work, cli_run):
    """Every rank returns the result; only rank 0 says it (a script reading the line reads one)."""
    assert [r["path"] for r in _result_lines(cli_run.stdout)] == [str(work / "cli" / "student.pth")]


def test_a_notebook_cell_launches_torchrun_and_gets_the_cli_student(work, teacher, cli_student):
    overrides = TINY | {"teacher_path": str(teacher)}
    cfg = get_config("pretrain", "micro_tiny", "smoke", overrides)
    out = work / "notebook"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from tinymim import launch\nfrom tinymim.presets import get_config\n"
        f"cfg = get_config('pretrain', 'micro_tiny', 'smoke', {overrides!r})\n"
        f"result = launch.train_stage('pretrain', cfg, {str(out)!r}, device='cpu', nproc=2)\n"
        "print('student at', result.path)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    widgets = [o for o in outputs if o.output_type == "display_data"]
    assert f"student at {out / 'student.pth'}" in text
    assert '"stage": "pretrain"' in text  # the ranks' own output, streamed into the cell
    assert '{"tinymim": "progress"' not in text  # rank 0's progress drove the bar, it was not printed
    assert widgets or "pretrain x2" in text  # the progress bar: a widget in a kernel (text without ipywidgets)
    assert same_weights(cli_student, out / "student.pth")
    # a second call reads the finished run instead of launching again
    assert launch.train_stage("pretrain", cfg, out, device="cpu", nproc=2, log=lambda line: None).path == out / "student.pth"


def test_two_nodes_on_localhost_give_the_one_node_student(work, teacher, cli_student):
    """README, several nodes: the same command on each node, only --node_rank differs."""
    port, out = _free_port(), work / "nodes"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "tinymim", "pretrain",
                               "--out", str(out), "--device", "cpu", *_sets(teacher)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=os.environ | {"OMP_NUM_THREADS": "1"})  # as torchrun sets for 2 per node
             for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert [len(_result_lines(log)) for log in logs] == [1, 0], logs  # the node of rank 0 says the result
    assert same_weights(cli_student, out / "student.pth")
    one = [json.loads(line)["loss"] for line in (cli_student.parent / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert one == two


def test_a_failing_rank_stops_the_call_with_its_error(work, teacher):
    cfg = get_config("pretrain", "micro_tiny", "smoke", TINY | {"teacher_path": str(teacher), "teacher": "micro_small"})
    lines: list[str] = []
    with pytest.raises(launch.LaunchFailed, match=r"rank 0 failed: .*teacher\.pth holds a micro_base") as e:
        launch.train_stage("pretrain", cfg, work / "fails", device="cpu", nproc=2, progress=False, log=lines.append)
    assert "Traceback" not in str(e.value)
    assert any(line.startswith("error (rank 1)") for line in lines)  # every rank's error reached the caller


def test_fine_tuning_under_torchrun_returns_what_the_in_process_call_returns(work):
    cfg = get_config("finetune", "micro_tiny", "smoke", TINY | {"steps": 2})
    result = launch.train_stage("finetune", cfg, work / "ft", device="cpu", nproc=2, progress=False,
                                log=lambda line: None)
    model, metrics = result.model(), result.metrics
    assert isinstance(model, torch.nn.Module) and metrics == json.loads((work / "ft" / "eval.json").read_text())
    assert metrics["steps"] == 2 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
