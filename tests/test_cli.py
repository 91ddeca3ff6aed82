"""Every subcommand, end to end at a tiny size: its exit status and what it writes."""

import json

import nbformat
import pytest
import torch

from tinymim.__main__ import COMMANDS, main
from tinymim.checkpoints import load_teacher, save_model
from tinymim.models import ModelSpec, build_model

TINY = ["--set", "steps=2", "--set", "warmup_steps=1", "--set", "batch_size=8", "--set", "data_limit=16",
        "--set", "log_every=1", "--set", "amp=none"]


def _json(out: str):
    return json.loads(out[out.index("{"):])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def teacher(workdir):
    torch.manual_seed(0)
    return save_model(build_model(ModelSpec.create("micro_base")), workdir / "teacher.pth")


@pytest.fixture(scope="module")
def classifier(workdir):
    torch.manual_seed(0)
    return save_model(build_model(ModelSpec.create("micro_tiny", num_classes=10)), workdir / "cls.pth")


def test_every_command_is_tested():
    missing = [c for c in COMMANDS if not any(g.startswith("test_" + c.replace("-", "_")) for g in globals())]
    assert not missing


def test_config(capsys):
    assert main(["config", "finetune", "--model", "vit_base", "--profile", "paper", "--set", "lr=1e-3"]) == 0
    cfg = _json(capsys.readouterr().out)
    assert cfg["lr"] == 1e-3 and cfg["model"] == "vit_base" and cfg["stage"] == "finetune"
    assert main(["config", "finetune", "--set", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["config", "finetune", "--model", "vit_huge"]) == 2
    assert "vit_huge" in capsys.readouterr().err


def test_run(tmp_path, capsys):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "smoke"\nrun_dir = None\nvalue = 1')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from tinymim.reports import record_metrics\nrecord_metrics(run_dir, 'one', {'value': value})")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "01_one.ipynb")
    assert main(["run", "--notebooks", str(tmp_path / "nbs"), "--out", str(tmp_path / "r"), "--param", "value=7"]) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["one"]["value"] == 7
    assert "run directory" in capsys.readouterr().out


def test_mae(tmp_path, capsys):
    args = ["mae", "--model", "micro_tiny", "--out", str(tmp_path), *TINY, "--set", "decoder_dim=32",
            "--set", "decoder_depth=1", "--set", "decoder_heads=2"]
    assert main(args) == 0
    assert _json(capsys.readouterr().out)["path"] == str(tmp_path / "teacher.pth")
    assert len(load_teacher(None, tmp_path / "teacher.pth").blocks) == 4


def test_pretrain(tmp_path, teacher, capsys):
    assert main(["pretrain", "--out", str(tmp_path), *TINY, "--set", f"teacher_path={teacher}"]) == 0
    assert str(tmp_path / "student.pth") in capsys.readouterr().out
    assert load_teacher(None, tmp_path / "student.pth").blocks[-1].attn.num_heads == 6


def test_finetune(tmp_path, capsys):
    assert main(["finetune", "--out", str(tmp_path), *TINY]) == 0
    metrics = _json(capsys.readouterr().out)["metrics"]
    assert metrics["steps"] == 2 and metrics == json.loads((tmp_path / "eval.json").read_text())


def test_evaluate(classifier, capsys):
    assert main(["evaluate", str(classifier), "--data", "synthetic", "--input-size", "32", "--num-classes", "10"]) == 0
    res = _json(capsys.readouterr().out)
    assert res["n"] == 2000 and set(res) == {"top1", "top5", "n"}


def test_segmentation(tmp_path, capsys):
    assert main(["segmentation", "--out", str(tmp_path), *TINY]) == 0
    result = _json(capsys.readouterr().out)
    assert result["stage"] == "segmentation" and "per_class_IoU" not in result["metrics"]
    assert result["metrics"]["mIoU"] == pytest.approx(json.loads((tmp_path / "eval.json").read_text())["mIoU"])


def test_segment_is_segmentation(tmp_path, capsys):
    """The old name of the command stays (docs and tests use `segmentation`)."""
    assert main(["segment", "--out", str(tmp_path), *TINY]) == 0
    assert _json(capsys.readouterr().out)["stage"] == "segmentation"


def test_robustness(classifier, capsys):
    args = ["robustness", str(classifier), "--profile", "smoke", "--set", "corruptions=gaussian_noise,fog",
            "--set", "severities=1,2", "--set", "num_images=20"]
    assert main(args) == 0
    res = _json(capsys.readouterr().out)["synthetic_c"]
    assert set(res["errors"]) == {"gaussian_noise", "fog"}
    assert res["mean_error"] == pytest.approx(100 * sum(res["errors"][c][s] for c in res["errors"]
                                                        for s in res["errors"][c]) / 4)


def test_bench(capsys):
    assert main(["bench", "eval", "--student", "micro_tiny", "--batch", "8", "--steps", "1", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["bench"] == "eval" and record["images_per_s"] > 0 and record["gflops_per_image"] > 0
    assert main(["bench", "finetune", "--student", "micro_tiny", "--batch", "4", "--steps", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["bench"] == "finetune"
    assert main(["bench", "data", "--images", "8", "--device", "cpu"]) == 0
    assert set(json.loads(capsys.readouterr().out)["pipelines"]) == {"pretrain", "finetune"}


def test_study(tmp_path, capsys, monkeypatch):
    """The study command runs notebook 08 through the runner into --out with its parameters (nbmake
    executes notebook 08 itself, and tests/test_study.py the study); a bad row fails first."""
    from tinymim import runner

    calls = []
    monkeypatch.setattr(runner, "run", lambda *a, **k: calls.append((a, k)) or runner.RunResult(tmp_path / "study"))
    out = tmp_path / "study"
    assert main(["study", "--budget", "tiny", "--seeds", "2", "--only", "a", "--out", str(out)]) == 0
    assert str(out / "REPORT.md") in capsys.readouterr().out
    ((args, kwargs),) = calls
    assert args == ("smoke", str(out), ["08"])
    assert {k: kwargs["parameters"][k] for k in ("seeds", "only", "budget", "cluster")} == {
        "seeds": [0, 1], "only": ["a"], "budget": "tiny", "cluster": None}
    assert main(["study", "--only", "a,z", "--out", str(tmp_path / "bad")]) == 1
    assert "unknown row(s) ['z']" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_report(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps({"01_models": {"teacher_probe_top1": 22.0,
                                                                     "random_init_probe_top1": 15.0}}))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "REPORT.md" in capsys.readouterr().out
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert "22.0 % against 15.0 %" in md and "| MAE ViT-B |" in md


DOCTOR_TRAIN_KEYS = {"stage", "model", "teacher", "input_size", "device", "precision", "micro_batch", "images_per_s",
                     "peak_mem_gib", "paper_batch", "devices", "micro_batch_size", "accum_steps", "paper_images",
                     "est_hours_paper_schedule"}


def test_doctor(capsys):
    assert main(["doctor", "--profile", "smoke", "--steps", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    checks = [r["check"] for r in lines]
    assert checks[0] == "environment" and checks[-1] == "done"
    assert {"torch", "timm", "cuda", "nccl", "gpus", "cpu_native_bf16", "device"} <= set(lines[0])
    train = [r for r in lines if r["check"] == "train"]
    assert [r["stage"] for r in train] == ["mae", "pretrain", "finetune", "segmentation"]
    for r in train:
        assert DOCTOR_TRAIN_KEYS <= set(r) and r["images_per_s"] > 0
        # the paper's effective batch = micro-batch x accumulation on this host's devices
        assert r["micro_batch_size"] * r["accum_steps"] * r["devices"] == r["paper_batch"]
        assert r["est_hours_paper_schedule"] == pytest.approx(
            r["paper_images"] / (r["images_per_s"] * r["devices"]) / 3600, rel=0.02, abs=0.01)
    assert {r["pipeline"] for r in lines if r["check"] == "data"} == {"pretrain", "finetune"}
    assert all(r["images_per_s"] > 0 for r in lines if r["check"] in ("evaluate", "data"))


def test_doctor_at_paper_sizes(capsys):
    """The paper models themselves (ViT-B at 224 px here), one step each: the path runs on a CPU."""
    assert main(["doctor", "--only", "finetune,evaluate", "--steps", "1", "--batch", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    train = {r["model"]: r for r in lines if r["check"] == "train"}
    assert set(train) == {"vit_tiny", "vit_small", "vit_base"} and train["vit_base"]["input_size"] == 224
    assert train["vit_base"]["paper_batch"] == 1024 and train["vit_base"]["accum_steps"] == 512  # micro-batch 2
    assert train["vit_base"]["paper_images"] == 100 * 1_281_167  # Table 2: 100 epochs for ViT-B


@pytest.mark.parametrize("command", ["mae", "pretrain", "finetune", "segmentation", "evaluate", "robustness", "doctor"])
def test_every_command_that_computes_takes_a_device_and_names_a_missing_one(command, tmp_path, capsys):
    positional = {"evaluate": ["x.pth", "--data", "synthetic"], "robustness": ["x.pth"]}.get(command, [])
    out = ["--out", str(tmp_path)] if command in ("mae", "pretrain", "finetune", "segmentation") else []
    code = main([command, *positional, *out, "--device", "cuda:7"])
    err = capsys.readouterr().err  # named before any work (no checkpoint read, no teacher trained)
    assert code == 1 and "cuda:7" in err and ("no CUDA GPU" in err or "GPU(s)" in err), err


def test_errors_print_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.pth"), "--data", "synthetic"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pth" in err and "Traceback" not in err


def test_check_data_lists_every_unreadable_image(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    (tmp_path / "n01").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "n01" / f"{i}.JPEG")
    assert main(["check-data", str(tmp_path)]) == 0
    assert "3 images checked, 0 unreadable" in capsys.readouterr().out
    (tmp_path / "n01" / "bad.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "n01" / "empty.png").write_bytes(b"")
    assert main(["check-data", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "bad.JPEG" in out.out and "empty.png" in out.out and "2 of 5 images" in out.err


def test_submit_refuses_a_bad_job_shape_before_anything_is_submitted(tmp_path, capsys):
    """The SLURM paths themselves run against a real SLURM in tests/test_cluster.py."""
    assert main(["submit", "finetune", "--out", str(tmp_path), "--time", "90min", *TINY]) == 1
    assert "cluster.time: expected [D-]H:MM" in capsys.readouterr().err
    assert main(["submit", "finetune", "--out", str(tmp_path), "--nodes", "0", *TINY]) == 1
    assert "cluster.nodes: expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "slurm").exists()
