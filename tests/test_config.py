import json
from importlib import resources

import pytest

from tinymim.config import ConfigError
from tinymim.models import ARCHS
from tinymim.presets import get_config

TABLES = json.loads(resources.files("tinymim.resources").joinpath("paper_tables.json").read_text())
T1, T2, T3 = TABLES["table1_pretrain"], TABLES["table2_finetune"], TABLES["table3_segmentation"]


@pytest.mark.parametrize("model", ["vit_tiny", "vit_small", "vit_base"])
def test_table1_architectures(model):
    a, row = ARCHS[model], T1[model]
    assert (a.depth, a.embed_dim, a.ffn_dim, a.num_heads, a.patch_size) == (
        row["layers"], row["hidden_size"], row["ffn_hidden_size"], row["attention_heads"], row["patch_size"])


@pytest.mark.parametrize("model", ["vit_tiny", "vit_small", "vit_base"])
def test_pretrain_paper_preset_matches_table1(model):
    c, t = get_config("pretrain", model, "paper"), T1["all"]
    assert c.batch_size == t["batch_size"]
    assert c.lr == pytest.approx(t["peak_lr"]) and c.blr == pytest.approx(t["base_lr_per_256"])
    assert c.min_lr == t["min_lr"] and c.schedule == t["lr_schedule"]
    assert list(c.betas) == t["adam_betas"] and c.eps == t["adam_eps"]
    assert c.weight_decay == t["weight_decay"] and c.drop_path == t["stochastic_depth"]
    assert c.input_size == t["input_resolution"] and c.color_jitter == t["color_jitter_student_only"]
    # the 300/15 schedule of the main text is one of the table's (epochs, warm-up) pairs
    assert (c.epochs, c.warmup_epochs) in list(zip(t["pretraining_epochs"], t["warmup_epochs"]))
    assert c.mask_ratio == 0.0 and c.target == "relation"


@pytest.mark.parametrize("model", ["vit_tiny", "vit_small", "vit_base"])
def test_finetune_paper_preset_matches_table2(model):
    c, row, t = get_config("finetune", model, "paper"), T2[model], T2["all"]
    assert c.lr == row["peak_lr"] and c.epochs == row["epochs"] and c.batch_size == row["batch_size"]
    assert c.layer_decay == row["layer_decay"] and c.drop_path in row["stochastic_depth"]
    assert c.warmup_epochs == t["warmup_epochs"] and c.eps == t["adam_eps"] and list(c.betas) == t["adam_betas"]
    assert c.schedule == t["lr_schedule"] and c.weight_decay == t["weight_decay"]
    assert c.label_smoothing == t["label_smoothing"] and c.reprob == t["random_erasing"]
    assert c.mixup == t["mixup"] and c.cutmix == t["cutmix"] and c.clip_grad is t["gradient_clipping"]
    assert c.input_size == t["input_resolution"]
    m, s = t["rand_augment"].split("/")
    assert c.rand_augment.startswith(f"rand-m{m}-mstd{s}")


def test_vit_base_drop_path_follows_pretraining_length():
    assert get_config("finetune", "vit_base", "paper").drop_path == 0.2
    assert get_config("finetune", "vit_base", "paper", {"pretrain_epochs": "100"}).drop_path == 0.1


@pytest.mark.parametrize("model", ["vit_small", "vit_base"])
def test_segmentation_paper_preset_matches_table3(model):
    c, t = get_config("segmentation", model, "paper"), T3["all"]
    assert c.input_size == t["input_resolution"] and c.lr == t["peak_lr"] and c.steps == t["steps"]
    assert c.batch_size == t["batch_size"] and c.eps == t["adam_eps"] and list(c.betas) == t["adam_betas"]
    assert c.layer_decay in t["layer_decay"] and c.min_lr == t["min_lr"] and c.schedule == t["lr_schedule"]
    assert c.warmup_steps == t["warmup_steps"] and c.drop_path == t["stochastic_depth"]
    assert c.weight_decay == t["weight_decay"]


def test_overrides_are_typed_and_batch_rescales_base_lr():
    c = get_config("pretrain", "vit_small", "paper", {"batch_size": "1024", "betas": "0.9,0.99"})
    assert c.lr == pytest.approx(1.5e-4 * 1024 / 256) and c.betas == (0.9, 0.99)
    assert get_config("pretrain", "vit_small", "paper", {"lr": "1e-3"}).lr == 1e-3


@pytest.mark.parametrize("overrides, words", [
    ({"lrr": "1"}, ["unknown key", "lrr"]),
    ({"lr": "fast"}, ["lr", "number"]),
    ({"batch_size": "1.5"}, ["batch_size", "integer"]),
    ({"betas": "0.9"}, ["betas", "2 values"]),
    ({"target": "pixels"}, ["target", "relation"]),
])
def test_bad_overrides_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        get_config("pretrain", "vit_small", "paper", overrides)
    assert all(w in str(e.value) for w in words)


def _cli(*args):
    """`tinymim ARGS` in this process (the CLI's own `main`; a subprocess would spend its time importing)."""
    import contextlib
    import io
    from types import SimpleNamespace

    from tinymim.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_cli_prints_acceptance_values():
    out = json.loads(_cli("config", "pretrain", "--model", "vit_small", "--profile", "paper").stdout)
    assert (out["lr"], out["batch_size"], out["betas"], out["weight_decay"], out["min_lr"], out["drop_path"]) == (
        0.0024, 4096, [0.9, 0.95], 0.05, 1e-05, 0.1)
    out = json.loads(_cli("config", "finetune", "--model", "vit_base", "--profile", "paper").stdout)
    assert (out["lr"], out["batch_size"], out["layer_decay"], out["epochs"]) == (0.002, 1024, 0.65, 100)
    out = json.loads(_cli("config", "segmentation", "--model", "vit_base", "--profile", "paper").stdout)
    assert (out["lr"], out["batch_size"], out["steps"], out["warmup_steps"], out["betas"], out["input_size"]) == (
        0.0001, 16, 160000, 1500, [0.9, 0.999], 512)


def test_cli_override_and_errors_exit_2():
    ok = _cli("config", "pretrain", "--profile", "paper", "--set", "lr=1e-3")
    assert ok.returncode == 0 and json.loads(ok.stdout)["lr"] == 1e-3
    bad = _cli("config", "pretrain", "--set", "nope=1")
    assert bad.returncode == 2 and "nope" in bad.stderr
    bad = _cli("config", "pretrain", "--set", "lr=abc")
    assert bad.returncode == 2 and "lr" in bad.stderr


@pytest.mark.parametrize("steps, warmup", [(1, 0), (5, 0), (40, 5), (60, 50), (400, 50)])
def test_steps_alone_scales_the_warmup_share(steps, warmup):
    """`--set steps=N` alone keeps the preset's warm-up share instead of failing on it."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = get_config("finetune", profile="smoke", overrides={"steps": str(steps)})
    assert cfg.warmup_steps == warmup
    assert bool(caught) == (steps <= 50) and (not caught or "warm-up scaled" in str(caught[0].message))
    with pytest.raises(ConfigError, match="warmup_steps"):
        get_config("finetune", profile="smoke", overrides={"steps": "5", "warmup_steps": "5"})


@pytest.mark.parametrize("stage, model", [("pretrain", m) for m in ("vit_tiny", "vit_small", "vit_base")]
                         + [("finetune", m) for m in ("vit_tiny", "vit_small", "vit_base")]
                         + [("segmentation", m) for m in ("vit_small", "vit_base")])
def test_every_row_of_the_tables_is_what_the_paper_preset_uses(stage, model):
    """The presets (resources/presets/paper.yaml) against the transcribed tables, row by row,
    through the mapping the reports use (resources/paper_tables.json 'fields')."""
    from tinymim import reports

    rows = reports.hyperparameter_rows(stage, get_config(stage, model, "paper").to_dict())
    assert len(rows) >= 12 and not [r for r in rows if r["differs"]]


def test_a_profile_that_extends_another_changes_only_what_it_says():
    smoke, tiny = get_config("finetune", profile="smoke"), get_config("finetune", profile="tiny")
    changed = {k for k, v in smoke.to_dict().items() if tiny.to_dict()[k] != v}
    assert changed == {"profile", "steps", "warmup_steps", "batch_size", "data_limit"}
