"""The study's plan, verdicts and report on fake results, and one tiny real run that
resumes without training again. (The notebook itself runs under nbmake at its tiny
defaults; `tinymim study` is in test_cli.)"""

import json

import pytest

from tinymim import study
from tinymim.presets import get_config
from tinymim.study import ARMS, BUDGETS, FINDINGS, TEACHER, Finding, plan, render_study, select_arms, verdict


def _results(values: dict[str, list[float]], metric: str = "top1") -> list[dict]:
    return [{"arm": arm, "seed": seed, metric: v} for arm, vs in values.items() for seed, v in enumerate(vs)]


def test_verdicts_follow_the_two_std_rule_paired_by_seed():
    f = Finding("relation beats scratch", "relation", "scratch")
    holds = verdict(_results({"relation": [30, 31, 32], "scratch": [20, 22, 21]}), f, "top1")
    assert holds["verdict"] == "holds" and holds["gain"].mean == pytest.approx(10.0) and holds["gain"].n == 3
    # the arms overlap by seed-to-seed spread, but the paired gain is steady: pairing is what counts
    paired = verdict(_results({"relation": [20, 30, 40], "scratch": [19, 29, 39]}), f, "top1")
    assert paired["verdict"] == "holds" and paired["gain"].std == pytest.approx(0.0)
    against = verdict(_results({"relation": [20, 21, 22], "scratch": [30, 31, 32]}), f, "top1")
    assert against["verdict"] == "does not hold at this scale"
    noisy = verdict(_results({"relation": [30, 20, 31], "scratch": [21, 29, 22]}), f, "top1")
    assert noisy["verdict"] == "inconclusive given the std"
    one = verdict(_results({"relation": [30], "scratch": [20]}), f, "top1")
    assert one["verdict"] == "inconclusive (one seed)"
    # an error metric: lower is better, so the gain is worse - better
    err = verdict(_results({"relation": [10, 11, 12], "scratch": [20, 21, 22]}, "c_error"), f, "c_error")
    assert err["verdict"] == "holds" and err["gain"].mean == pytest.approx(10.0)
    assert verdict(_results({"relation": [1.0]}), f, "top1")["verdict"] == "not run"


def test_select_arms_adds_what_each_row_is_compared_with():
    assert {a.name for a in select_arms(["f"])} == {"scratch", "teacher", "block4", "relation"}
    assert {a.name for a in select_arms(["i"])} == {"scratch", "teacher", "qk", "vv", "relation"}
    assert len(select_arms(None)) == len(ARMS)
    with pytest.raises(ValueError, match="unknown row"):
        select_arms(["z"])


def test_plan_gives_every_arm_one_budget_and_wires_chains(tmp_path):
    budget = BUDGETS["study"]
    runs = {r.arm.name: r for r in plan(tmp_path, ARMS, [0, 1], budget, tmp_path / "teacher.pth") if r.seed == 1}
    assert {r.configs["finetune"].steps for r in runs.values()} == {budget.finetune_steps}
    assert {r.configs["finetune"].seed for r in runs.values()} == {1}
    assert not any("segmentation" in r.configs for r in runs.values())  # the study budget has none
    # one precision on every machine, the teacher's too: "auto" differs between CPUs
    assert {cfg.amp for r in runs.values() for cfg in r.configs.values()} == {budget.amp} == {"none"}
    assert get_config("mae", TEACHER, "smoke", budget.teacher_overrides("synthetic")).amp == "none"
    tiny = {r.arm.name: r for r in plan(tmp_path, ARMS, [0], BUDGETS["tiny"], tmp_path / "teacher.pth")}
    assert {r.configs["segmentation"].steps for n, r in tiny.items() if n != "teacher"} == {
        BUDGETS["tiny"].segmentation_steps}
    assert runs["scratch"].configs["finetune"].pretrained is None and runs["scratch"].configs["finetune"].layer_decay == 1.0
    seq = runs["sequential"]
    assert (seq.configs["pretrain0"].model, seq.configs["pretrain1"].model) == ("micro_small", "micro_tiny")
    assert seq.configs["pretrain1"].teacher == "micro_small"
    assert seq.configs["pretrain1"].teacher_path == str(seq.root / "pretrain0" / "student.pth")
    assert seq.configs["finetune"].pretrained == str(seq.root / "pretrain1" / "student.pth")
    assert runs["mae"].configs["finetune"].pretrained == str(runs["mae"].root / "mae" / "teacher.pth")
    assert runs["qk"].configs["pretrain0"].relations == ("qk",)
    assert runs["masked"].configs["pretrain0"].mask_ratio == 0.5
    assert runs["block4"].configs["pretrain0"].teacher_block == 4
    assert runs["cls"].configs["pretrain0"].target == "cls"
    assert runs["teacher"].configs["finetune"].model == "micro_base" and "segmentation" not in runs["teacher"].configs
    # the distillation arms differ from TinyMIM (c) only in what their row varies
    base = runs["relation"].configs["pretrain0"].to_dict()
    for name, field in (("cls", "target"), ("block4", "teacher_block"), ("masked", "mask_ratio"), ("qk", "relations")):
        diff = {k for k, v in runs[name].configs["pretrain0"].to_dict().items() if base[k] != v}
        assert diff == {field}, name


def _fake_study(out, seeds=(0, 1, 2), mask_free=False, step=1.0):
    """Results whose top-1 rises by `step` with the arm's position; `mask_free`: no mIoU, as
    on data without masks or in a budget without segmentation."""
    for seed in seeds:
        for i, arm in enumerate(ARMS):
            run = out / "runs" / f"{arm.name}-s{seed}"
            run.mkdir(parents=True)
            res = {"arm": arm.name, "row": arm.row, "seed": seed, "top1": 20.0 + step * i + seed * 0.1,
                   "mIoU": None if arm.name == "teacher" or mask_free else 10.0 + i, "c_error": 80.0 - i,
                   "total_seconds": 60.0}
            (run / "result.json").write_text(json.dumps(res))
    seg = {"segmentation_steps": 500} if step < 0 else {}  # the digits study's budget named its unused UperNet steps
    (out / "study.json").write_text(json.dumps({"budget": "study", "seeds": list(seeds),
                                                "budget_steps": {"finetune_steps": 250} | seg}))


def test_report_has_every_row_with_mean_std_and_a_verdict(tmp_path):
    _fake_study(tmp_path)
    paths = render_study(tmp_path)
    text = paths["markdown"].read_text()
    for arm in ARMS:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| ({arm.row}) | {arm.label} |"))
        assert line.count("±") == (2 if arm.name == "teacher" else 3), line
    verdict_lines = [ln for ln in text.splitlines() if " vs (" in ln and ln.startswith("| (")]
    assert len(verdict_lines) == len(FINDINGS) + 1  # + the premise, teacher vs scratch
    assert {row for ln in verdict_lines for row in "abcdefghi" if f"({row})" in ln.split("|")[1]} == set("abcdefghi")
    # fake numbers rise with the arm's position: (c) relation beats (a) scratch steadily
    assert "| (c) vs (a) | distillation pre-training beats training from scratch | relation vs scratch | +2.0 ± 0.0 | holds" in text
    assert "a check of the machinery" not in text
    html = paths["html"].read_text()
    assert "data:image/png;base64," in html and "figures/study.png" not in html
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert len(saved["runs"]) == 3 * len(ARMS) and saved["summary"]["relation"]["top1"]["n"] == 3


def test_beside_another_study_says_where_verdicts_agree_and_whether_budgets_match(tmp_path):
    synthetic, digits = tmp_path / "synthetic", tmp_path / "digits"
    _fake_study(synthetic)
    render_study(synthetic)
    _fake_study(digits, mask_free=True, step=-1.0)  # every arm worse than the one before it: verdicts flip
    text = render_study(digits, beside=synthetic)["markdown"].read_text()
    assert "The same arms, budget and seeds on synthetic" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| (c) vs (a) |") and ln.endswith("differ |"))
    assert "does not hold at this scale (-2.0 ± 0.0) | holds (+2.0 ± 0.0)" in row
    assert "(no segmentation: this data has no masks)" in text and "mIoU (%)" not in text
    # a budget that feeds top-1 differently is named, not passed over
    state = json.loads((digits / "study.json").read_text())
    (digits / "study.json").write_text(json.dumps(state | {"budget_steps": {"finetune_steps": 200}}))
    text = render_study(digits, beside=synthetic)["markdown"].read_text()
    assert "not the same budget or seeds (finetune_steps 200 here, 250 there)" in text
    # so is the precision: amp=auto on a CPU with native bf16 trained in bf16, the other in fp32
    bf16_cpu = {"cpu": "x86_64", "cpus": 2, "gpus": [], "cpu_native_bf16": True}
    (digits / "study.json").write_text(json.dumps(state | {"environment": bf16_cpu}))
    text = render_study(digits, beside=synthetic)["markdown"].read_text()
    assert "(amp bf16 here, fp32 there)" in text and "Training and evaluation (in bf16) took" in text


def test_a_budget_without_segmentation_says_why(tmp_path):
    _fake_study(tmp_path, mask_free=True)
    text = render_study(tmp_path)["markdown"].read_text()
    assert "(no segmentation: its budget has none, since a UperNet" in text and "mIoU gain" not in text


def test_report_refuses_an_empty_study(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished study run"):
        render_study(tmp_path)


@pytest.mark.slow  # whole notebooks or studies: `make test`, not `make unit`
def test_a_study_resumes_without_training_again(tmp_path, monkeypatch):
    first = study.run_study(tmp_path, seeds=[0], only=["a"], budget="tiny", progress=False, log=lambda _: None)
    assert {r["arm"] for r in first} == {"scratch", "relation", "teacher"}
    assert all(0 <= r["top1"] <= 100 and 0 <= r["c_error"] <= 100 for r in first)

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study, "train_stage", fail)
    assert study.run_study(tmp_path, seeds=[0], only=["a"], budget="tiny", progress=False, log=lambda _: None) == first
    with pytest.raises(ValueError, match="budget"):
        study.run_study(tmp_path, budget="huge")
