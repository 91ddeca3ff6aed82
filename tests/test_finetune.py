import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tinymim import engine
from tinymim.checkpoints import CheckpointError, save_model
from tinymim.config import ConfigError
from tinymim.engine import build_optimizer
from tinymim.evaluation import topk_accuracy
from tinymim.finetune import Classifier, build_classifier, evaluate, recipe, train_classifier
from tinymim.models import ModelSpec, build_model, model_spec
from tinymim.presets import get_config


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


def _lr_scales(model, cfg):
    opt = build_optimizer(model, cfg, layer_decay=cfg.layer_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("pretrained", [False, True])
def test_layer_decay_groups_follow_mae(pretrained, student_ckpt):
    """MAE's get_layer_id_for_vit: embeddings (pos_embed included: it is trained) at
    decay^(depth+1), block i at decay^(depth-i), head and fc_norm at 1."""
    cfg = _cfg(layer_decay=0.65, pretrained=student_ckpt if pretrained else None)
    model = build_classifier(cfg)
    scale = _lr_scales(model, cfg)
    depth = len(model.blocks)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert scale[f"blocks.{depth - 1}.attn.qkv.weight"] == pytest.approx(0.65)
    for i in range(depth):
        assert scale[f"blocks.{i}.mlp.fc1.weight"] == pytest.approx(0.65 ** (depth - i))
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == pytest.approx(0.65 ** (depth + 1))
    assert scale["pos_embed"] == pytest.approx(0.65 ** (depth + 1))  # trained, at the embeddings' scale


def test_token_pooling_final_norm_at_full_lr_and_recorded(tmp_path):
    """TinyMIM*-T pools a token through the final norm: MAE gives it lr scale 1 (timm's
    own grouping would give it the last block's)."""
    teacher = save_model(build_model(ModelSpec.create("micro_tiny", num_classes=10)), tmp_path / "t.pth")
    cfg = _cfg(layer_decay=0.65, dist_token=True, teacher_classifier=teacher)
    assert cfg.global_pool == "token" and cfg.to_dict()["global_pool"] == "token"
    model = build_classifier(cfg)
    scale = _lr_scales(model, cfg)
    depth = len(model.blocks)
    assert scale["norm.weight"] == scale["head.weight"] == scale["head_dist.weight"] == 1.0
    assert scale["dist_token"] == scale["pos_embed"] == pytest.approx(0.65 ** (depth + 1))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mixup_gives_soft_targets(seed):
    """Seeded (timm's Mixup draws from NumPy's global RNG): the targets are exactly
    lam * own + (1 - lam) * partner (the batch flipped), label-smoothed, with the lam
    that timm drew for this batch (for cutmix, the pasted area's complement)."""
    cfg = _cfg(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    task = Classifier(build_classifier(cfg), cfg)
    mixup = recipe(cfg)._part("mixup")
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    np.random.seed(seed)
    lam = mixup._mix_batch(x.clone())
    np.random.seed(seed)
    mixed, soft = mixup(x.clone(), y)
    one_hot = torch.full((8, 10), 0.1 / 10).scatter_(1, y[:, None], 1 - 0.1 + 0.1 / 10)
    assert 0 < lam < 1
    assert torch.allclose(soft, lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-6)
    loss, _ = task(mixed, soft)
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
    assert topk_accuracy(torch.tensor([[0.1, 0.9, 0.0]]), torch.tensor([0]), ks=(1, 2)) == {"top1": 0.0, "top2": 100.0, "n": 1}


def test_finetune_end_to_end_records_eval(tmp_path, student_ckpt):
    model, metrics = train_classifier(_cfg(pretrained=student_ckpt), tmp_path, progress=False)
    assert metrics["steps"] == 4 and metrics["heads"] == [3, 3, 3, 6]
    assert (tmp_path / "model.pth").exists() and (tmp_path / "eval.json").exists()
    from tinymim.data import synthetic
    from tinymim.data.transforms import normalize

    val = synthetic("val", _cfg())  # the same number by hand: argmax over the val split
    with torch.no_grad():
        hits = (model.eval()(normalize(val.images)).argmax(1) == val.labels).float().mean().item()
    assert metrics["top1"] == pytest.approx(100 * hits, abs=1e-4) and metrics["n"] == len(val.labels)


def test_finetune_from_an_image_folder(tmp_path):
    for split, n in (("train", 6), ("val", 3)):
        for k, wnid in enumerate(["n01", "n02"]):
            (tmp_path / "data" / split / wnid).mkdir(parents=True)
            for i in range(n):
                rgb = np.full((40, 40, 3), 60 + 120 * k, np.uint8)
                Image.fromarray(rgb).save(tmp_path / "data" / split / wnid / f"{i}.JPEG")
    cfg = _cfg(data=str(tmp_path / "data"), num_classes=2, batch_size=4, data_limit="null", rand_augment="rand-m9-mstd0.5",
               reprob=0.25, mixup=0.8, cutmix=1.0, num_workers=1)
    model, metrics = train_classifier(cfg, tmp_path / "run", progress=False)
    assert metrics["n"] == 6 and metrics["steps"] == 4 and model.head.out_features == 2
    assert [r["step"] for r in engine.read_metrics(tmp_path / "run")] == [2, 4]


def test_distillation_token_slot_starts_from_the_class_token(student_ckpt, tmp_path):
    teacher = save_model(build_model(ModelSpec.create("micro_tiny", num_classes=10)), tmp_path / "t.pth")
    cfg = _cfg(pretrained=student_ckpt, dist_token=True, extra_fc=64, teacher_classifier=teacher)
    model = build_classifier(cfg)
    pe = torch.load(student_ckpt, weights_only=True)["model"]["pos_embed"]
    assert model.pos_embed.shape[1] == pe.shape[1] + 1
    assert torch.equal(model.pos_embed[:, 0], pe[:, 0]) and torch.equal(model.pos_embed[:, 1], pe[:, 0])
    assert torch.equal(model.pos_embed[:, 2:], pe[:, 1:])


def test_tinymim_star_checkpoint_serves_as_an_encoder(tmp_path):
    """A TinyMIM*-T classifier (distillation token, shared extra FC) loads as a teacher
    (token slot and heads dropped); tests/test_segmentation.py loads it as a segmenter."""
    from tinymim.checkpoints import load_teacher

    torch.manual_seed(0)
    star = build_model(ModelSpec.create("micro_tiny", num_classes=10, heads=6, extra_fc=64, dist_token=True))
    path = save_model(star, tmp_path / "star.pth")
    enc = load_teacher(None, path)
    assert enc.pos_embed.shape[1] == star.pos_embed.shape[1] - 1 and not hasattr(enc, "head_dist")
    assert torch.equal(enc.pos_embed[:, 1:], star.pos_embed[:, 2:])


@pytest.mark.parametrize("size, resize", [(224, 256), (32, 36), (384, 384), (448, 448)])
def test_evaluation_resize_is_maes(size, resize):
    """MAE's build_transform: crop_pct 224/256 up to 224 px, 1.0 above (384 is resized to 384,
    not to 438)."""
    from tinymim.evaluation import eval_resize, eval_transform

    assert eval_resize(size) == resize
    out = eval_transform(size, eval_resize(size))(Image.fromarray(np.zeros((500, 600, 3), np.uint8)))
    assert out.shape == (3, size, size) and out.dtype == torch.uint8
