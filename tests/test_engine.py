import json
import math

import pytest
import torch
from torch import nn

from tinymim import engine
from tinymim.data import Augmented, LoaderBatches, MemoryImages, Views
from tinymim.mae import MAE
from tinymim.models import ModelSpec, build_model
from tinymim.presets import get_config


def _mae_task(seed=0):
    torch.manual_seed(seed)
    cfg = get_config("mae", "micro_tiny", "smoke", {"decoder_dim": "32", "decoder_depth": "1", "decoder_heads": "2"})
    return MAE(build_model(ModelSpec.create("micro_tiny"), fixed_pos_embed=True), cfg)


def _cfg(**kw):
    base = {"steps": "6", "warmup_steps": "2", "batch_size": "8", "log_every": "1", "ckpt_every": "3", "amp": "none"}
    return get_config("mae", "micro_tiny", "smoke", base | {k: str(v) for k, v in kw.items()})


def _batches(n=40):
    """MAE's augmentation of random images through the loader the stages use: resume must be
    exact with per-sample augmentation on the host and the device half in the engine."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return LoaderBatches(Augmented(MemoryImages(images), Views(32, (0.35, 1.0)), seed=0), batch_size=8, seed=0)


def _losses(run_dir):
    return [r["loss"] for r in engine.read_metrics(run_dir)]


def test_resume_after_interruption_is_bitwise_identical(tmp_path):
    cfg = _cfg()
    full = _mae_task()
    engine.train(full, _batches(), cfg, tmp_path / "full", progress=False)

    part = _mae_task()
    engine.train(part, _batches(), cfg, tmp_path / "part", progress=False, stop_after=3)
    assert json.loads((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    resumed = _mae_task(seed=123)  # a fresh process would start from other weights
    engine.train(resumed, _batches(), cfg, tmp_path / "part", progress=False)

    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_schedule_warmup_then_cosine(tmp_path):
    cfg = _cfg(steps=10, warmup_steps=4, lr=1e-3, min_lr=1e-5, ckpt_every=100)
    engine.train(_mae_task(), _batches(80), cfg, tmp_path, progress=False)
    lrs = [r["lr"] for r in engine.read_metrics(tmp_path)]
    # the lr logged at step s was used for update s-1 (0-indexed)
    expected = [1e-3 * t / 4 if t < 4 else 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (t - 4) / 6))
                for t in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_weight_decay_spares_biases_and_norms_only_as_maes_add_weight_decay():
    """MAE's main_pretrain.py (timm 0.3.2's add_weight_decay): no decay for 1-D tensors and
    biases; the class and mask tokens (3-D) are decayed; the fixed position embedding is not trained."""
    task = _mae_task()
    opt = engine.build_optimizer(task, _cfg())
    names = {id(p): n for n, p in task.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.qkv.bias"} <= no_decay
    assert {"encoder.cls_token", "mask_token", "encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight"} <= decay
    assert no_decay == {n for n, p in task.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))}
    assert "encoder.pos_embed" not in decay | no_decay  # fixed sin-cos: not trained at all


class _Regression(nn.Module):
    """A deterministic task (no random masking), so accumulation can be compared exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 32 * 32, 1)

    def forward(self, x):
        return ((self.lin(x.float().flatten(1) / 255) - 1) ** 2).mean(), {}


def test_accumulation_matches_full_batch(tmp_path):
    a, b = _Regression(), _Regression()
    engine.train(a, _batches(), _cfg(steps=3, warmup_steps=0, lr=1e-2), tmp_path / "a", progress=False)
    engine.train(b, _batches(), _cfg(steps=3, warmup_steps=0, lr=1e-2, micro_batch_size=2), tmp_path / "b",
                 progress=False)
    assert not torch.equal(a.lin.weight, _Regression().lin.weight)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), k


class _Diverging(nn.Module):
    """Goes wrong from its 5th call: a NaN loss, or a finite loss whose gradient is inf
    (sqrt at 0) -- which a guard on the loss alone would checkpoint as NaN weights."""

    def __init__(self, how: str):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))
        self.how, self.calls = how, 0

    def forward(self, x):
        self.calls += 1
        loss = (self.w * x.float().mean() / 255) ** 2
        if self.calls > 4:
            loss = loss * float("nan") if self.how == "loss" else loss + torch.sqrt(self.w - self.w.detach())
        return loss, {}


@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_nan_guard_keeps_a_finite_checkpoint_and_says_what_to_run(tmp_path, how):
    cfg = _cfg(steps=8, ckpt_every=2, log_every=2, lr=0.5)
    with pytest.raises(engine.TrainingDiverged) as e:
        engine.train(_Diverging(how), _batches(), cfg, tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert state["step"] == 4 and torch.isfinite(state["task"]["w"]).all()
    msg = str(e.value)
    assert "--set lr=0.25" in msg and f"--out {tmp_path / 'run'}-lr0.25" in msg  # a command that works


def test_plan_accumulates_to_config_batch():
    cfg = get_config("pretrain", "vit_small", "paper", {"micro_batch_size": "128"})
    plan = engine.make_plan(cfg, steps_per_epoch=312, world_size=8)
    assert plan.accum_steps * plan.micro_batch * plan.world_size == 4096
    assert plan.steps == 300 * 312 and plan.warmup_steps == 15 * 312


def test_resume_refuses_a_different_config(tmp_path):
    engine.train(_mae_task(), _batches(), _cfg(steps=3), tmp_path, progress=False)
    with pytest.raises(ValueError, match="another config.*lr"):
        engine.train(_mae_task(), _batches(), _cfg(steps=3, lr=5e-3), tmp_path, progress=False)
    engine.train(_mae_task(), _batches(), _cfg(steps=3, log_every=2), tmp_path, progress=False)  # harmless change


def _full_and_interrupted(tmp_path, cfg):
    engine.train(_mae_task(), _batches(), cfg, tmp_path / "full", progress=False)
    engine.train(_mae_task(), _batches(), cfg, tmp_path / "part", progress=False, stop_after=4)
    return tmp_path / "full", tmp_path / "part"


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    full, part = _full_and_interrupted(tmp_path, _cfg())
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-line
    with pytest.warns(UserWarning, match="torn last line"):
        engine.train(_mae_task(), _batches(), _cfg(), part, progress=False)
    assert _losses(full) == _losses(part)


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    full, part = _full_and_interrupted(tmp_path, _cfg(ckpt_every=2))
    assert torch.load(part / "checkpoint-prev.pth", weights_only=True)["step"] == 2
    data = (part / "checkpoint.pth").read_bytes()
    (part / "checkpoint.pth").write_bytes(data[: len(data) // 3])  # a torn copy
    (part / ".checkpoint.pth.abc123.tmp").write_bytes(b"x" * 100)  # an orphan of a killed write
    with pytest.warns(UserWarning, match=r"checkpoint\.pth.*previous checkpoint.*checkpoint-prev\.pth"):
        engine.train(_mae_task(), _batches(), _cfg(ckpt_every=2), part, progress=False)
    assert _losses(full) == _losses(part)  # resumed from step 2, same result
    assert not list(part.glob(".*.tmp"))
    assert (part / "checkpoint.pth").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_both_checkpoints_unreadable_is_an_error_naming_them(tmp_path):
    _, part = _full_and_interrupted(tmp_path, _cfg(ckpt_every=2))
    for name in ("checkpoint.pth", "checkpoint-prev.pth"):
        (part / name).write_bytes(b"garbage")
    with pytest.raises(Exception, match="checkpoint.pth.*checkpoint-prev.pth"):
        engine.train(_mae_task(), _batches(), _cfg(ckpt_every=2), part, progress=False)


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_attention_kernel_is_measured_under_autocast_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    """fp32: SDPA, nothing measured (two fresh runs stay bit-identical). bf16: measured once,
    recorded in the checkpoint; a resume keeps the recorded kernel whatever a new
    measurement would say (the kernels round differently)."""
    def never(*args, **kwargs):
        raise AssertionError("measured in fp32 or on resume")

    monkeypatch.setattr(engine, "choose_attention_kernel", never)
    run = engine.start_run(_mae_task(), _batches(), _cfg(), tmp_path / "fp32", torch.device("cpu"))
    assert run.attention_kernel == "sdpa" and all(b.attn.fused_attn for b in run.task.encoder.blocks)

    monkeypatch.setattr(engine, "choose_attention_kernel", lambda vits, *a, **k: "math")
    cfg = _cfg(amp="bf16", steps=4, ckpt_every=2)
    engine.train(_mae_task(), _batches(), cfg, tmp_path / "bf16", progress=False, stop_after=2)
    assert torch.load(tmp_path / "bf16" / "checkpoint.pth", weights_only=True)["attention_kernel"] == "math"
    monkeypatch.setattr(engine, "choose_attention_kernel", never)
    run = engine.start_run(_mae_task(), _batches(), cfg, tmp_path / "bf16", torch.device("cpu"))
    assert run.step == 2 and run.attention_kernel == "math"
    assert not any(b.attn.fused_attn for b in run.task.encoder.blocks)
