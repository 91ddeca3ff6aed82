"""The pipeline layer: run-directory layout, inputs made on demand in smoke and demanded
in paper, the smoke teacher cache, and notebook 03's seed comparison."""

import json

import pytest
import torch

from tinymim import pipeline
from tinymim.checkpoints import load_teacher, save_model
from tinymim.models import ModelSpec, build_model

MAE_TINY = {"steps": 2, "warmup_steps": 1, "batch_size": 8, "data_limit": 16, "decoder_dim": 32,
            "decoder_depth": 1, "decoder_heads": 2, "amp": "none"}


def test_smoke_teacher_is_trained_once_per_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYMIM_CACHE", str(tmp_path / "cache"))
    first = pipeline.smoke_teacher(tmp_path / "a", MAE_TINY, progress=False)
    (cached,) = (tmp_path / "cache" / "teachers").glob("*/teacher.pth")
    trained_at = cached.stat().st_mtime_ns
    again = pipeline.smoke_teacher(tmp_path / "b", MAE_TINY, progress=False)
    assert cached.stat().st_mtime_ns == trained_at  # trained once; the second run directory got a copy
    assert torch.equal(torch.load(first, weights_only=True)["model"]["cls_token"],
                       torch.load(again, weights_only=True)["model"]["cls_token"])
    assert {p.name for p in (tmp_path / "b").iterdir()} == {"teacher.pth", "mae_full.pth", "metrics.jsonl"}
    pipeline.smoke_teacher(None, MAE_TINY | {"mask_ratio": 0.5}, progress=False)  # another config: another teacher
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 2


def test_paper_profile_demands_inputs_and_names_the_parameter(tmp_path):
    run = pipeline.layout(tmp_path, "paper")
    with pytest.raises(pipeline.MissingInput, match="teacher_path"):
        pipeline.obtain_teacher(run, "paper")
    with pytest.raises(pipeline.MissingInput, match="-p pretrained"):
        pipeline.obtain_student(run, "paper")
    with pytest.raises(pipeline.MissingInput, match="notebook 03"):
        pipeline.obtain_classifiers(run, "paper")
    with pytest.raises(pipeline.MissingInput, match="teacher_path"):
        pipeline.teacher_path_for(run, "paper")


def test_layout_finds_what_earlier_notebooks_made(tmp_path):
    run = pipeline.layout(tmp_path, "paper")
    assert run.stage_dir("pretrain") == tmp_path.resolve() / "02_distill_pretrain"
    torch.manual_seed(0)
    save_model(build_model(ModelSpec.create("micro_base")), run.teacher)
    save_model(build_model(ModelSpec.create("micro_tiny", last_heads=6)), run.student)
    assert pipeline.teacher_path_for(run, "paper") == run.teacher
    assert pipeline.obtain_student(run, "paper") == run.student
    assert pipeline.obtain_teacher(run, "paper", path=run.teacher) == run.teacher  # loaded once to check it
    assert len(load_teacher(None, run.student).blocks) == 4


def test_comparison_is_fair_and_summarised_over_seeds(tmp_path):
    torch.manual_seed(0)
    student = save_model(build_model(ModelSpec.create("micro_tiny", last_heads=6)), tmp_path / "student.pth")
    tiny = {"steps": 2, "warmup_steps": 1, "batch_size": 8, "data_limit": 16, "amp": "none"}
    run = pipeline.layout(tmp_path / "run", "smoke")
    arms = pipeline.comparison(run, "smoke", student, overrides=tiny, seeds=(0, 1))
    assert [(a.arm, a.seed) for a in arms] == [("scratch", 0), ("distilled", 0), ("scratch", 1), ("distilled", 1)]
    d, s = arms[3].cfg, arms[2].cfg
    same = {k for k in d.to_dict() if k not in ("pretrained", "layer_decay")}
    assert all(d.to_dict()[k] == s.to_dict()[k] for k in same) and d.seed == 1  # one recipe, one budget
    assert s.pretrained is None and s.layer_decay == 1.0
    assert arms[0].path.parent == run.baselines and arms[1].path.parent == run.finetune
    results = pipeline.run_comparison(arms, progress=False)
    top1 = {(a.arm, a.seed): json.loads((a.path / "eval.json").read_text())["top1"] for a in arms}
    summary = pipeline.summarize_comparison(results)
    assert summary["distilled"].values == (top1[("distilled", 0)], top1[("distilled", 1)])
    margins = [top1[("distilled", s)] - top1[("scratch", s)] for s in (0, 1)]
    assert summary["margin"].mean == pytest.approx(sum(margins) / 2)
    assert summary["margin"].std == pytest.approx(abs(margins[0] - margins[1]) / 2 ** 0.5)
    mtime = (arms[0].path / "model.pth").stat().st_mtime_ns
    pipeline.run_comparison(arms, progress=False)  # finished runs are read, not trained again
    assert (arms[0].path / "model.pth").stat().st_mtime_ns == mtime
