import numpy as np
import pytest
import torch
from PIL import Image

from tinymim.config import get_config
from tinymim.models import ModelSpec, build_model, save_model
from tinymim.segmentation import (
    ADE20KTrainTransform,
    ViTUperNet,
    build_segmenter,
    confusion,
    infer_slide,
    infer_whole,
    segmentation_metrics,
    train_segmentation,
)


@pytest.mark.parametrize("arch, dim", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
def test_adapter_strides_and_channels(arch, dim):
    torch.manual_seed(0)
    model = ViTUperNet(build_model(ModelSpec.create(arch, img_size=64), dynamic_img_size=True), (3, 5, 7, 11), num_classes=5, channels=32)
    x = torch.randn(1, 3, 64, 96)
    feats = []
    model.adapter.register_forward_hook(lambda m, i, o: feats.extend(o))
    logits, aux = model.eval()(x)
    assert [f.shape[1] for f in feats] == [dim] * 4
    assert [(64 // f.shape[2], 96 // f.shape[3]) for f in feats] == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert logits.shape == (1, 5, 16, 24) and aux.shape == (1, 5, 4, 6)


def test_miou_from_a_hand_made_confusion_matrix():
    pred = torch.tensor([[0, 0, 1, 1], [1, 1, 3, 3]])
    gt = torch.tensor([[0, 1, 1, 255], [1, 1, 255, 3]])  # 255 ignored; class 2 absent from both
    conf = confusion(pred, gt, num_classes=4)
    assert conf.tolist() == [[1, 0, 0, 0], [1, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    m = segmentation_metrics(conf, ["a", "b", "c", "d"])
    # IoU: a = 1/(1+1) = .5, b = 3/(3+1) = .75, c absent -> excluded, d = 1/1
    assert m["per_class_IoU"] == {"a": 50.0, "b": 75.0, "c": None, "d": 100.0}
    assert m["mIoU"] == pytest.approx(100 * (0.5 + 0.75 + 1.0) / 3)
    assert m["aAcc"] == pytest.approx(100 * 5 / 6)


def test_sliding_window_equals_whole_image_when_one_window_covers_it():
    torch.manual_seed(0)
    model = ViTUperNet(build_model(ModelSpec.create("micro_tiny"), dynamic_img_size=True), (0, 1, 2, 3), 4, channels=16).eval()
    x = torch.randn(1, 3, 32, 48)
    assert torch.allclose(infer_slide(model, x, window=48, stride=32), infer_whole(model, x), atol=1e-6)
    # overlapping windows still cover every pixel once or more, and keep the shape
    assert infer_slide(model, torch.randn(1, 3, 40, 56), window=32, stride=21).shape == (1, 4, 40, 56)


def test_pretrained_backbone_loads_with_interpolated_pos_embed(tmp_path):
    torch.manual_seed(0)
    enc = build_model(ModelSpec.create("micro_tiny", last_heads=6))
    path = save_model(enc, tmp_path / "student.pth")
    cfg = get_config("segmentation", "micro_tiny", "smoke", {"pretrained": str(path), "input_size": "64"})
    model = build_segmenter(cfg)
    assert model.backbone.pos_embed.shape == (1, 1 + 64, 96)
    assert torch.equal(model.backbone.blocks[1].attn.qkv.weight, enc.blocks[1].attn.qkv.weight)
    assert model.backbone.blocks[-1].attn.num_heads == 6


def test_ade20k_train_transform_crops_and_pads():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    mask = torch.randint(0, 5, (60, 80))
    x, m = ADE20KTrainTransform(crop=64, scale=(80, 60))(img, mask)
    assert x.shape == (3, 64, 64) and m.shape == (64, 64)
    assert set(m.unique().tolist()) <= {0, 1, 2, 3, 4, 255}


def test_segmentation_trains_end_to_end_on_synthetic(tmp_path):
    cfg = get_config("segmentation", "micro_tiny", "smoke",
                     {"steps": "3", "warmup_steps": "1", "batch_size": "8", "data_limit": "32", "log_every": "1"})
    _, metrics = train_segmentation(cfg, tmp_path, progress=False)
    assert 0 <= metrics["mIoU"] <= 100 and len(metrics["per_class_IoU"]) == 11
    assert (tmp_path / "model.pth").exists()


def test_layer_decay_reaches_backbone_only():
    from tinymim.engine import build_optimizer
    from tinymim.segmentation import SegmentationTask

    cfg = get_config("segmentation", "micro_tiny", "smoke", {"layer_decay": "0.5"})
    model = build_segmenter(cfg)
    opt = build_optimizer(SegmentationTask(model, cfg), cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale["decode.classify.weight"] == scale["adapter.up2.weight"] == scale["aux.conv.0.weight"] == 1.0
    assert scale["backbone.blocks.3.mlp.fc1.weight"] == 0.5 and scale["backbone.blocks.0.mlp.fc1.weight"] == 0.5 ** 4
    assert scale["backbone.patch_embed.proj.weight"] == 0.5 ** 5


def test_majority_baseline_is_reported():
    from tinymim.segmentation import evaluate_segmentation

    cfg = get_config("segmentation", "micro_tiny", "smoke")
    model = build_segmenter(cfg)
    m = evaluate_segmentation(model, cfg, limit=50)
    assert 0 < m["majority_class_mIoU"] < 100 / cfg.num_classes * 1.5
