import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tinymim.config import ConfigError, get_config
from tinymim.engine import build_optimizer
from tinymim.finetune import Classifier, build_classifier, evaluate, topk_accuracy, train_classifier
from tinymim.models import CheckpointError, ModelSpec, build_model, model_spec, save_model


def _cfg(**kw):
    base = {"steps": "4", "warmup_steps": "1", "batch_size": "8", "data_limit": "32", "log_every": "2",
            "ckpt_every": "100", "amp": "none"}
    return get_config("finetune", "micro_tiny", "smoke", base | {k: str(v) for k, v in kw.items()})


@pytest.fixture
def student_ckpt(tmp_path):
    torch.manual_seed(0)
    return save_model(build_model(ModelSpec.create("micro_tiny", last_heads=6)), tmp_path / "student.pth")


def test_pretrained_encoder_loads_with_only_head_and_fc_norm_missing(student_ckpt):
    model = build_classifier(_cfg(pretrained=student_ckpt))
    assert [b.attn.num_heads for b in model.blocks] == [3, 3, 3, 6]  # the recorded layout
    enc = torch.load(student_ckpt, weights_only=True)["model"]
    assert torch.equal(model.blocks[2].mlp.fc1.weight, enc["blocks.2.mlp.fc1.weight"])
    uniform = build_classifier(_cfg(pretrained=student_ckpt, heads=3))  # an explicit, recorded choice
    assert model_spec(uniform).heads == (3, 3, 3, 3)


def test_missing_or_unexpected_keys_are_errors(tmp_path, student_ckpt):
    ckpt = torch.load(student_ckpt, weights_only=True)
    del ckpt["model"]["blocks.1.attn.qkv.weight"]
    ckpt["model"]["mystery.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        build_classifier(_cfg(pretrained=tmp_path / "bad.pth"))
    assert "blocks.1.attn.qkv.weight" in str(e.value) and "mystery.weight" in str(e.value)


def test_layer_decay_groups_follow_mae():
    cfg = _cfg(layer_decay=0.65)
    model = build_classifier(cfg)
    opt = build_optimizer(Classifier(model, cfg), cfg)
    scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[names[id(p)]] = g["lr_scale"]
    depth = len(model.blocks)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert scale[f"blocks.{depth - 1}.attn.qkv.weight"] == pytest.approx(0.65)
    for i in range(depth):
        assert scale[f"blocks.{i}.mlp.fc1.weight"] == pytest.approx(0.65 ** (depth - i))
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == pytest.approx(0.65 ** (depth + 1))


def test_mixup_gives_soft_targets():
    cfg = _cfg(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    task = Classifier(build_classifier(cfg), cfg)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    _, soft = task.mixup(x, y)
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
    assert ((soft > 0.05).sum(1) >= 2).all()  # two labels mixed per sample (+ smoothing)
    loss, _ = task(torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8), y)
    assert torch.isfinite(loss)


def test_distillation_token_model_and_hard_label_loss(tmp_path):
    torch.manual_seed(0)
    teacher = build_model(ModelSpec.create("micro_small", num_classes=10))
    teacher_path = save_model(teacher, tmp_path / "teacher_cls.pth")
    cfg = _cfg(dist_token=True, extra_fc=64, heads=6, teacher_classifier=teacher_path, mixup=0, cutmix=0,
               label_smoothing=0, reprob=0)
    model = build_classifier(cfg)
    assert model.head.fc is model.head_dist.fc  # one shared 96 -> 64 FC before both classifiers
    task = Classifier(model, cfg, teacher=build_model(ModelSpec.create("micro_small", num_classes=10)))
    task.teacher.load_state_dict(teacher.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    task.train()
    cls_out, dist_out = model(x)
    assert cls_out.shape == dist_out.shape == (4, 10)
    loss, parts = task(x, y)
    hard = teacher.eval()(x).argmax(1)
    cls_out, dist_out = model(x)
    expected = 0.5 * F.cross_entropy(cls_out, y) + 0.5 * F.cross_entropy(dist_out, hard)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    model.eval()
    assert torch.allclose(model(x), (cls_out + dist_out) / 2, atol=1e-5)  # heads averaged at test time


def test_dist_token_needs_a_teacher():
    with pytest.raises(ConfigError, match="teacher_classifier"):
        _cfg(dist_token=True)


class _Brightness(nn.Module):
    """Predicts the class from the mean intensity: class k images have brightness k/4."""

    def forward(self, x):
        mean = x.mean(dim=(1, 2, 3))
        centres = torch.tensor([(k / 4 - 0.45) / 0.226 for k in range(3)])
        return -(mean[:, None] - centres[None]) ** 2


def test_evaluation_on_a_folder_with_known_answers(tmp_path):
    for k, wnid in enumerate(["n01", "n02", "n03"]):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for i in range(4):
            level = k if not (k == 2 and i == 0) else 0  # one class-2 image looks like class 0
            Image.fromarray(np.full((40, 40, 3), int(level / 4 * 255), np.uint8)).save(tmp_path / "val" / wnid / f"{i}.png")
    cfg = _cfg(data=str(tmp_path), input_size=32)
    res = evaluate(_Brightness(), cfg)
    assert res["n"] == 12 and res["top1"] == pytest.approx(100 * 11 / 12)
    assert topk_accuracy(torch.tensor([[0.1, 0.9, 0.0]]), torch.tensor([0]), ks=(1, 2)) == {"top1": 0.0, "top2": 100.0}


def test_finetune_end_to_end_records_eval(tmp_path, student_ckpt):
    model, metrics = train_classifier(_cfg(pretrained=student_ckpt), tmp_path, progress=False)
    assert metrics["steps"] == 4 and 0 <= metrics["top1"] <= 100 and metrics["heads"] == [3, 3, 3, 6]
    assert (tmp_path / "model.pth").exists() and (tmp_path / "eval.json").exists()
