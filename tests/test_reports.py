"""Report tables from hand-made metrics: exact rows, paper and run numbers never mixed,
hyper-parameter differences found and explained, seeds averaged, HTML self-contained."""

import json

import pytest

from tinymim import reports
from tinymim.__main__ import main
from tinymim.presets import get_config
from tinymim.stats import mean_std


def _metrics(seed: int = 0, distilled: float = 30.0, scratch: float = 24.0, **overrides) -> dict:
    ft = get_config("finetune", profile="smoke", overrides={"seed": seed, **overrides}).to_dict()
    return {
        "01_models": {"teacher_probe_top1": 22.0, "random_init_probe_top1": 15.5},
        "02_distill_pretrain": {"student": "micro_tiny", "teacher": "micro_base", "teacher_block": 6, "steps": 600,
                                "loss_first": 0.8, "loss_last": 0.02, "imgs_per_s": 700.0,
                                "config": get_config("pretrain", profile="smoke").to_dict()},
        "03_finetune": {"model": "micro_tiny", "seeds": [seed], "labelled_images": 2000, "config": ft,
                        "summary": {arm: mean_std([v]).to_dict() for arm, v in
                                    (("distilled", distilled), ("scratch", scratch), ("margin", distilled - scratch))}},
    }


def _write(run_dir, metrics) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_results_rows_with_missing_stages_say_why():
    rows = reports.run_results(_metrics())
    assert [r["model"] for r in rows] == ["distilled micro_tiny (TinyMIM)", "scratch micro_tiny"]
    assert rows[0]["source"] == "smoke · synthetic · micro_tiny"
    assert rows[0]["top1"] == mean_std([30.0]) and rows[1]["top1"] == mean_std([24.0])  # one seed: no std
    assert rows[0]["mIoU"] == "04 not run" and rows[0]["imagenet_a"] == "05 not run"
    table = reports.results_table(rows)
    assert table[-2] == ("| **distilled micro_tiny (TinyMIM)** | smoke · synthetic · micro_tiny | 30.0 | — (04 not run) | "
                         "— (05 not run) | — (05 not run) | — (05 not run) | — (05 not run) |")


def test_robustness_on_synthetic_data_fills_mean_error_not_mce():
    m = _metrics()
    m["04_segmentation"] = {"model": "micro_tiny", "mIoU": 19.8, "majority_class_mIoU": 6.9}
    m["05_robustness"] = {"summary": [{"model": "distilled", "synthetic_c mean_error": 76.6},
                                      {"model": "scratch", "synthetic_c mean_error": 82.9}]}
    rows = reports.run_results(m)
    assert rows[0]["mIoU"] == mean_std([19.8]) and rows[0]["c_mean_error"] == mean_std([76.6])
    assert "no AlexNet reference" in rows[0]["imagenet_c_mCE"]
    assert rows[0]["imagenet_a"] == "ImageNet classes only; synthetic-C instead"
    assert any("76.6 % against 82.9 %" in f for f in reports.findings(m))


def test_a_paper_cell_never_shows_a_run_number_and_vice_versa():
    table = reports.results_table(reports.run_results(_metrics(distilled=71.6, scratch=83.0)))
    paper = [line for line in table if "| paper ·" in line]
    run = [line for line in table if "| **" in line]
    assert len(paper) == 7 and len(run) == 2
    assert "| MAE ViT-T | paper · ImageNet-1K / ADE20K | 71.6 | 37.6 | 7.0 | 36.5 | 55.2 (as published) | — |" in paper
    assert all("smoke" not in line for line in paper) and all("paper" not in line for line in run)
    assert "| TinyMIM*-T | paper · ImageNet-1K / ADE20K | 79.6 | 45.0 | — | — | — | — |" in paper


def test_findings_are_computed_from_the_numbers():
    text = reports.findings(_metrics(distilled=30.5, scratch=24.0))
    assert text[0].startswith("The distilled micro_tiny differs from the from-scratch one by +6.5 points top-1 "
                              "(inconclusive (one seed)) (30.5 vs 24.0 %")  # one seed: the study's rule says so
    assert "+6.5 points" in text[1]
    m = _metrics(distilled=20.0, scratch=24.0)
    m["03_finetune"]["summary"]["margin"] = mean_std([-4.0, -4.2, -3.8]).to_dict()
    assert "trails the from-scratch one by 4.0 ± 0.2 points" in reports.findings(m)[0]


def test_hyperparameter_differences_are_found_and_explained():
    paper = {r["hyper-parameter"]: r for r in reports.hyperparameter_rows(
        "pretrain", get_config("pretrain", "vit_small", "paper").to_dict())}
    assert not any(r["differs"] for r in paper.values()), [r for r in paper.values() if r["differs"]]
    assert paper["pretraining_epochs"]["why"] == "one of the paper's [100, 300]"
    override = {r["hyper-parameter"]: r for r in reports.hyperparameter_rows(
        "pretrain", get_config("pretrain", "vit_small", "paper", {"batch_size": 1024, "drop_path": 0.2}).to_dict())}
    assert override["batch_size"]["differs"] and override["batch_size"]["why"] == "override (the paper preset has 4096)"
    assert override["stochastic_depth"]["why"] == "override (the paper preset has 0.1)"
    assert override["peak_lr"]["differs"]  # 1.5e-4 x 1024 / 256: the batch-scaled lr follows the override
    smoke = {r["hyper-parameter"]: r for r in reports.hyperparameter_rows(
        "finetune", get_config("finetune", profile="smoke").to_dict())}
    assert smoke["epochs"]["used"] == "400 steps" and smoke["epochs"]["why"].startswith("smoke profile")
    assert smoke["rand_augment"]["used"] == "5/0.5" and smoke["mixup"]["differs"]  # the paper's at small strength
    ft = {r["hyper-parameter"]: r for r in reports.hyperparameter_rows(
        "finetune", get_config("finetune", "vit_base", "paper").to_dict())}
    assert ft["rand_augment"]["used"] == "9/0.5" and not ft["rand_augment"]["differs"]
    assert ft["stochastic_depth"]["used"] == 0.2 and not ft["stochastic_depth"]["differs"]  # Table 2 footnote


def test_three_seed_runs_give_mean_and_std(tmp_path):
    for seed, top1 in zip((0, 1, 2), (30.0, 31.0, 35.0)):
        _write(tmp_path / f"s{seed}", _metrics(seed=seed, distilled=top1))
    _write(tmp_path / "other", _metrics(distilled=28.0, lr=3e-3))  # another config: its own column
    table = reports.comparison_table([tmp_path / n for n in ("s0", "s1", "s2", "other")])
    assert table[0] == "| metric | s0 + s1 + s2 | other |"
    # mean 32.0, sample std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7) = 2.6
    assert table[2] == "| distilled top-1 (%) | 32.0 ± 2.6 (n=3) | 28.0 |"
    assert table[5] == "| segmentation mIoU (%) | — (04_segmentation not run) | — (04_segmentation not run) |"


def test_report_command_writes_markdown_and_self_contained_html(tmp_path, capsys):
    run = tmp_path / "run"
    _write(run, _metrics())
    stage = run / "02_distill_pretrain"
    stage.mkdir()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(stage / "relations.png")
    (stage / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) for i in range(1, 5)))
    assert main(["report", str(run)]) == 0
    assert "report:" in capsys.readouterr().out
    md = (run / "REPORT.md").read_text()
    assert "![02_distill_pretrain-relations](figures/02_distill_pretrain-relations.png)" in md
    assert "![loss_curves](figures/loss_curves.png)" in md
    html = (run / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html
    assert main(["report", str(tmp_path / "empty")]) == 1


@pytest.mark.parametrize("section", ["02_distill_pretrain", "03_finetune"])
def test_a_stage_without_a_config_record_is_said(section):
    m = _metrics()
    del m[section]["config"]
    assert any(f"— ({section} recorded no config)" == line for line in reports.hyperparameter_tables(m))


def test_committed_records_name_no_machine_path(tmp_path, monkeypatch):
    """Paths inside the run are recorded relative to it, and the report names the run relative
    to where the command runs (the repository for `make run`), so committed files hold no
    machine's folders; a path outside the run stays as it is."""
    run = tmp_path / "run"
    reports.record_metrics(run, "02_distill_pretrain", {"student_path": run / "02_distill_pretrain" / "student.pth",
                                                       "teacher": str(run / "01_models" / "teacher.pth"),
                                                       "data": "/data/imagenet"})
    section = reports.load_metrics(run)["02_distill_pretrain"]
    assert section["student_path"] == "02_distill_pretrain/student.pth"
    assert section["teacher"] == "01_models/teacher.pth" and section["data"] == "/data/imagenet"
    _write(run, _metrics())
    monkeypatch.chdir(tmp_path)
    reports.render_report([run])
    assert (run / "REPORT.md").read_text().splitlines()[2].startswith("Run: `run`.")
